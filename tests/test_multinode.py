"""Multi-node (issue 20 item 4): two "nodes" of one process each on this machine over loopback, each started by its
own ``torchrun --nnodes 2 --node_rank r`` (TorchElastic environment: a node > 0 has ``LOCAL_RANK=0``), running
``fewstep-rl fit --trainer.num_nodes 2 --trainer.strategy ddp`` into one shared run directory.

Both exit 0 and the run directory is opened and written once, by global rank 0 (before the fix node 1, a local
rank 0, opened it too and failed on its lock). That the two ranks end in sync is checked on the per-rank records of
:mod:`fewstep_rl.testing.dist_check` launched the same way (bitwise identical full weights, same group statistics).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep_rl.rundir import is_launched_rank
from fewstep_rl.testing.dist_contract import _DIST_ENV, check_group_stats, ranks_in_sync


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], tmp: Path, timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Start ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1}`` concurrently; wait for both."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    port = _port()
    procs = []
    for r in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(tmp / f"out{r}", "w"), stderr=open(tmp / f"err{r}", "w")))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, (tmp / f"out{r}").read_text(),
                                        (tmp / f"err{r}").read_text()) for r, p in enumerate(procs)]


@pytest.mark.parametrize("env, launched", [
    ({}, False), ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, False),
    ({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, True),  # torchrun, node 1
    ({"SLURM_PROCID": "8", "SLURM_LOCALID": "0"}, True),  # srun, node 1
    ({"LOCAL_RANK": "1"}, True), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, True),  # Lightning's launcher
])
def test_only_global_rank_zero_writes(monkeypatch, env, launched):
    for k in (*_DIST_ENV, "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert is_launched_rank() is launched


def test_num_nodes_validated():
    proc = subprocess.run([sys.executable, "-m", "fewstep_rl.cli", "fit", "--method", "dmd2", "--world", "toy2d",
                           "--trainer.num_nodes", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: 'trainer': num_nodes must be >= 1, got 0"]


def test_fit_two_nodes_one_run_dir(tmp_path):
    run = tmp_path / "run"
    res = _two_nodes(["-m", "fewstep_rl.cli", "fit", "--method", "dmd2", "--world", "toy2d", "--trainer.devices", "1",
                      "--trainer.num_nodes", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
                      "--trainer.max_steps", "2", "--trainer.eval_samples", "64", "--trainer.progress_bar", "false",
                      "--trainer.run_dir", str(run)], tmp_path)
    for r, p in enumerate(res):
        assert p.returncode == 0, f"node {r}:\n{p.stderr[-3000:]}"
    assert '"run_dir"' in res[0].stdout and res[1].stdout.strip() == ""  # the final summary: global rank 0 only
    assert "run directory:" not in res[1].stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in res[1].stderr
    assert {"config.yaml", "versions.json", "metrics.csv", "checkpoints"} <= {p.name for p in run.iterdir()}
    steps = [line.split(",")[1] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps.count("1") == 1, steps  # one writer: each logged iteration once
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.dist
def test_two_nodes_ranks_in_sync(tmp_path):
    out = tmp_path / "dc"
    res = _two_nodes(["-m", "fewstep_rl.testing.dist_check", "--strategy", "ddp", "--out", str(out), "--steps", "3",
                      "--set", "trainer.devices=1", "--set", "trainer.num_nodes=2"], tmp_path)
    for r, p in enumerate(res):
        assert p.returncode == 0, f"node {r}:\n{p.stderr[-3000:]}"
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [rec["world_size"] for rec in records] == [2, 2] and [rec["rank"] for rec in records] == [0, 1]
    assert records[0]["iteration"] == records[1]["iteration"] > 0 and records[0]["updates"] == records[1]["updates"]
    assert records[0]["weights"] != {} and all(d == 0.0 for d in ranks_in_sync(records).values())
    start, end = records[0]["start_weights"], records[0]["weights"]
    assert any(not torch.equal(a, b) for role in end for a, b in zip(start[role], end[role], strict=True))  # trained
    check_group_stats(records)
