"""Distributed contract helpers (issue 20 item 1), shipped so plugin methods get the same checks.

Each run is :mod:`fewstep_rl.testing.dist_check` in a clean subprocess (Lightning re-launches it per rank, gloo on
CPU, toy2d unless ``world`` says otherwise). The checks (``tests/test_dist_contract.py`` applies them to every
registered method):

* :func:`ranks_in_sync` — after training, the full trainable weights of every rank are bitwise identical (DDP: the
  same averaged gradient on every rank; FSDP2: the shards gathered back);
* :func:`check_group_stats` — every :func:`fewstep_rl.distributed.over_ranks` call (group advantages, centring,
  multi-reward normalisation) saw the same global batch on every rank, in rank order (rank ``r``'s rows are its own
  samples), and every rank computed the same whole-batch statistics;
* :func:`check_synced` — every rank made the same rank-synchronised draws in the same order (``rng(tag,
  per_rank=False)`` tags, SubGRPO step subsets) and drew the same group-shared noise for a shared key; against a
  one-process run of the same global batch (``--replicate`` or ``--split-groups``), the draws are its draws;
* :func:`max_diff` of a ``--replicate`` 2-process run against the 1-process run with the same global batch content
  (see :mod:`~fewstep_rl.testing.dist_check`): equal up to the float reduction order of the gradient all-reduce /
  reduce-scatter, where the algorithm allows it; :func:`compare_traces` does the same for the group statistics;
* resume: ``save_at`` / ``ckpt_path`` of :func:`run_dist` (``k.ckpt`` written mid-run by the uninterrupted run, the
  records' ``saved_weights`` / ``saved_groups`` against the resumed run's ``start_weights`` / ``start_groups``);
* :func:`world_overrides` — the same runs on a conformance case's world (e.g. the tiny SD3 pipeline).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_DIST_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def run_dist(method: str, strategy: str, out: Path, steps: int = 3, replicate: bool = False,
             overrides: dict[str, Any] | None = None, timeout: int = 600, interrupt_after: int | None = None,
             ckpt_path: str | Path | None = None, world: str = "toy2d", preset: bool = True, save_at: int | None = None,
             split_groups: bool = False) -> list[dict[str, Any]]:
    """Run ``dist_check`` (``strategy`` = ddp | fsdp2 on 2 processes, or single) and load every rank's record;
    ``interrupt_after`` / ``save_at`` / ``ckpt_path``: stop as if killed after k iterations / also write
    ``out/k.ckpt`` after k iterations / resume from a checkpoint (``last.ckpt`` or ``k.ckpt`` of an earlier run);
    ``world`` / ``preset``: the world and whether its preset applies (see :func:`world_overrides`)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "fewstep_rl.testing.dist_check", "--strategy", strategy, "--out", str(out),
           "--method", method, "--steps", str(steps), "--world", world]
    if not preset:
        cmd.append("--no-preset")
    if replicate:
        cmd.append("--replicate")
    if split_groups:
        cmd.append("--split-groups")
    if interrupt_after is not None:
        cmd += ["--interrupt-after", str(interrupt_after)]
    if save_at is not None:
        cmd += ["--save-at", str(save_at)]
    if ckpt_path is not None:
        cmd += ["--ckpt-path", str(ckpt_path)]
    for k, v in (overrides or {}).items():
        cmd += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    # own session: on a timeout the rank Lightning launched goes too (not only the process we started)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{method} under {strategy} timed out after {timeout} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"{method} under {strategy} failed:\n{stderr[-4000:]}")
    ranks = len(list(Path(out).glob("rank*.pt")))
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def world_overrides(case: Any, workdir: Path, method: str) -> dict[str, Any]:
    """``--set`` overrides that run ``method`` on a conformance case's world (:data:`fewstep_rl.testing.cases.CASES`:
    its tiny random pipeline written under ``workdir`` once, its prompts, its CLI world arguments and rewards) at the
    smallest size of the CLI conformance fit (2 prompts per rank, groups of 2, RTDMD's stage 2 from the start); run
    with ``preset=False`` as that fit does."""
    from fewstep_rl import registry
    from fewstep_rl.config import field_types

    workdir = Path(workdir)
    model_dir = workdir / case.name
    if not model_dir.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        model_dir = Path(case.prepare(workdir))
    prompts = workdir / "prompts.txt"
    prompts.write_text("\n".join(case.prompts) + "\n")
    args = case.world_args(model_dir, prompts)
    over: dict[str, Any] = {k.removeprefix("--"): v for k, v in zip(args[::2], args[1::2], strict=True)}
    over |= {"method.batch_size": 2, "trainer.eval_samples": 2, "trainer.progress_bar": False}
    fields = field_types(registry.load("methods", method).Config)
    if "group_size" in fields:
        over["method.group_size"] = 2
    if "stage1_iterations" in fields:
        over["method.stage1_iterations"] = 0
    if case.rewards is not None:
        over["rewards"] = [{"name": n} for n in case.rewards.split(",")]
    return over


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


def synced_draws(record: dict[str, Any]) -> tuple[list[Any], dict[tuple, torch.Tensor]]:
    """One rank's rank-synchronised draws: the ordered ``rng(tag, per_rank=False)`` tags and ``step_subset`` results,
    and the group-shared noise rows by key ``(prompt or group key, step, epoch, seed)``."""
    order = [(d["kind"], d.get("key", d.get("out"))) for d in record["synced"] if d["kind"] != "group_noise"]
    rows = {}
    for d in record["synced"]:
        if d["kind"] == "group_noise":
            assert d["key"] not in rows or torch.equal(rows[d["key"]], d["out"]), f"{d['key']}: two different noises"
            rows[d["key"]] = d["out"]
    return order, rows


def check_synced(records: list[dict[str, Any]], reference: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Assert every rank made the same rank-synchronised draws in the same order (SubGRPO subsets, shared stop
    indices and levels) and drew the same group-shared noise for every key any two ranks share; with a
    ``reference`` (the one-process run of the same global batch) also that these are the reference's draws.
    Returns the counts checked."""
    orders, rows = zip(*(synced_draws(r) for r in records), strict=True)
    for r, order in enumerate(orders):
        assert order == orders[0], f"rank {r} made other rank-synchronised draws: {order} vs {orders[0]}"
    shared = 0
    merged: dict[tuple, torch.Tensor] = {}
    for rk in rows:
        for key, x in rk.items():
            if key in merged:
                shared += 1
                assert torch.equal(merged[key], x), f"group noise {key} differs across ranks"
            merged[key] = x
    if reference is not None:
        ref_order, ref_rows = synced_draws(reference[0])
        assert orders[0] == ref_order, f"rank-synchronised draws differ from one process: {orders[0]} vs {ref_order}"
        assert merged.keys() == ref_rows.keys(), (sorted(merged), sorted(ref_rows))
        for key, x in merged.items():
            assert torch.equal(ref_rows[key], x), f"group noise {key} differs from one process"
    subsets = sum(k == "step_subset" for k, _ in orders[0])
    return {"draws": len(orders[0]), "subsets": subsets, "noise_keys": len(merged), "noise_keys_on_2_ranks": shared}


def compare_traces(replicas: list[dict[str, Any]], single: list[dict[str, Any]]) -> float:
    """Largest difference between the ``over_ranks`` calls of a ``--replicate`` run (every group has its K members on
    each rank: one group of 2K over 2 ranks) and those of the one-process run: rank 0's local inputs and its rows of
    the whole-batch result against the one-process inputs and result (the same calls in the same order)."""
    mine, ref = replicas[0]["trace"], single[0]["trace"]
    assert len(mine) == len(ref), (len(mine), len(ref))
    worst = 0.0
    for c, (a, b) in enumerate(zip(mine, ref, strict=True)):
        n = b["out"].shape[0]
        assert a["out"].shape[0] == len(replicas) * n, f"call {c}: {a['out'].shape} vs {b['out'].shape}"
        pairs = [(a["out"][:n], b["out"]), *zip(a["local"], b["local"], strict=True)]
        for x, y in pairs:
            assert x.shape == y.shape, f"call {c}: {x.shape} vs {y.shape}"
            if x.is_floating_point():
                worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
            else:
                assert torch.equal(x, y), f"call {c}: integer inputs (group ids) differ from one process"
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
