"""DDP (gloo, 2 processes) and FSDP2 (ModelParallelStrategy) on CPU, each in a clean subprocess."""

import json
import os
import subprocess
import sys

import pytest

from fewstep_rl import registry


def _run(strategy, out, method="dmd2"):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "fewstep_rl.testing.dist_check", "--strategy", strategy, "--out", str(out),
         "--method", method, "--steps", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_training_keeps_ranks_in_sync(strategy, tmp_path):
    r0, r1 = _run(strategy, tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["iteration"] == 3 and r0["updates"] == r1["updates"]
    for role, a in r0["roles"].items():
        b = r1["roles"][role]
        assert a["sum"] == pytest.approx(b["sum"], rel=1e-6, abs=1e-9), role
        assert a["sumsq"] == pytest.approx(b["sumsq"], rel=1e-6), role
        assert a["sumsq"] > 0, f"role {role} is all zeros"
    if strategy == "fsdp2":  # parameters are sharded DTensors (a role used last may still be unsharded)
        sharded = [r for r in r0["roles"].values() if r["type"] == "DTensor"]
        assert sharded and all(r["local_numel"] < r["numel"] for r in sharded)
    assert (tmp_path / "last.ckpt").exists()


def test_every_registered_method_is_listed():
    assert "dmd2" in registry.names("methods")
