"""Per-role activation checkpointing (``roles.activation_checkpointing``, issue 20 item 5) on the tiny sd3 world.

The gradient passes of the listed roles recompute each transformer block in backward under the role of their forward:
gradients equal those without checkpointing, also when the active adapter is switched between the forward and the
backward (the LoRA hazard; a recomputation under the adapter active at backward time differs — checked too).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import contextlib

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fewstep_rl.config import ConfigError  # noqa: E402
from fewstep_rl.roles import RolesConfig, add_roles, checkpointing  # noqa: E402
from fewstep_rl.run import resolve  # noqa: E402
from fewstep_rl.testing.cases import SD3_PROMPTS, _sd3_load, _sd3_prepare  # noqa: E402

BOTH = ["generator", "fake_score"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _sd3_prepare(tmp_path_factory.mktemp("ckpt"))


def _backbone(world, ckpt, mode="lora"):
    bb = _sd3_load(world, RolesConfig(mode=mode, rank=4, alpha=8, activation_checkpointing=ckpt))
    add_roles(bb, BOTH, {"ema": "generator"})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for r in ("generator", "fake_score", "ema"):
            for p in bb.role_parameters(r):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bb


def _grads(bb, teacher_last=True):
    """One graph through three roles: generator, then fake score (grad), then the teacher (no grad) — the active
    adapter at backward time is none of the ones whose blocks are recomputed (``teacher_last=False``: the teacher
    pass comes first, so the fake score's adapter is active at backward time)."""
    x = torch.randn(3, *bb.sample_shape, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    sigma, cond = torch.tensor([0.9, 0.5, 0.2]), bb.encode_prompts(list(SD3_PROMPTS))
    with torch.no_grad():
        v_t = None if teacher_last else bb.velocity(x, sigma, cond, "teacher")
    v_g = bb.velocity(x, sigma, cond, "generator", guidance=2.0)  # CFG: conditional and null rows in one pass
    v_f = bb.velocity(x, sigma, cond, "fake_score")
    with torch.no_grad():
        v_t = bb.velocity(x, sigma, cond, "teacher") if teacher_last else v_t
    ((v_g - v_t) * v_f).mean().backward()
    out = {r: torch.cat([p.grad.reshape(-1) for p in bb.role_parameters(r)]) for r in BOTH}
    out["x"] = x.grad.clone()
    bb.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpointed_gradients_equal_plain_ones_with_roles_switched_before_backward(world, mode, monkeypatch):
    ref = _grads(_backbone(world, [], mode))
    recomputed = []
    active = checkpointing._active

    @contextlib.contextmanager
    def spy(store, role):
        recomputed.append(role)
        with active(store, role):
            yield

    monkeypatch.setattr(checkpointing, "_active", spy)
    bb = _backbone(world, BOTH, mode)
    got = _grads(bb)
    blocks = len(bb.transformer.transformer_blocks)
    assert sorted(recomputed) == ["fake_score"] * blocks + ["generator"] * blocks  # every block of both passes
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7, msg=k)
    assert bb.store.active_role is None  # the role active before the recomputations (the teacher) again

    recomputed.clear()  # only the listed role's passes are checkpointed
    got = _grads(_backbone(world, ["fake_score"], mode))
    assert recomputed == ["fake_score"] * blocks
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-7, msg=k)


def test_recomputing_under_the_adapter_active_at_backward_time_would_be_wrong(world, monkeypatch):
    """The hazard is real: without re-activating the forward's role, the generator's blocks are recomputed with the
    fake score's adapter (same structure, so torch's checks pass) and the gradients silently change; with the
    teacher (no adapter) active at backward time torch notices the different recomputation."""
    ref = _grads(_backbone(world, []), teacher_last=False)
    assert all(torch.equal(a, b) for a, b in zip(ref.values(), _grads(_backbone(world, BOTH), False).values()))
    monkeypatch.setattr(checkpointing, "_active", lambda store, role: contextlib.nullcontext())
    naive = _grads(_backbone(world, BOTH), teacher_last=False)
    assert max(float((naive[r] - ref[r]).abs().max()) for r in BOTH) > 1e-4
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _grads(_backbone(world, BOTH))


def test_no_gradient_no_checkpoint(world, monkeypatch):
    """Passes without gradient (rollouts, teacher, snapshots) never go through checkpoint."""
    calls = []
    monkeypatch.setattr(checkpointing, "_active", lambda store, role: calls.append(role) or contextlib.nullcontext())
    bb = _backbone(world, BOTH)
    x = torch.randn(2, *bb.sample_shape)
    cond = bb.encode_prompts(["a red cube", "a green cone"])
    with torch.no_grad():
        bb.velocity(x, 0.5, cond, "generator")
    bb.velocity(x, 0.5, cond, "ema").sum()  # grad mode on, but ema is not listed (and frozen)
    assert calls == []


@pytest.mark.parametrize(("method", "world", "over", "match"), [
    ("dmd2", "shapes", {"roles.activation_checkpointing": ["ema"]}, "'ema' is not a trainable role of dmd2"),
    ("rtdmd", "shapes", {"roles.activation_checkpointing": ["generatr"]}, "generatr"),
    ("dmd2", "shapes", {"roles.activation_checkpointing": ["generator", "generator"]}, "twice"),
    ("dmd2", "shapes", {"roles.activation_checkpoint": ["generator"]}, "activation_checkpointing"),
    ("dmd2", "toy2d", {"roles.activation_checkpointing": ["generator"]}, "does not apply to toy2d"),
])
def test_bad_activation_checkpointing_is_a_config_error(method, world, over, match):
    with pytest.raises(ConfigError, match=match):
        resolve(method, world, (), over)


def test_activation_checkpointing_resolves():
    r = resolve("dmd2", "shapes", (), {"roles.activation_checkpointing": ["generator", "fake_score"]})
    assert r.roles.activation_checkpointing == ["generator", "fake_score"]
    assert r.to_dict()["roles"]["activation_checkpointing"] == ["generator", "fake_score"]


def _dist_shapes(out, overrides):
    """``dist_check`` of dmd2 on the tiny shapes world (sd3 family, LoRA) under FSDP2 on 2 CPU processes."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "fewstep_rl.testing.dist_check", "--strategy", "fsdp2", "--out", str(out),
           "--method", "dmd2", "--world", "shapes", "--steps", "2"]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)  # two 2-process runs of the shapes world: ~4 min, ~9 min on 2 loaded cores
def test_activation_checkpointing_under_fsdp2_equals_plain(tmp_path):
    """dmd2 on shapes under FSDP2 (blocks are FSDP units, recomputed inside their unit): with checkpointing of both
    trainable roles the ranks stay in sync and the weights equal the run without it."""
    from fewstep_rl.testing.dist_contract import max_diff, ranks_in_sync

    ac = _dist_shapes(tmp_path / "ac", {"roles.activation_checkpointing": '["generator","fake_score"]'})
    plain = _dist_shapes(tmp_path / "plain", {})
    assert all(r["type"] == "DTensor" for r in ac[0]["roles"].values())
    assert max(ranks_in_sync(ac).values()) == 0.0
    assert max(max_diff(ac[0]["start_weights"], ac[0]["weights"]).values()) > 0  # it trained
    d = max_diff(ac[0]["weights"], plain[0]["weights"])
    assert max(d.values()) <= 1e-6, d
