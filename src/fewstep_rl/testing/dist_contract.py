"""Distributed contract helpers (issue 20 item 1), shipped so plugin methods get the same checks.

Each run is :mod:`fewstep_rl.testing.dist_check` in a clean subprocess (Lightning re-launches it per rank, gloo on
CPU, toy2d). The checks (``tests/test_dist_contract.py`` applies them to every registered method):

* :func:`ranks_in_sync` — after training, the full trainable weights of every rank are bitwise identical (DDP: the
  same averaged gradient on every rank; FSDP2: the shards gathered back);
* :func:`check_group_stats` — every :func:`fewstep_rl.distributed.over_ranks` call (group advantages, centring,
  multi-reward normalisation) saw the same global batch on every rank, in rank order (rank ``r``'s rows are its own
  samples), and every rank computed the same whole-batch statistics;
* :func:`max_diff` of a ``--replicate`` 2-process run against the 1-process run with the same global batch content
  (see :mod:`~fewstep_rl.testing.dist_check`): equal up to the float reduction order of the gradient all-reduce /
  reduce-scatter, where the algorithm allows it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_DIST_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def run_dist(method: str, strategy: str, out: Path, steps: int = 3, replicate: bool = False,
             overrides: dict[str, Any] | None = None, timeout: int = 300, interrupt_after: int | None = None,
             ckpt_path: str | None = None) -> list[dict[str, Any]]:
    """Run ``dist_check`` (``strategy`` = ddp | fsdp2 on 2 processes, or single) and load every rank's record;
    ``interrupt_after`` / ``ckpt_path``: stop as if killed after k iterations / resume from a checkpoint
    (``out/last.ckpt`` of an earlier run)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "fewstep_rl.testing.dist_check", "--strategy", strategy, "--out", str(out),
           "--method", method, "--steps", str(steps)]
    if replicate:
        cmd.append("--replicate")
    if interrupt_after is not None:
        cmd += ["--interrupt-after", str(interrupt_after)]
    if ckpt_path is not None:
        cmd += ["--ckpt-path", str(ckpt_path)]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{method} under {strategy} failed:\n{proc.stderr[-4000:]}")
    ranks = len(list(Path(out).glob("rank*.pt")))
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def max_diff(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Per role, the largest absolute difference between two sets of full role tensors."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return {role: max(float((x - y).abs().max()) for x, y in zip(a[role], b[role], strict=True)) for role in a}


def ranks_in_sync(records: list[dict[str, Any]]) -> dict[str, float]:
    """Largest per-role difference of any rank from rank 0 (0.0 when the ranks are in sync)."""
    worst = dict.fromkeys(records[0]["weights"], 0.0)
    for rec in records[1:]:
        for role, d in max_diff(records[0]["weights"], rec["weights"]).items():
            worst[role] = max(worst[role], d)
    return worst


def check_group_stats(records: list[dict[str, Any]]) -> int:
    """Assert the over_ranks traces agree (same calls, same gathered global batch on every rank, rank ``r``'s rows
    are its local inputs, same whole-batch result everywhere); returns the number of calls checked."""
    traces = [rec["trace"] for rec in records]
    n_calls = len(traces[0])
    assert all(len(t) == n_calls for t in traces), [len(t) for t in traces]
    for c in range(n_calls):
        first = traces[0][c]
        for r, trace in enumerate(traces):
            call = trace[c]
            for g0, g in zip(first["gathered"], call["gathered"], strict=True):
                assert torch.equal(g0, g), f"call {c}: rank {r} gathered a different global batch"
            assert torch.equal(first["out"], call["out"]), f"call {c}: rank {r} computed different statistics"
            for loc, g in zip(call["local"], call["gathered"], strict=True):
                n = loc.shape[0]
                assert torch.equal(g[r * n:(r + 1) * n], loc), f"call {c}: rank {r}'s rows are not its own samples"
    return n_calls
