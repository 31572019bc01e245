"""Folds under FSDP2 (issue 20 item 3): folds reserved before sharding, filled in place at the fold.

* one process: a backbone whose folds were reserved (empty, all-zero adapters) computes bit for bit what a backbone
  without them computes — before the fold, after it, and in the gradients — for LoRA (tiny sd3) and toy2d's residual
  adapters; the reserved adapters come back from a checkpoint;
* 2 CPU processes (gloo, toy2d): RTDMD crosses its stage boundary (generator ← EMA, two folds) under FSDP2 and runs
  stage 2 sharded; the ranks stay in sync and the run equals the DDP run within ``DDP_FSDP_TOL`` (the tolerance of
  ``tests/test_dist_contract.py``); a run stopped after the fold and resumed equals the uninterrupted one.
"""

import functools
import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from fewstep_rl.roles import add_roles
from fewstep_rl.testing.dist_contract import check_group_stats, max_diff, ranks_in_sync, run_dist

DDP_FSDP_TOL = 1e-6  # = tests/test_dist_contract.py DDP_FSDP_TOL (fp32; all-reduce vs reduce-scatter order only)
ROLES = dict(trainable=["generator", "fake_score"], snapshots={"ema": "generator"})
FOLDS = (("generator", ("ema",)), ("fake_score", ()))


# ------------------------------------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers import StableDiffusion3Pipeline

    from fewstep_rl.backbones import tiny

    d = tmp_path_factory.mktemp("sd3_world")
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d)
    return d


def _toy2d():
    from fewstep_rl.worlds.toy2d import Toy2DWorld

    bb = Toy2DWorld().build_backbone()
    add_roles(bb, **ROLES)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    return bb, (x, torch.rand(16, generator=torch.Generator().manual_seed(3)), bb.encode_prompts(["left", "right"] * 8))


def _sd3(path):
    from fewstep_rl.backbones.sd3 import SD3Backbone
    from fewstep_rl.roles import RolesConfig

    bb = SD3Backbone.from_pretrained(path, roles=RolesConfig(mode="lora", rank=4, alpha=8), resolution=16)
    add_roles(bb, **ROLES)
    x = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    return bb, (x, torch.tensor([0.8, 0.3]), bb.encode_prompts(["a red cube", "two blue balls"]))


@torch.no_grad()
def _train_a_little(bb, seed):
    """Non-zero, seeded role weights (what training would leave)."""
    g = torch.Generator().manual_seed(seed)
    for r in ("generator", "fake_score", "ema"):
        for p in bb.role_parameters(r):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _outputs_and_grads(bb, inputs):
    x, sigma, cond = inputs
    out = {}
    for r in ("teacher", "generator", "ema", "fake_score"):
        with torch.no_grad():
            out[r] = bb.velocity(x, sigma, cond, r)
    for r in ("generator", "fake_score"):
        bb.zero_grad(set_to_none=True)
        bb.velocity(x, sigma, cond, r).square().mean().backward()
        out[f"grad/{r}"] = torch.cat([p.grad.reshape(-1) for p in bb.role_parameters(r)])
    bb.zero_grad(set_to_none=True)
    return out


def _role_weights(bb):
    return {r: [p.detach().clone() for p in bb.role_parameters(r)] for r in bb.roles}


@pytest.mark.parametrize("family", ["toy2d", "sd3"])
def test_reserved_folds_change_nothing_and_fold_bit_identically(family, request):
    """Reserved folds are active from the start but add exactly zero; filling them at the fold gives the weights
    and outputs (and gradients) of today's fold, which creates the adapters at fold time."""
    build = _toy2d if family == "toy2d" else (lambda: _sd3(request.getfixturevalue("sd3_world")))
    plain, inputs = build()
    reserved, _ = build()
    names = [reserved.reserve_fold(r, into) for r, into in FOLDS]
    assert names == ["fold0__generator__ema", "fold1__fake_score"] and reserved.folds == names
    assert reserved.folds_of("ema") == ["fold0__generator__ema"] and reserved.folds_of("teacher") == []
    fold_params = (list(reserved.store.folded.parameters()) if family == "toy2d" else
                   [p for n, p in reserved.transformer.named_parameters() if ".fold" in n])
    assert fold_params and all(float(p.abs().max()) == 0 and not p.requires_grad for p in fold_params)
    _train_a_little(plain, 1)
    _train_a_little(reserved, 1)
    a, b = _outputs_and_grads(plain, inputs), _outputs_and_grads(reserved, inputs)
    for k in a:  # before the fold: an empty fold adds exactly zero (outputs and gradients)
        assert torch.equal(a[k], b[k]), k
    for bb in (plain, reserved):
        for r, into in FOLDS:
            bb.fold_role(r, into)
    assert plain.folds == reserved.folds == ["fold0__generator__ema", "fold1__fake_score"]  # filled, none added
    wa, wb = _role_weights(plain), _role_weights(reserved)
    assert all(torch.equal(x, y) for r in wa for x, y in zip(wa[r], wb[r], strict=True))
    sa = {k: v for k, v in plain.state_dict().items() if plain.is_role_key(k)}
    sb = {k: v for k, v in reserved.state_dict().items() if reserved.is_role_key(k)}
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _train_a_little(plain, 2)  # stage 2 trains the fresh adapters on top of the folds
    _train_a_little(reserved, 2)
    a, b = _outputs_and_grads(plain, inputs), _outputs_and_grads(reserved, inputs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a filled fold is not empty: folding the same roles again adds a new fold on top (as without reservations)
    reserved.fold_role("fake_score")
    assert reserved.folds[-1] == "fold2__fake_score"


def test_reserved_folds_load_back_and_a_resumed_fold_fills_them():
    """A checkpoint written before the fold (empty reserved folds) and one written after it (filled) both load into
    a backbone that reserved its folds; the first still folds in place, the second does not fold again."""
    src, inputs = _toy2d()
    for r, into in FOLDS:
        src.reserve_fold(r, into)
    _train_a_little(src, 1)
    before = {k: v.clone() for k, v in src.state_dict().items() if src.is_role_key(k)}
    for r, into in FOLDS:
        src.fold_role(r, into)
    after = {k: v for k, v in src.state_dict().items() if src.is_role_key(k)}
    for sd, empty in ((before, True), (after, False)):
        dst, _ = _toy2d()
        for r, into in FOLDS:
            dst.reserve_fold(r, into)
        dst.load_state_dict(sd, strict=False)
        assert dst.folds == src.folds
        assert all(dst.store._fold_is_empty(f) == empty for f in dst.folds)
    with torch.no_grad():
        for r in ("teacher", "generator", "ema", "fake_score"):
            assert torch.equal(dst.velocity(*inputs, r), src.velocity(*inputs, r)), r


# ------------------------------------------------------------------------------------------------ 2 processes
# RTDMD on toy2d: iteration 0 is stage 1, iteration 1 crosses the boundary (generator ← EMA, two folds) and runs
# stage 2, iteration 2 (and 3) stage 2 on the folded private bases
BOUNDARY = {"method.stage1_iterations": 1, "method.batch_size": 4, "method.group_size": 4}


def _ckpt_state(path):
    """``state_dict`` of a ``last.ckpt``: a file (DDP) or a sharded DCP directory (FSDP2, gathered here)."""
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, path.parent / "gathered.ckpt")
        path = path.parent / "gathered.ckpt"
    return torch.load(path, weights_only=False)["state_dict"]


def _folds(sd):
    return {k: v for k, v in sd.items() if ".folded." in k}


_ROOT = Path(tempfile.mkdtemp(prefix="fewstep-fold-"))


@functools.cache
def _boundary_run(strategy):
    """RTDMD across its boundary under ``strategy`` (one run per session, shared by the tests below)."""
    return run_dist("rtdmd", strategy, _ROOT / strategy, steps=3, overrides=BOUNDARY, timeout=900), _ROOT / strategy


def test_rtdmd_folds_at_its_stage_boundary_and_runs_stage2_under_fsdp2():
    fsdp, out = _boundary_run("fsdp2")
    assert all(r["iteration"] == 2 and r["updates"] == {"generator": 3, "fake_score": 3} for r in fsdp)
    assert max(ranks_in_sync(fsdp).values()) == 0.0, ranks_in_sync(fsdp)
    assert check_group_stats(fsdp) >= 2  # stage 2's advantages went through over_ranks on both iterations
    assert all(r["type"] == "DTensor" and r["local_numel"] < r["numel"] for r in fsdp[0]["roles"].values())
    folds = _folds(_ckpt_state(out / "last.ckpt"))
    # the toy2d preset's β-calibrated PPO branch freezes the generator as its KL reference (ppo_ref) at the boundary:
    # one fold shared by the generator, its EMA and that reference
    assert {k.split(".")[3] for k in folds} == {"fold0__generator__ema__ppo_ref", "fold1__fake_score"}
    assert all(float(v.abs().sum()) > 0 for k, v in folds.items() if k.endswith("net.0.weight"))  # filled


@pytest.mark.dist
@pytest.mark.slow
def test_rtdmd_across_the_fold_under_fsdp2_equals_ddp():
    (fsdp, out_f), (ddp, out_d) = _boundary_run("fsdp2"), _boundary_run("ddp")
    assert max(ranks_in_sync(ddp).values()) == 0.0
    d = max_diff(ddp[0]["weights"], fsdp[0]["weights"])
    assert max(d.values()) <= DDP_FSDP_TOL, d
    fold_f, fold_d = _folds(_ckpt_state(out_f / "last.ckpt")), _folds(_ckpt_state(out_d / "last.ckpt"))
    assert fold_f.keys() == fold_d.keys()
    assert max(float((fold_f[k] - fold_d[k]).abs().max()) for k in fold_d) <= DDP_FSDP_TOL


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [1, 2])
def test_rtdmd_resume_across_the_fold_under_fsdp2_is_bit_exact(tmp_path, interrupt):
    """Stopped before the boundary (its reserved folds empty in the sharded checkpoint) or just after the fold, then
    resumed to iteration 3: weights and folds equal the uninterrupted run bit for bit."""
    full = run_dist("rtdmd", "fsdp2", tmp_path / "full", steps=4, overrides=BOUNDARY, timeout=900)
    run_dist("rtdmd", "fsdp2", tmp_path / "part", steps=4, overrides=BOUNDARY, interrupt_after=interrupt, timeout=900)
    part_folds = _folds(_ckpt_state(tmp_path / "part" / "last.ckpt"))
    assert part_folds and all((float(v.abs().max()) == 0) == (interrupt == 1) for v in part_folds.values()
                              if v.dim() == 2)
    resumed = run_dist("rtdmd", "fsdp2", tmp_path / "resumed", steps=4, overrides=BOUNDARY,
                       ckpt_path=tmp_path / "part" / "last.ckpt", timeout=900)
    assert resumed[0]["iteration"] == full[0]["iteration"] == 3 and resumed[0]["updates"] == full[0]["updates"]
    d = max_diff(full[0]["weights"], resumed[0]["weights"])
    assert max(d.values()) == 0.0, d
    fa, fb = _folds(_ckpt_state(tmp_path / "full" / "last.ckpt")), _folds(_ckpt_state(tmp_path / "resumed" /
                                                                                     "last.ckpt"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
