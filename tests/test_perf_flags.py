"""Speed flags of the sd3 world, each against the plain path on the CPU (parity) and shown to take effect."""

from __future__ import annotations

import pytest
import torch

from fewstep_rl.perf.arch import ARCHS, build_sd3_backbone
from fewstep_rl.perf.speed import apply_speed
from fewstep_rl.roles import RolesConfig, add_roles

PROMPTS = ["a red cube", "two balls"]


def _bb(dtype=torch.float32, **speed):
    bb = build_sd3_backbone(ARCHS["tiny"], PROMPTS, device="cpu", dtype=dtype, resolution=64,
                            roles=RolesConfig(rank=4, alpha=8))
    add_roles(bb, ["generator", "fake_score"], {"ema": "generator"})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for role in ("generator", "fake_score"):
            for p in bb.role_parameters(role):
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return apply_speed(bb, **speed)


def _inputs(bb, n=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *bb.sample_shape), generator=g)
    return x, torch.tensor([0.9, 0.4])[:n], bb.encode_prompts(PROMPTS[:n])


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_backend_parity(backend):
    ref, bb = _bb(), _bb(attention_backend=backend)
    x, s, c = _inputs(ref)
    with torch.no_grad():
        for role in ("teacher", "generator"):
            assert torch.allclose(bb.velocity(x, s, c, role=role, guidance=2.0),
                                  ref.velocity(x, s, c, role=role, guidance=2.0), atol=1e-5)


def test_attention_backend_is_enforced():
    bb = _bb(attention_backend="efficient")  # no memory-efficient kernel on the CPU: the choice is really applied
    x, s, c = _inputs(bb)
    with pytest.raises(RuntimeError), torch.no_grad():
        bb.velocity(x, s, c, role="generator")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        apply_speed(bb, attention_backend="fast")


def _grads(bb):
    """Two roles interleaved in one graph (generator output fed to the fake score), as DMD-style losses do."""
    x, s, c = _inputs(bb)
    out = bb.velocity(x, s, c, role="generator")
    fake = bb.velocity(x - 0.5 * out, s * 0.5, c, role="fake_score")
    loss = (out**2).mean() + (fake * out).mean()
    loss.backward()
    gs = {r: [p.grad.clone() for p in bb.role_parameters(r)] for r in ("generator", "fake_score")}
    for r in gs:
        for p in bb.role_parameters(r):
            p.grad = None
    return gs


def test_grad_checkpointing_parity_with_interleaved_roles():
    ref, ck = _bb(), _bb(grad_checkpointing=True)
    g_ref, g_ck = _grads(ref), _grads(ck)
    for r in g_ref:
        assert any(t.abs().sum() > 0 for t in g_ref[r])
        for a, b in zip(g_ref[r], g_ck[r], strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_grad_checkpointing_keeps_only_inputs():
    def saved_numel(bb):
        x, s, c = _inputs(bb)
        total = [0]

        def pack(t):
            total[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            bb.velocity(x, s, c, role="generator").sum()
        return total[0]

    plain, ck = saved_numel(_bb()), saved_numel(_bb(grad_checkpointing=True))
    assert ck < plain / 5, (ck, plain)


@pytest.mark.slow  # Dynamo tracing of every adapter state: minutes on a 2-core machine
def test_compile_parity_per_role():
    ref, bb = _bb(), _bb(compile=True, compile_backend="aot_eager")
    x, s, c = _inputs(ref)
    with torch.no_grad():
        for role in ("generator", "teacher", "fake_score", "generator"):  # adapter switches between graphs
            assert torch.allclose(bb.velocity(x, s, c, role=role), ref.velocity(x, s, c, role=role), atol=1e-5)


def test_bf16_weights_keep_fp32_sampler_math():
    """bf16 transformer under autocast; velocities, transitions and log-probs stay float32."""
    from fewstep_rl.sampling.transitions import step_log_prob, transition_step

    bb = _bb(torch.bfloat16)
    x, s, c = _inputs(bb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = bb.velocity(x, s, c, role="generator")
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        x1, mean, std = transition_step("flow_sde(0.7)", x, s, s - 0.2, v, z)
        lp = step_log_prob(x1, mean, std)
    assert v.dtype == x1.dtype == lp.dtype == torch.float32
    x1b, meanb, stdb = transition_step("flow_sde(0.7)", x, s, s - 0.2, v, z)  # same math outside autocast
    assert torch.equal(lp, step_log_prob(x1b, meanb, stdb))
    ref = step_log_prob(x1b.double(), meanb.double(), stdb.double())
    assert torch.allclose(lp.double(), ref, rtol=1e-5)


@pytest.mark.parametrize("world", ["sd3", "flux", "flux2", "zimage", "qwen_image"])
def test_every_image_world_takes_and_applies_the_speed_flags(world):
    """One typed base (SpeedFlags) for every image world's config; build_backbone installs the flags on whatever
    backbone the world builds (here the in-memory factory hook's)."""
    import types

    from fewstep_rl.perf.speed import SpeedFlags
    from fewstep_rl.run import resolve

    r = resolve("dmd2", world, (), {"world.path": ".", "world.prompts": __file__, "world.attention_backend": "math",
                                    "world.grad_checkpointing": True})
    assert isinstance(r.world, SpeedFlags)
    assert (r.world.attention_backend, r.world.grad_checkpointing, r.world.compile) == ("math", True, False)
    w = r.world_cls(r.world)
    inner = lambda x, sigma, cond, role: x  # noqa: E731
    bb = types.SimpleNamespace(_predict=inner)
    w.backbone_factory = lambda: bb
    assert w.build_backbone() is bb and bb._predict is not inner  # wrapped by apply_speed
    assert torch.equal(bb._predict(torch.ones(2), torch.zeros(2), {}, None), torch.ones(2))
