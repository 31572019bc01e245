"""TDM-R1 (methods/tdm_r1.py): DGPO loss by hand, time sampling, gradient isolation, toy2d region behaviour."""

import math
from pathlib import Path

import pytest
import torch

from fewstep_rl.config import ConfigError
from fewstep_rl.objectives.dgpo import dgpo_group_weights, dgpo_keep_mask, dgpo_loss
from fewstep_rl.run import build_method, resolve
from fewstep_rl.sampling.tdm_times import level_above, weighted_step

METHOD = "fewstep_rl.methods.tdm_r1:TDMR1"
PRESET = Path(__file__).resolve().parents[1] / "configs" / "tdm_r1" / "toy2d_region.yaml"


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------- DGPO by hand
L_THETA = [1.0, 2.0, 0.5, 1.5]
L_REF = [1.5, 1.0, 1.0, 1.0]
ADV = [1.0, -1.0, 2.0, -2.0]
GROUP = [7, 7, 3, 3]


def test_dgpo_loss_matches_hand_computed_values():
    # group 7: mean A(ℓ−ℓ_ref) = (1·(−0.5) + (−1)·1.0)/2 = −0.75 → ω = σ(2·−0.75) = σ(−1.5)
    # group 3: (2·(−0.5) + (−2)·0.5)/2 = −1 → ω = σ(−2)
    w7, w3 = _sig(-1.5), _sig(-2.0)
    assert w7 == pytest.approx(0.18242552380635635) and w3 == pytest.approx(0.11920292202211755)
    lt = torch.tensor(L_THETA, dtype=torch.float64, requires_grad=True)
    loss, m = dgpo_loss(
        lt,
        torch.tensor(L_REF, dtype=torch.float64),
        torch.tensor(ADV, dtype=torch.float64),
        torch.tensor(GROUP),
        beta=2.0,
    )
    expected = (w7 * 1 * 1.0 + w7 * -1 * 2.0 + w3 * 2 * 0.5 + w3 * -2 * 1.5) / 4
    assert expected == pytest.approx(-0.10520784196264785)
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert lt.grad.tolist() == pytest.approx([w7 / 4, -w7 / 4, 2 * w3 / 4, -2 * w3 / 4], rel=1e-12)
    assert float(m["omega_mean"]) == pytest.approx((w7 + w3) / 2)
    w = dgpo_group_weights(
        lt, torch.tensor(L_REF, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64), torch.tensor(GROUP), 2.0
    )
    assert w.tolist() == pytest.approx([w7, w7, w3, w3])


def test_dgpo_trust_region_and_reference_masks():
    lt = torch.tensor(L_THETA, dtype=torch.float64, requires_grad=True)
    ref, adv, grp = (
        torch.tensor(L_REF, dtype=torch.float64),
        torch.tensor(ADV, dtype=torch.float64),
        torch.tensor(GROUP),
    )
    # ρ = exp(ℓ_old − ℓ_θ) = [e^0.2, 1, 1, e^-0.2]: sample 0 (A>0, ρ>1+ε) and 3 (A<0, ρ<1−ε) are clipped
    old = torch.tensor([1.2, 2.0, 0.5, 1.3], dtype=torch.float64)
    drift = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)  # below the threshold: no reference mask
    keep, trust, refm = dgpo_keep_mask(lt, ref, adv, old, 0.05, drift, 0.05)
    assert trust.tolist() == [True, False, False, True] and not refm.any()
    loss, m = dgpo_loss(
        lt, ref, adv, grp, 2.0, l_old=old, clip_eps=0.05, drift=drift, drift_threshold=0.05, drift_weight=0.5
    )
    w7, w3 = _sig(-1.5), _sig(-2.0)
    # the value is unchanged by masking (stop-gradient only) plus 0.5·R
    assert float(loss) == pytest.approx(-0.10520784196264785 + 0.5 * 0.01, rel=1e-12)
    loss.backward()
    assert lt.grad.tolist() == pytest.approx([0.0, -w7 / 4, 2 * w3 / 4, 0.0], rel=1e-12)
    assert float(drift.grad) == pytest.approx(0.5)
    assert float(m["trust_masked"]) == 0.5
    # drift above the threshold: every sample here already moved the preferred way → all gradients stopped
    lt2 = torch.tensor(L_THETA, dtype=torch.float64, requires_grad=True)
    loss2, m2 = dgpo_loss(lt2, ref, adv, grp, 2.0, drift=torch.tensor(0.1, dtype=torch.float64), drift_threshold=0.05)
    loss2.backward()
    assert lt2.grad.abs().max() == 0 and float(m2["ref_masked"]) == 1.0


def test_tilt_regression_loss_hand_values_and_minimiser():
    from fewstep_rl.objectives.dgpo import tilt_regression_loss

    # B = 2, d = 1: targets 0 + 2·(1 − 0.5)/0.5 = 2 and 0 + (−1)·(3 − 0.5)/0.5 = −5; v_φ = (1, 1): ((1−2)² + (1+5)²)/2
    v_phi = torch.tensor([[1.0], [1.0]], requires_grad=True)
    z, u, vg = torch.zeros(2, 1), torch.tensor([[1.0], [3.0]]), torch.full((2, 1), 0.5)
    loss = tilt_regression_loss(v_phi, z, u, vg, torch.tensor([2.0, -1.0]), 0.5)
    assert float(loss) == pytest.approx((1 + 36) / 2)
    loss.backward()  # only v_φ receives a gradient: 2(v − target)/B
    assert v_phi.grad.flatten().tolist() == pytest.approx([-1.0, 6.0])
    # at one x_t: the minimiser is v_ref + Cov(A, u)/β whatever E[A] is (here E[A] = −3 < −β: the weighted DSM
    # mean(A·ℓ) + β‖v − v_ref‖² is unbounded below there)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(200_000, 1, generator=g)
    a = -3.0 + 0.8 * u[:, 0] + 0.3 * torch.randn(200_000, generator=g)
    v = torch.zeros(1, 1, requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        tilt_regression_loss(v.expand(200_000, 1), torch.zeros(1, 1), u, u.mean(0, keepdim=True), a, 0.25).backward()
        opt.step()
    cov = float(((a - a.mean()) * (u[:, 0] - u.mean())).mean())
    assert float(v) == pytest.approx(cov / 0.25, rel=1e-3)


def test_dgpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must all be"):
        dgpo_loss(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4), 1.0)


# ---------------------------------------------------------------------------------------------- time sampling
def test_level_above_hand_values():
    # shift 3, lower 0.5: S^-1(0.5) = 0.25, + 0.02 = 0.27 → u = 0 gives S(0.27) = 0.81/1.54; u = 1 gives 1
    u = torch.tensor([0.0, 1.0, 0.5])
    tau = level_above(torch.tensor(0.5), u, shift=3.0, margin=0.02)
    pre = 0.27 + 0.5 * 0.73
    assert tau.tolist() == pytest.approx([0.81 / 1.54, 1.0, 3 * pre / (1 + 2 * pre)], rel=1e-6)
    assert bool((level_above(torch.zeros(3), torch.rand(3), 1.0) >= 0.02).all())
    with pytest.raises(ValueError, match="lower bounds"):
        level_above(torch.tensor(1.5), u)


def test_weighted_step_frequencies():
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([weighted_step(4, g) for _ in range(4000)]), minlength=4).double() / 4000
    assert counts.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.025)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method.micro_batches", 3, "whole groups"),
        ("method.group_size", 1, "group_size"),
        ("method.train_steps", 5, "train_steps"),
        ("method.tdm_weight", 1.5, "tdm_weight"),
        ("method.reward_steps", 7, "j_trunc"),
    ],
)
def test_bad_config_is_rejected(key, value, match):
    with pytest.raises(ConfigError, match=match):
        resolve(METHOD, "toy2d", (str(PRESET),), {key: value})


# ---------------------------------------------------------------------------------------------- gradient isolation
def _module(**over):
    module = build_method(resolve(METHOD, "toy2d", (str(PRESET),), {"world.hidden": 32, **over}))
    module.configure_model()
    return module


def test_surrogate_never_receives_gradients_from_the_generator_loss():
    torch.manual_seed(0)
    module = _module()
    bb = module.backbone
    with torch.no_grad():  # a non-trivial surrogate, so the reward direction is non-zero
        for p in bb.role_parameters("surrogate"):
            p.add_(0.3 * torch.randn_like(p))
    prompts = ["left", "right"] * 8
    cond = bb.encode_prompts(prompts)
    group = torch.arange(16) // 4
    x = torch.randn(16, 2)
    sigma, s_next = torch.full((16,), 0.75), torch.full((16,), 0.5)

    def gen_grad():
        for p in bb.parameters():
            p.grad = None
        v = bb.velocity(x, sigma, cond, "generator")
        x0 = x - 0.75 * v
        x_next = (x - 0.25 * v).detach()
        loss, m = module.generator_loss(x0, x_next, s_next, 0, cond, group, "t")
        loss.backward()
        return loss, m

    loss, m = gen_grad()
    assert float(m["generator/d_rl_norm"]) > 0
    for role in ("surrogate", "old_surrogate", "fake_score", "ema"):
        assert all(p.grad is None for p in bb.role_parameters(role)), f"{role} got a gradient from the generator loss"
    g1 = [p.grad.clone() for p in bb.role_parameters("generator")]
    assert any(bool(g.abs().sum() > 0) for g in g1)
    # the reward reaches the generator only through the surrogate: changing the surrogate changes the gradient
    with torch.no_grad():
        for p in bb.role_parameters("surrogate"):
            p.mul_(-1.0)
    gen_grad()
    g2 = [p.grad for p in bb.role_parameters("generator")]
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2))
    for role in ("surrogate", "old_surrogate", "fake_score"):
        assert all(p.grad is None for p in bb.role_parameters(role))


def test_group_shared_noise_is_identical_within_groups_only():
    module = _module()
    group = torch.tensor([4, 4, 4, 9, 9, 9])
    n = module.shared_noise(group, 2, "tag", torch.zeros(6, 2))
    assert torch.equal(n[0], n[1]) and torch.equal(n[1], n[2]) and torch.equal(n[3], n[5])
    assert not torch.equal(n[0], n[3])
    assert torch.equal(n, module.shared_noise(group, 2, "tag", torch.zeros(6, 2)))
    assert not torch.equal(n, module.shared_noise(group, 3, "tag", torch.zeros(6, 2)))


# ---------------------------------------------------------------------------------------------- behaviour on toy2d
def _fit(tmp_path, steps, **over):
    from fewstep_rl.run import assemble

    overrides = {
        "trainer.max_steps": steps,
        "trainer.run_dir": str(tmp_path),
        "trainer.progress_bar": False,
        "trainer.eval_every": 0,
        **over,
    }
    module, dm, trainer = assemble(resolve(METHOD, "toy2d", (str(PRESET),), overrides), tmp_path, [])
    trainer.fit(module, datamodule=dm)
    import json

    return module, json.loads((tmp_path / "final_metrics.json").read_text())


def _teacher_energy_to_tilted(module, n):
    """Energy distance of exact teacher samples to the tilted target (same seed as the run's evaluation)."""
    from fewstep_rl.eval.generate import cycle_prompts

    world = module.world
    prompts = cycle_prompts(world.eval_prompts, n)
    x = world.sample_teacher(prompts, torch.Generator().manual_seed(1))
    return world.evaluate(x, prompts, module.rewards, module.cfg.beta, torch.Generator().manual_seed(2))


def test_region_reward_moves_mass_into_the_region(tmp_path):
    """A short run: the black-box region reward (only through the surrogate) raises the in-region mass."""
    module, fm = _fit(tmp_path, 200, **{"trainer.eval_samples": 2000})
    assert fm["teacher_region_mass"] == pytest.approx(0.5, abs=0.05)
    assert fm["region_mass"] > fm["teacher_region_mass"] + 0.15
    assert module.updates == {"generator": 200, "fake_score": 200, "surrogate": 200}


@pytest.mark.slow
def test_region_reward_reaches_the_tilted_target(tmp_path):
    """Full preset: mass toward the tilted target's, energy distance to the tilted target below the teacher's."""
    module, fm = _fit(tmp_path, 400)
    teacher = _teacher_energy_to_tilted(module, 4000)
    target, trained, base = fm["tilted_region_mass"], fm["region_mass"], fm["teacher_region_mass"]
    assert abs(trained - target) < 0.5 * abs(base - target)
    assert fm["energy_tilted"] < teacher["energy_tilted"]


@pytest.mark.parametrize("regime", ["paper", "tilt"])
def test_fake_and_generator_losses_share_the_step_level(tmp_path, monkeypatch, regime):
    """methods.md §4.5: one τ_j per trained step for both the fake and the generator loss (per sample here)."""
    from fewstep_rl.methods.tdm_r1 import TDMR1

    seen: dict[str, list[torch.Tensor]] = {"fake": [], "gen": []}
    fake, gen = TDMR1.fake_loss, TDMR1.generator_loss

    def fake_spy(self, *args, **kwargs):
        seen["fake"].append(args[5].clone())
        return fake(self, *args, **kwargs)

    def gen_spy(self, *args, **kwargs):
        seen["gen"].append(args[7].clone())
        return gen(self, *args, **kwargs)

    monkeypatch.setattr(TDMR1, "fake_loss", fake_spy)
    monkeypatch.setattr(TDMR1, "generator_loss", gen_spy)
    _fit(tmp_path, 2, **{"world.hidden": 32, "method.batch_size": 4, "method.group_size": 4,
                         "method.regime": regime, "trainer.eval_samples": 16})
    assert len(seen["fake"]) == len(seen["gen"]) == 2 * 2  # 2 iterations × train_steps 2
    for a, b in zip(seen["fake"], seen["gen"]):
        assert torch.equal(a, b)
    assert not torch.equal(seen["fake"][0], seen["fake"][1])  # fresh levels per step
