"""Unit tests for fewstep_rl.objectives (methods.md §1.3–§1.5, §2.3, §2.4, §6.2) with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep_rl.objectives import (
    advantages_to_unit,
    ambient_coeffs,
    ambient_dsm_loss,
    ambient_renoise,
    ambient_velocity_target,
    anchored_target,
    consistency_loss,
    consistency_mse,
    cps_transport,
    direction_loss,
    dmd_grad_direction,
    dmd_loss,
    flow_matching_loss,
    group_advantages,
    mean_kl,
    multi_reward_advantages,
    nonzero_mask,
    ppo_clip_loss,
    regime_advantages,
    reward_hinge,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def f64(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---- DMD (§1.4) -----------------------------------------------------------------------------------------------


def test_dmd_loss_hand_and_grad():
    """y = [1, 2], ŷT = [0, 0], ŷF = [1, 3]: norm = mean|y-ŷT| = 1.5, g = [1, 3]/1.5 = [2/3, 2];
    L = ½·mean(g²) = ½·(4/9 + 4)/2 = 10/9; ∂L/∂y = g/numel = [1/3, 1]."""
    y = torch.tensor([[1.0, 2.0]], requires_grad=True)
    loss = dmd_loss(y, torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(10 / 9, rel=1e-6)
    loss.backward()
    assert torch.allclose(y.grad, torch.tensor([[1 / 3, 1.0]]))


def test_dmd_loss_grad_equals_g_over_numel():
    g = gen(0)
    y = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    yf, yt = (
        torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
    )
    dmd_loss(y, yf, yt).backward()
    assert torch.allclose(y.grad, dmd_grad_direction(y, yf, yt) / y.numel(), atol=1e-15)


def test_dmd_loss_zero_normaliser_is_zero():
    """Sample 0 has y == ŷT (norm 0 → g non-finite → 0); sample 1: g = [1, 1]/1 → L = ½·(0+0+1+1)/4 = 0.25."""
    y = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    yt = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    yf = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    loss = dmd_loss(y, yf, yt)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert torch.isfinite(y.grad).all() and torch.equal(y.grad[0], torch.zeros(2))


# ---- fake score flow matching --------------------------------------------------------------------------------


def test_flow_matching_loss_hand():
    """v = [1, 1], ε - x0 = [1, -1]: err = [0, 4] → 2; with weight 0.5 → 1."""
    v, x0, eps = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert flow_matching_loss(v, x0, eps).item() == pytest.approx(2.0)
    assert flow_matching_loss(v, x0, eps, torch.tensor([0.5])).item() == pytest.approx(1.0)


# ---- ambient kernels (§1.3) ------------------------------------------------------------------------------------


def test_ambient_coeffs_hand():
    """t = 0.5, s = 0.25: a = 0.5/0.75 = 2/3; b = √(0.25 - (4/9)(1/16)) = √(8/36) = √8/6 ≈ 0.4714045."""
    a, b = ambient_coeffs(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    assert a.item() == pytest.approx(2 / 3)
    assert b.item() == pytest.approx(math.sqrt(8) / 6)
    # s = 0: a = 1-t, b = t (clean forward kernel); t = s: b = 0
    a0, b0 = ambient_coeffs(torch.tensor([0.3]), torch.tensor([0.0]))
    assert a0.item() == pytest.approx(0.7) and b0.item() == pytest.approx(0.3)
    assert ambient_coeffs(torch.tensor(0.4), torch.tensor(0.4))[1].item() == 0.0


def test_ambient_renoise_hand():
    """x_t = (2/3)·1 + (√8/6)·1 at t=0.5, s=0.25."""
    out = ambient_renoise(f64([1.0]), f64([1.0]), 0.5, 0.25)
    assert out.item() == pytest.approx(2 / 3 + math.sqrt(8) / 6)


def test_ambient_target_hand():
    """t=0.5, s=0.25, x_s=1, n=1: -1/0.75 + (0.5 + 0.5·0.0625/0.5625)/b
    = -1.333333 + 0.555556/0.4714045 = -0.1548220."""
    u = ambient_velocity_target(f64([1.0]), f64([1.0]), 0.5, 0.25)
    expected = -1 / 0.75 + (0.5 + 0.5 * 0.0625 / 0.5625) / (math.sqrt(8) / 6)
    assert u.item() == pytest.approx(expected) and expected == pytest.approx(-0.154822, abs=1e-6)


def test_ambient_target_reduces_to_flow_matching_at_s0():
    g = gen(1)
    x0, n = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    s = torch.zeros(5, dtype=torch.float64)
    assert torch.allclose(ambient_velocity_target(x0, n, t, s), n - x0, atol=1e-12)
    assert torch.allclose(ambient_renoise(x0, n, t, s), (1 - t[:, None]) * x0 + t[:, None] * n, atol=1e-12)


def test_ambient_renoise_gives_forward_marginal_mc():
    """x0 ~ N(m=1.5, τ²=0.25); x_s forward at s=0.3; x_t = a x_s + b n at t=0.7 must be N((1-t)m, (1-t)²τ² + t²):
    mean 0.45, var 0.09·0.25 + 0.49 = 0.5125."""
    g = gen(2)
    n_mc, m, tau, s, t = 400_000, 1.5, 0.5, 0.3, 0.7
    x0 = m + tau * torch.randn(n_mc, 1, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(n_mc, 1, generator=g, dtype=torch.float64)
    x_t = ambient_renoise(x_s, torch.randn(n_mc, 1, generator=g, dtype=torch.float64), t, s)
    assert x_t.mean().item() == pytest.approx(0.45, abs=0.01)
    assert x_t.var().item() == pytest.approx(0.5125, abs=0.01)


def test_ambient_target_conditional_mean_is_marginal_velocity_mc():
    """For x0 ~ N(m, τ²) the marginal velocity is linear: u(x) = -m + c·(x - (1-t)m), c = (t - (1-t)τ²)/V,
    V = (1-t)²τ² + t². With m=1, τ=0.5, t=0.6, s=0.3: V = 0.16·0.25 + 0.36 = 0.4, c = (0.6 - 0.1)/0.4 = 1.25,
    so u(x) = -1 + 1.25(x - 0.4) = 1.25x - 1.5. Least-squares regression of u_amb on x_t must recover (1.25, -1.5)."""
    g = gen(3)
    n_mc, m, tau, s, t = 400_000, 1.0, 0.5, 0.3, 0.6
    x0 = m + tau * torch.randn(n_mc, 1, generator=g, dtype=torch.float64)
    x_s = (1 - s) * x0 + s * torch.randn(n_mc, 1, generator=g, dtype=torch.float64)
    n = torch.randn(n_mc, 1, generator=g, dtype=torch.float64)
    x_t = ambient_renoise(x_s, n, t, s)
    u = ambient_velocity_target(x_s, n, t, s)
    design = torch.cat([x_t, torch.ones_like(x_t)], dim=1)
    slope, intercept = torch.linalg.lstsq(design, u).solution.flatten().tolist()
    assert slope == pytest.approx(1.25, abs=0.03)
    assert intercept == pytest.approx(-1.5, abs=0.03)
    # the analytic marginal velocity also beats a shifted predictor under the (scale-out) ambient loss
    v_opt = 1.25 * x_t - 1.5
    tt, ss = torch.full((n_mc,), t, dtype=torch.float64), torch.full((n_mc,), s, dtype=torch.float64)
    assert ambient_dsm_loss(v_opt, x_s, n, tt, ss) < ambient_dsm_loss(v_opt + 0.1, x_s, n, tt, ss)


def test_ambient_dsm_loss_weights():
    """t=0.5, s=0.25: b² = 8/36 → 10b² = 2.22 → weight 1: loss = (0 - (-0.154822))² = 0.0239699.
    t=0.3, s=0.25: a = 0.7/0.75, b² = 0.09 - a²·0.0625 = 0.0355556 → weight 10b² = 0.355556."""
    x_s, n, v = f64([1.0]), f64([1.0]), f64([0.0])
    u = -1 / 0.75 + (0.5 + 0.5 * 0.0625 / 0.5625) / (math.sqrt(8) / 6)
    assert ambient_dsm_loss(v, x_s, n, 0.5, 0.25).item() == pytest.approx(u**2)
    assert ambient_dsm_loss(v, x_s, n, 0.5, 0.25, scale_out=False).item() == pytest.approx(u**2)
    plain = ambient_dsm_loss(v, x_s, n, 0.3, 0.25, scale_out=False)
    scaled = ambient_dsm_loss(v, x_s, n, 0.3, 0.25)
    b2 = 0.09 - (0.7 / 0.75) ** 2 * 0.0625
    assert b2 == pytest.approx(0.0355556, abs=1e-7)
    assert scaled.item() == pytest.approx(10 * b2 * plain.item())
    # b = 0 (t = s): scale-out form stays finite, = 10·(0·v - c·n)² with c = 0.25 + 0.75·0.0625/0.5625 = 1/3
    assert ambient_dsm_loss(v, x_s, n, 0.25, 0.25).item() == pytest.approx(10 / 9)


def test_cps_transport_hand_and_shared_noise_difference():
    """x_t=1, v=2, t=0.5, s=0.25, z=1, η=0.5: 0.25√2 + 0.125√2 = 0.375√2.
    Shared z: x̂F - x̂T = [s cosθ (1-t) - t(1-s)](vF - vT)."""
    one = f64([1.0])
    assert cps_transport(one, f64([2.0]), 0.5, 0.25, one, 0.5).item() == pytest.approx(0.375 * math.sqrt(2))
    g = gen(4)
    x_t, z = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    v_f, v_t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t, s, eta = 0.7, 0.4, 0.9
    diff = cps_transport(x_t, v_f, t, s, z, eta) - cps_transport(x_t, v_t, t, s, z, eta)
    coef = s * math.cos(eta * math.pi / 2) * (1 - t) - t * (1 - s)
    assert torch.allclose(diff, coef * (v_f - v_t), atol=1e-12)


def test_anchored_target_hand():
    """(x_τ - x̂0)/τ = (1.0 - 0.2)/0.4 = 2; x_τ - τ·u = x̂0."""
    assert anchored_target(f64([1.0]), f64([0.2]), 0.4).item() == pytest.approx(2.0)
    x_tau, x0 = f64([0.3], [-1.0]), f64([1.0], [2.0])  # (B=2, 1)
    tau = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(x_tau - tau[:, None] * anchored_target(x_tau, x0, tau), x0)


# ---- consistency (§2.3) ---------------------------------------------------------------------------------------


def test_consistency_loss_hand():
    """h0 = 0, h1 = [1, 2], h2 = [3, -1]: mean(1·3, 2·(-1)) = 0.5; mse(h0, h1) = (1 + 4)/2 = 2.5."""
    h0, h1, h2 = torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    assert consistency_loss(h0, h1, h2).item() == pytest.approx(0.5)
    assert consistency_mse(h0, h1).item() == pytest.approx(2.5)


def test_consistency_loss_nonfinite_masked():
    h1 = torch.tensor([[1.0, float("inf")]], requires_grad=True)
    h2 = torch.tensor([[3.0, 1.0]], requires_grad=True)
    loss = consistency_loss(torch.zeros(1, 2), h1, h2)
    assert loss.item() == pytest.approx(1.5)  # mean(3, 0)
    loss.backward()
    assert torch.isfinite(h1.grad).all() and torch.isfinite(h2.grad).all()


def test_consistency_estimator_unbiased_mc():
    """h1, h2 iid N(μ=0.5, 1), h0 = 0: E[(h1-h0)(h2-h0)] = μ² = 0.25 (unbiased), while the MSE has
    E[(h1-h0)²] = μ² + 1 = 1.25 (biased by the variance)."""
    g = gen(5)
    h1 = 0.5 + torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    h2 = 0.5 + torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    h0 = torch.zeros_like(h1)
    assert consistency_loss(h0, h1, h2).item() == pytest.approx(0.25, abs=0.02)
    assert consistency_mse(h0, h1).item() == pytest.approx(1.25, abs=0.02)


# ---- advantages (§1.5) ----------------------------------------------------------------------------------------


def test_group_advantages_global_std_hand():
    """r = [1, 2, 3 | 10, 10, 10]: group means 2, 10; global pop. std: mean 6, squared devs 25+16+9+3·16 = 98,
    var 98/6, std = 4.0414519; A = [-1, 0, 1, 0, 0, 0]/(std + 1e-4)."""
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    ids = torch.tensor([7, 7, 7, 3, 3, 3])
    a = group_advantages(r, ids)
    d = math.sqrt(98 / 6) + 1e-4
    assert torch.allclose(a, torch.tensor([-1 / d, 0.0, 1 / d, 0.0, 0.0, 0.0]))
    assert torch.equal(a[3:], torch.zeros(3))


def test_group_advantages_group_std_and_clip():
    """Group 0 pop. std = √(2/3) = 0.8164966 → ±1/(0.8164966 + 1e-4) = ±1.2245948; group 1 zero spread → 0;
    clip=1 → ±1."""
    r = torch.tensor([1.0, 2.0, 3.0, 0.1, 0.1, 0.1])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, ids, std="group", clip=None)
    v = 1 / (math.sqrt(2 / 3) + 1e-4)
    assert torch.allclose(a, torch.tensor([-v, 0.0, v, 0.0, 0.0, 0.0]))
    assert torch.equal(a[3:], torch.zeros(3))  # exactly zero despite 0.1 not being representable
    assert torch.equal(group_advantages(r, ids, std="group", clip=1.0), torch.tensor([-1.0, 0.0, 1.0, 0, 0, 0]))
    with pytest.raises(ValueError):
        group_advantages(r, ids, std="batch")  # type: ignore[arg-type]


def test_multi_reward_normalise_then_sum_hand():
    """ids [0,0,1,1]; r1 = [1,2,3,4]: centred [-.5,.5,-.5,.5], pop std √1.25 → A1 = ±0.5/(√1.25+1e-4).
    r2 = [0,0,5,1]: centred [0,0,2,-2], pop std √4.25 → A2 = [0,0,2,-2]/(√4.25+1e-4).
    S = 1·A1 + 0.5·A2; A = S/(popstd(S) + 1e-4) (mean of S is 0 by construction)."""
    ids = torch.tensor([0, 0, 1, 1])
    r1, r2 = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 0.0, 5.0, 1.0])
    a1 = [x / (math.sqrt(1.25) + 1e-4) for x in (-0.5, 0.5, -0.5, 0.5)]
    a2 = [x / (math.sqrt(4.25) + 1e-4) for x in (0.0, 0.0, 2.0, -2.0)]
    s = [p + 0.5 * q for p, q in zip(a1, a2)]
    sd = math.sqrt(sum(x * x for x in s) / 4)
    expected = torch.tensor([x / (sd + 1e-4) for x in s])
    out = multi_reward_advantages({"r1": r1, "r2": r2}, {"r1": 1.0, "r2": 0.5}, ids)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(multi_reward_advantages({"r1": r1, "r2": r2}, [1.0, 0.5], ids), expected, atol=1e-6)
    with pytest.raises(ValueError):
        multi_reward_advantages({"r1": r1}, {"r2": 1.0}, ids)
    with pytest.raises(ValueError):
        multi_reward_advantages({"r1": r1}, [1.0, 2.0], ids)


def test_regime_advantages_paper_and_tilt():
    """paper = group_advantages(global std, clip); tilt: leave-one-out r = [1, 2, 3 | 4, 4, 7]: 1 − 2.5 = −1.5,
    2 − 2 = 0, 3 − 1.5 = 1.5 | 4 − 5.5 = −1.5, −1.5, 7 − 4 = 3 (unclipped, reward units)."""
    r, ids = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0]), torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.equal(regime_advantages(r, ids, "paper", 0.5), group_advantages(r, ids, std="global", clip=0.5))
    assert torch.equal(regime_advantages(r, ids, "tilt", 0.5), torch.tensor([-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]))
    with pytest.raises(ValueError, match="regime"):
        regime_advantages(r, ids, "beta", 1.0)  # type: ignore[arg-type]


class _Ranks:
    """Two data-parallel ranks seen from rank 1: ``all_gather`` stacks rank 0's ``other`` and this rank's tensor."""

    def __init__(self, others):
        self._trainer = type("T", (), {"world_size": 2})()
        self.global_rank, self.others = 1, list(others)

    def all_gather(self, x):
        return torch.stack([self.others.pop(0), x])


def test_over_ranks_applies_the_batch_function_and_keeps_this_ranks_rows():
    """Rank 0 holds rewards [1, 2] (group 0), rank 1 [3, 10] (groups 0, 1): the group-0 mean 2 uses every rank."""
    from fewstep_rl.distributed import gather_rows, over_ranks

    m = _Ranks([torch.tensor([1.0, 2.0]), torch.tensor([0, 0])])
    centred = over_ranks(m, lambda r, g: r - torch.stack([r[g == k].mean() for k in g]), torch.tensor([3.0, 10.0]),
                         torch.tensor([0, 1]))
    assert torch.equal(centred, torch.tensor([1.0, 0.0]))
    m = _Ranks([torch.zeros(2, 3)])  # per-sample rows of any width (RTDMD's per-step advantages)
    assert torch.equal(over_ranks(m, lambda x: x + 1, torch.ones(2, 3)), torch.full((2, 3), 2.0))
    assert torch.equal(gather_rows(_Ranks([torch.zeros(2, 3)]), torch.ones(2, 3)), torch.cat([torch.zeros(2, 3),
                                                                                                torch.ones(2, 3)]))
    single = type("M", (), {"_trainer": None})()
    assert torch.equal(over_ranks(single, lambda x: 2 * x, torch.ones(3)), torch.full((3,), 2.0))


def test_advantages_to_unit_and_nonzero_mask():
    """clip(A, ±5)/10 + ½: [-10, -5, 0, 2.5, 5] → [0, 0, 0.5, 0.75, 1]."""
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0])
    assert torch.allclose(advantages_to_unit(a), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))
    assert nonzero_mask(a).tolist() == [True, True, False, True, True]


# ---- PPO (§2.4, §6.2) -----------------------------------------------------------------------------------------


def test_ppo_clip_loss_hand():
    """ρ = [1, 2], A = [1, 1], ε = 0.2: max(-1, -1) = -1, max(-2, -1.2) = -1.2 → mean -1.1; clip frac 0.5;
    approx_kl = ½·mean(0, log²2) = log²2/4."""
    lp = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    loss, m = ppo_clip_loss(lp, torch.zeros(2), torch.ones(2), 0.2)
    assert loss.item() == pytest.approx(-1.1)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.5)
    assert m["approx_kl"].item() == pytest.approx(math.log(2) ** 2 / 4)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-0.5, 0.0])  # clipped sample has zero gradient


def test_ppo_negative_advantage_and_asymmetric_clip():
    """A = -1, ρ = 2: max(2, 1.2) = 2 (pessimistic). A = 1, ρ = 2, ε_hi = 0.5: max(-2, -1.5) = -1.5."""
    lp = torch.tensor([math.log(2.0)])
    assert ppo_clip_loss(lp, torch.zeros(1), -torch.ones(1), 0.2)[0].item() == pytest.approx(2.0)
    assert ppo_clip_loss(lp, torch.zeros(1), torch.ones(1), 0.2, 0.5)[0].item() == pytest.approx(-1.5)


def test_ppo_ratio_exactly_one_on_policy():
    g = gen(6)
    old = torch.randn(8, generator=g)
    adv = torch.randn(8, generator=g)
    loss, m = ppo_clip_loss(old.clone().requires_grad_(True), old, adv, 1e-5)
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac"].item() == 0.0
    assert torch.equal(loss.detach(), (-adv).mean())


def test_mean_kl_hand():
    """μ - μref = [1, 2], std = 0.5: mean(1, 4)/(2·0.25) = 2.5/0.5 = 5; std = 0 samples contribute 0."""
    assert mean_kl(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor([[0.5]])).item() == pytest.approx(5.0)
    mu = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    assert mean_kl(mu, torch.zeros(2, 2), torch.tensor([[0.5], [0.0]])).item() == pytest.approx(2.5)


# ---- reward hinge / direction (§2.4, §1.4) --------------------------------------------------------------------


def test_reward_hinge_hand():
    """r = [1, 4], margin 3, scale 0.1: ReLU(2), ReLU(-1) → mean 1 → 0.1."""
    r = torch.tensor([1.0, 4.0], requires_grad=True)
    loss = reward_hinge(r, 3.0, 0.1)
    assert loss.item() == pytest.approx(0.1)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-0.05, 0.0])


def test_direction_loss_hand():
    """y = [1, 2], d = [1, -1], w = 2: (d²)/w = [0.5, 0.5] → 0.5; ∂/∂y = -2d/(w·numel) = [-0.5, 0.5].
    Pseudo-Huber c = 1: (√(1+1) - 1)/2 = 0.2071068."""
    y = torch.tensor([[1.0, 2.0]], requires_grad=True)
    d = torch.tensor([[1.0, -1.0]])
    loss = direction_loss(y, d, torch.tensor([2.0]))
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert y.grad.tolist() == [pytest.approx([-0.5, 0.5])]
    assert direction_loss(y, d, torch.tensor([2.0]), huber_c=1.0).item() == pytest.approx((math.sqrt(2) - 1) / 2)
    assert direction_loss(y, d).item() == pytest.approx(1.0)
