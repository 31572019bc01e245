"""Distributed contract (issue 20 item 1): every registered method under DDP and FSDP2 on 2 CPU processes (gloo,
toy2d, 3 iterations).

* ranks end with bitwise identical full weights, and every ``over_ranks`` call saw the whole global batch in rank
  order and computed the same statistics on every rank (real per-rank streams);
* DDP and FSDP2 agree (same streams; only the gradient reduction differs: all-reduce vs reduce-scatter);
* with ``--replicate`` (both ranks draw rank 0's batch and noise) the 2-process run equals the 1-process run
  (``REPLICA_TOL``; why a method cannot be compared in ``NOT_COMPARABLE``).

The whole suite is ``make test-dist`` (marked ``dist`` and ``slow``); ``make test`` runs FAST (one RL method and
one distillation method).
"""

import functools
import tempfile
from pathlib import Path

import pytest

from fewstep_rl import registry
from fewstep_rl.testing.dist_contract import check_group_stats, max_diff, ranks_in_sync, run_dist

METHODS = registry.names("methods")
FAST = {"flow_grpo", "dmd2"}
RL = {"flow_grpo", "nft", "tdm_r1", "crd", "rtdmd"}  # their advantages go through over_ranks
# the 1-process comparison runs the paper regime: the toy2d preset's tilt regime uses a leave-one-out baseline,
# which changes when the two replicas of a group meet in one gathered batch (2K samples instead of K)
# RTDMD's toy2d preset spends its first 1000 iterations in stage 1 (no group statistics): run stage 2 from the start
METHOD_OVERRIDES = {"rtdmd": {"method.stage1_iterations": 0, "method.batch_size": 4, "method.group_size": 4}}
REPLICA_OVERRIDES = {"flow_grpo": {"method.regime": "paper"}, "nft": {"method.regime": "paper"},
                     "tdm_r1": {"method.regime": "paper"}}
REPLICA_TOL = 1e-6  # fp32 weights; the gathered statistics differ from the 1-process ones by summation order only
DDP_FSDP_TOL = 1e-6
NOT_COMPARABLE: dict[str, str] = {}
STEPS = 3


_ROOT = Path(tempfile.mkdtemp(prefix="fewstep-dist-"))


@functools.cache
def _run(method, strategy, replicate=False):
    """One run per (method, strategy, replicate) for the whole session (the tests below share them)."""
    over = {**METHOD_OVERRIDES.get(method, {}),
            **(REPLICA_OVERRIDES.get(method, {}) if replicate or strategy == "single" else {})}
    out = _ROOT / f"{method}-{strategy}{'-rep' if replicate else ''}"
    return run_dist(method, strategy, out, steps=STEPS, replicate=replicate, overrides=over), out


def _marks(method, strategy="fsdp2", fast_strategies=("ddp", "fsdp2")):
    fast = method in FAST and strategy in fast_strategies
    return [] if fast else [pytest.mark.dist, pytest.mark.slow]


CASES = [pytest.param(m, s, marks=_marks(m, s), id=f"{m}-{s}") for m in METHODS for s in ("ddp", "fsdp2")]
# make test: the 1-process comparison of the fast methods under fsdp2 only
REPLICA_CASES = [pytest.param(m, s, marks=_marks(m, s, ("fsdp2",)), id=f"{m}-{s}")
                 for m in METHODS for s in ("ddp", "fsdp2")]


@pytest.mark.parametrize(("method", "strategy"), CASES)
def test_ranks_in_sync_and_group_stats_gathered(method, strategy):
    recs, out = _run(method, strategy)
    assert [r["world_size"] for r in recs] == [2, 2]
    assert all(r["iteration"] == STEPS - 1 and r["updates"] == recs[0]["updates"] for r in recs)
    assert max(ranks_in_sync(recs).values()) == 0.0, ranks_in_sync(recs)
    calls = check_group_stats(recs)
    if method in RL:
        assert calls >= STEPS, f"{method}: advantages were not computed over ranks ({calls} over_ranks calls)"
    if strategy == "fsdp2":  # parameters are sharded DTensors (a role used last may still be unsharded)
        sharded = [r for r in recs[0]["roles"].values() if r["type"] == "DTensor"]
        assert sharded and all(r["local_numel"] < r["numel"] for r in sharded)
    assert (out / "last.ckpt").exists()


@pytest.mark.parametrize("method", [pytest.param(m, marks=_marks(m)) for m in METHODS])
def test_ddp_equals_fsdp2(method):
    ddp, fsdp = _run(method, "ddp")[0], _run(method, "fsdp2")[0]
    d = max_diff(ddp[0]["weights"], fsdp[0]["weights"])
    assert max(d.values()) <= DDP_FSDP_TOL, d


@pytest.mark.parametrize(("method", "strategy"), REPLICA_CASES)
def test_two_replicas_equal_one_process(method, strategy):
    if method in NOT_COMPARABLE:
        pytest.xfail(NOT_COMPARABLE[method])
    single, two = _run(method, "single")[0], _run(method, strategy, replicate=True)[0]
    assert max(ranks_in_sync(two).values()) == 0.0
    d = max_diff(two[0]["weights"], single[0]["weights"])
    assert max(d.values()) <= REPLICA_TOL, d


RESUME_METHOD = "dmd2"  # three roles (generator, fake_score, ema snapshot), two optimisers


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_equals_uninterrupted(strategy, tmp_path):
    """Kill-like stop after 2 of 4 iterations, resume from last.ckpt (sharded directory under FSDP2) to 4: the
    weights equal the uninterrupted run bit for bit (CPU, gloo: the collective order is deterministic)."""
    full = run_dist(RESUME_METHOD, strategy, tmp_path / "full", steps=4)
    run_dist(RESUME_METHOD, strategy, tmp_path / "part", steps=4, interrupt_after=2)
    resumed = run_dist(RESUME_METHOD, strategy, tmp_path / "resumed", steps=4, ckpt_path=tmp_path / "part" / "last.ckpt")
    assert resumed[0]["iteration"] == full[0]["iteration"] and resumed[0]["updates"] == full[0]["updates"]
    d = max_diff(full[0]["weights"], resumed[0]["weights"])
    assert max(d.values()) == 0.0, d
    assert resumed[0]["groups"] == full[0]["groups"]  # learning rates (and their schedule base) restored too


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_fsdp2_resume_on_another_number_of_processes(before, after, tmp_path):
    """A sharded checkpoint written by ``before`` processes resumes on ``after`` (DCP reshards): the weights and
    learning rates load exactly and training continues. (The continuation is not compared with the uninterrupted
    run: with per-rank streams a different world size draws a different global batch.)"""
    part = run_dist(RESUME_METHOD, "fsdp2", tmp_path / "part", steps=4, interrupt_after=2,
                    overrides={"trainer.devices": before})
    resumed = run_dist(RESUME_METHOD, "fsdp2", tmp_path / "resumed", steps=4, ckpt_path=tmp_path / "part" / "last.ckpt",
                       overrides={"trainer.devices": after})
    assert len(part) == before and len(resumed) == after
    d = max_diff(part[0]["weights"], resumed[0]["start_weights"])
    assert max(d.values()) == 0.0, d
    assert resumed[0]["start_groups"] == part[0]["groups"]
    assert resumed[0]["iteration"] == 3 and resumed[0]["updates"]["fake_score"] > part[0]["updates"]["fake_score"]
