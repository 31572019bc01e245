"""Unit tests for fewstep_rl.sampling (methods.md §1.1, §1.2, §2.3, §2.4, §7.4, §7.5) with hand-computed values."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from fewstep_rl.sampling import (
    NoiseSource,
    Transition,
    ambient_renoise_levels,
    eps_from_v,
    expand_sigma,
    flux_mu,
    forward_noise,
    group_noise,
    randn,
    random_stop,
    recompute_log_prob,
    sample,
    sample_interval,
    sample_logit_normal,
    sample_uniform,
    score_from_v,
    shift_dynamic,
    shift_static,
    sigma_grid,
    stable_hash,
    step_log_prob,
    transition_mean_std,
    transition_step,
    unshift_static,
    v_from_eps,
    v_from_x0,
    x0_from_v,
)

TRANSITIONS = ["euler", "cps(0.9)", "flow_sde(0.7)", "dance_sde(0.3)"]
MODES = ["gaussian", "cps_mse"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t(*vals: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(vals, dtype=dtype)


class TinyVelocity(torch.nn.Module):
    """Small deterministic nonlinear velocity net on (B, 2, 3) inputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(7, 16)
        self.l2 = torch.nn.Linear(16, 6)
        g = gen(seed)  # re-initialise from an explicit generator (no global RNG)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.reshape(x.shape[0], -1), sigma.reshape(-1, 1).to(x.dtype)], dim=1)
        return self.l2(torch.tanh(self.l1(h))).reshape(x.shape)


# ---- param (§1.1) ---------------------------------------------------------------------------------------------


def test_expand_sigma_shapes():
    x = torch.zeros(3, 2, 5)
    assert expand_sigma(0.5, x).shape == ()
    assert expand_sigma(torch.tensor([0.1, 0.2, 0.3]), x).shape == (3, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        expand_sigma(torch.tensor([0.1, 0.2]), x)


def test_param_conversions_hand_values():
    """x=1, σ=0.25, v=2: x̂0 = 1-0.25·2 = 0.5; ε̂ = 1+0.75·2 = 2.5; score = -2.5/0.25 = -10;
    v_from_x0 = (1-0.5)/0.25 = 2; v_from_eps = (2.5-1)/0.75 = 2; forward(0.5, 2.5, 0.25) = 0.375+0.625 = 1."""
    x, v = t(1.0), t(2.0)
    assert x0_from_v(x, 0.25, v).item() == pytest.approx(0.5)
    assert eps_from_v(x, 0.25, v).item() == pytest.approx(2.5)
    assert score_from_v(x, 0.25, v).item() == pytest.approx(-10.0)
    assert v_from_x0(x, 0.25, t(0.5)).item() == pytest.approx(2.0)
    assert v_from_eps(x, 0.25, t(2.5)).item() == pytest.approx(2.0)
    assert forward_noise(t(0.5), t(2.5), 0.25).item() == pytest.approx(1.0)


def test_param_per_sample_sigma():
    x = torch.ones(2, 3)
    v = torch.full((2, 3), 2.0)
    x0 = x0_from_v(x, torch.tensor([0.25, 0.5]), v)  # 1-0.5 = 0.5, 1-1 = 0
    assert torch.allclose(x0, torch.tensor([[0.5] * 3, [0.0] * 3]))


# ---- sigmas (§1.1) --------------------------------------------------------------------------------------------


def test_sigma_grid_sd3():
    """Raw [1, .75, .5, .25], γ=3: 3·.75/2.5 = .9, 3·.5/2 = .75, 3·.25/1.5 = .5, then 0."""
    grid = sigma_grid(4, shift=3.0)
    assert grid.dtype == torch.float32
    assert torch.equal(grid, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert torch.equal(sigma_grid(2), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.equal(sigma_grid(2, raw=[1.0, 0.25], shift=3.0), torch.tensor([1.0, 0.5, 0.0]))


def test_sigma_grid_dynamic():
    """μ = log 3 equals the static γ = 3 shift: e^μ·u/(e^μ·u + 1 - u) = 3u/(1 + 2u)."""
    assert torch.allclose(sigma_grid(4, mu=math.log(3.0)), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_steps": 0},
        {"num_steps": 4, "shift": 0.0},
        {"num_steps": 4, "shift": 3.0, "mu": 1.0},
        {"num_steps": 2, "raw": [1.0]},
        {"num_steps": 2, "raw": [1000.0, 500.0]},
        {"num_steps": 2, "raw": [0.5, 1.0]},
    ],
)
def test_sigma_grid_errors(kwargs):
    with pytest.raises(ValueError):
        sigma_grid(**kwargs)


def test_shift_static_hand_and_inverse():
    """S_3(0.5) = 1.5/2 = 0.75; S_3^{-1}(0.75) = 0.75/(3-1.5) = 0.5."""
    assert shift_static(0.5, 3.0) == pytest.approx(0.75)
    assert unshift_static(0.75, 3.0) == pytest.approx(0.5)
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for gamma in (0.5, 1.0, 3.0, 7.0):
        assert torch.allclose(unshift_static(shift_static(u, gamma), gamma), u)
        assert torch.allclose(shift_static(unshift_static(u, gamma), gamma), u)


def test_shift_dynamic_hand():
    """μ=0: 1/(1+1) = 0.5 at u=0.5; μ=log 3: 3/(3+1) = 0.75; endpoints 0 → 0, 1 → 1."""
    assert shift_dynamic(0.5, 0.0) == pytest.approx(0.5)
    assert shift_dynamic(0.5, math.log(3.0)) == pytest.approx(0.75)
    out = shift_dynamic(torch.tensor([0.0, 1.0]), 1.15)
    assert torch.equal(out, torch.tensor([0.0, 1.0]))


def test_flux_mu_hand():
    """Slope (1.15-0.5)/(4096-256) = 0.65/3840; μ(1024) = 0.5 + 768·0.65/3840 = 0.5 + 0.13 = 0.63."""
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(1024) == pytest.approx(0.63)


# ---- transitions (§1.2) ---------------------------------------------------------------------------------------


def test_transition_parse():
    assert Transition.parse("euler") == Transition("euler", 0.0)
    assert Transition.parse("cps(0.9)") == Transition("cps", 0.9)
    assert Transition.parse(" flow_sde( 0.7 ) ") == Transition("flow_sde", 0.7)
    assert Transition.parse("dance_sde(0.3)") == Transition("dance_sde", 0.3)
    assert str(Transition.parse("cps(0.9)")) == "cps(0.9)"
    for bad in ["ddim", "cps", "cps()", "cps(x)", "euler(0.1)", "cps(1.5)", "flow_sde(-1)", "cps(0.9", ""]:
        with pytest.raises(ValueError, match="allowed|eta"):
            Transition.parse(bad)


def _one(kind: str):
    x, v = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    return transition_mean_std(kind, x, 0.5, 0.25, v)


def test_transition_hand_values():
    """x=1, v=2, σ=0.5, σ'=0.25, d=-0.25: x̂0 = 0, ε̂ = 2.

    euler: 1 - 0.25·2 = 0.5, std 0.
    cps(0.5): θ=π/4; mean = 0.75·0 + 0.25·cos(π/4)·2 = 0.25√2; std = 0.25·sin(π/4) = 0.125√2.
    flow_sde(0.5): s = 0.5·√(0.5/0.5) = 0.5; mean = 1·(1 + 0.25/(2·0.5)·(-0.25)) + 2·(1 + 0.25·0.5/1)·(-0.25)
                   = 0.9375 - 0.5625 = 0.375; std = 0.5·√0.25 = 0.25.
    dance_sde(0.5): score = -2/0.5 = -4; mean = 1 - 0.5 - 0.5·0.25·(-4)·(-0.25) = 0.375; std = 0.5·0.5 = 0.25.
    """
    cases = {
        "euler": (0.5, 0.0),
        "cps(0.5)": (0.25 * math.sqrt(2), 0.125 * math.sqrt(2)),
        "flow_sde(0.5)": (0.375, 0.25),
        "dance_sde(0.5)": (0.375, 0.25),
    }
    for kind, (m, s) in cases.items():
        mean, std = _one(kind)
        assert mean.item() == pytest.approx(m, abs=1e-12), kind
        assert std.item() == pytest.approx(s, abs=1e-12), kind
        assert std.shape == (1, 1)


def test_flow_sde_sigma_one_uses_sigma_max():
    """σ=1 → σ'=0.75, η=0.7, x=1, v=2: s = 0.7·√(1/(1-0.75)) = 1.4; mean = 1·(1 + 1.96/2·(-0.25)) + 2·(1+0)·(-0.25)
    = 0.755 - 0.5 = 0.255; std = 1.4·√0.25 = 0.7. With sigma_max=0.9: s = 0.7·√10, std = 0.35·√10."""
    x, v = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    mean, std = transition_mean_std("flow_sde(0.7)", x, 1.0, 0.75, v)
    assert mean.item() == pytest.approx(0.255)
    assert std.item() == pytest.approx(0.7)
    mean2, std2 = transition_mean_std("flow_sde(0.7)", x, 1.0, 0.75, v, sigma_max=0.75)
    assert torch.equal(mean, mean2) and torch.equal(std, std2)
    _, std3 = transition_mean_std("flow_sde(0.7)", x, 1.0, 0.75, v, sigma_max=0.9)
    assert std3.item() == pytest.approx(0.35 * math.sqrt(10))


def test_cps_eta0_equals_euler():
    g = gen(1)
    x, v = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    sig, nxt = torch.tensor([1.0, 0.9, 0.75, 0.5]), torch.tensor([0.9, 0.75, 0.5, 0.0])
    m_cps, s_cps = transition_mean_std("cps(0)", x, sig, nxt, v)
    m_eul, s_eul = transition_mean_std("euler", x, sig, nxt, v)
    assert torch.allclose(m_cps, m_eul, atol=1e-12)
    assert torch.equal(s_cps, torch.zeros(4, 1)) and torch.equal(s_eul, torch.zeros(4, 1))


def test_cps_last_step_is_x0_hat():
    g = gen(2)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    x_next, mean, std = transition_step("cps(0.9)", x, 0.5, 0.0, v, noise=torch.randn(3, 5, generator=g))
    assert torch.equal(std, torch.zeros(3, 1))
    assert torch.equal(mean, x0_from_v(x, 0.5, v))
    assert torch.equal(x_next, mean)
    x_next2, _, _ = transition_step("cps(0.9)", x, 0.5, 0.0, v, noise=None)
    assert torch.equal(x_next2, mean)
    with pytest.raises(ValueError, match="noise"):
        transition_step("cps(0.9)", x, 0.75, 0.5, v, noise=None)


def test_transition_step_adds_scaled_noise():
    """cps(0.5) from the hand case: x' = 0.25√2 + 0.125√2·z; z = 2 → 0.5√2."""
    x, v = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), 2.0, dtype=torch.float64)
    x_next, _, _ = transition_step("cps(0.5)", x, 0.5, 0.25, v, torch.full((1, 1), 2.0, dtype=torch.float64))
    assert x_next.item() == pytest.approx(0.5 * math.sqrt(2))


def test_gaussian_log_prob_hand_and_normal():
    """x'=1, μ=0, std=1: -1/2 - 0 - ½log2π = -1.4189385."""
    lp = step_log_prob(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "gaussian")
    assert lp.item() == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi))
    g = gen(3)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    std = torch.rand(4, 1, 1, generator=g, dtype=torch.float64) + 0.1
    ref = torch.distributions.Normal(mu, std.expand_as(mu)).log_prob(x).mean(dim=(1, 2))
    assert torch.allclose(step_log_prob(x, mu, std, "gaussian"), ref, atol=1e-12)


def test_cps_mse_log_prob_hand():
    """x' - μ = [1, 2] → -(1 + 4)/2 = -2.5."""
    lp = step_log_prob(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.zeros(1, 1), "cps_mse")
    assert lp.item() == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="mode"):
        step_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 1), "nope")  # type: ignore[arg-type]


def test_deterministic_log_prob_no_nan():
    mean = torch.randn(2, 3, generator=gen(4), requires_grad=True)
    std = torch.tensor([[0.0], [0.5]])
    lp = step_log_prob(mean.detach().clone(), mean, std, "gaussian")
    assert lp[0].item() == 0.0
    assert lp[1].item() == pytest.approx(-math.log(0.5) - 0.5 * math.log(2 * math.pi))
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all()
    assert step_log_prob(mean.detach(), mean.detach(), torch.zeros(2, 1), "cps_mse").abs().sum().item() == 0.0


# ---- noise (§2.4 step 2, §7.11) ---------------------------------------------------------------------------------


def test_stable_hash():
    h = stable_hash(0, "a cat", 1, 2)
    assert h == stable_hash(0, "a cat", 1, 2)
    assert 0 <= h < 2**63
    assert h != stable_hash(0, "a cat", 2, 1)
    assert stable_hash(1) != stable_hash("1")
    # sha256-based: the value is a fixed function of the parts, independent of the process (not Python's hash())
    expected = int.from_bytes(hashlib.sha256(b"0\x1f'a cat'\x1f1\x1f2").digest()[:8], "big") & (2**63 - 1)
    assert h == expected


def test_group_noise_sharing():
    prompts = ["a", "b", "a", "b"]
    z = group_noise(prompts, step=1, epoch=0, shape_per_sample=(2, 3))
    assert z.shape == (4, 2, 3)
    assert torch.equal(z[0], z[2]) and torch.equal(z[1], z[3])
    assert not torch.equal(z[0], z[1])
    assert not torch.equal(z[0], group_noise(["a"], 2, 0, (2, 3))[0])  # other step
    assert not torch.equal(z[0], group_noise(["a"], 1, 1, (2, 3))[0])  # other epoch
    assert not torch.equal(z[0], group_noise(["a"], 1, 0, (2, 3), seed=5)[0])  # other seed
    # "rank 1" sees the same prompt in a different batch position and dtype
    other = group_noise(["c", "a"], 1, 0, (2, 3), dtype=torch.float64)
    assert torch.equal(other[1], z[0].double())


def test_noise_source_shared_and_fresh():
    like = torch.zeros(4, 3)
    prompts = ["p", "p", "q", "q"]
    # two separately created sources (simulating two ranks) with different fresh-noise generators
    ns0 = NoiseSource(gen(10), prompts=prompts, epoch=3, shared_steps=(1,))
    ns1 = NoiseSource(gen(11), prompts=prompts, epoch=3, shared_steps=(1,))
    s0, s1 = ns0(1, (4, 3), like), ns1(1, (4, 3), like)
    assert torch.equal(s0, s1) and torch.equal(s0[0], s0[1]) and not torch.equal(s0[0], s0[2])
    f0, f1 = ns0(0, (4, 3), like), ns1(0, (4, 3), like)
    assert not torch.equal(f0, f1) and not torch.equal(f0[0], f0[1])
    assert torch.equal(f0, torch.randn(4, 3, generator=gen(10)))  # fresh noise comes from the given generator
    with pytest.raises(ValueError, match="prompts"):
        NoiseSource(gen(0), shared_steps=(0,))
    with pytest.raises(ValueError, match="prompts"):
        ns0(1, (3, 3), like)


def test_randn_moves_to_like():
    like = torch.zeros(2, dtype=torch.float64)
    z = randn((2, 5), gen(0), like)
    assert z.dtype == torch.float64
    assert torch.equal(z, torch.randn(2, 5, generator=gen(0)).double())


# ---- trajectory (§7.4) ------------------------------------------------------------------------------------------


def test_sample_euler_matches_manual_loop():
    net = TinyVelocity()
    noise = torch.randn(3, 2, 3, generator=gen(5))
    sigmas = sigma_grid(4, shift=3.0)
    traj = sample(net, noise, sigmas, "euler")
    x = noise
    with torch.no_grad():
        for j in range(4):
            s = sigmas[j].expand(3)
            x = x + (sigmas[j + 1] - sigmas[j]) * net(x, s)
    assert torch.allclose(traj.final, x, atol=1e-6)
    assert traj.stop == 4 and len(traj.x_in) == 4 and torch.equal(traj.log_prob[0], torch.zeros(3))
    assert torch.equal(traj.x_in[1], traj.x_out[0])
    assert traj.sigma[2].shape == (3,) and traj.sigma[2][0].item() == pytest.approx(0.75)


def test_sample_reproducible_and_stop():
    net = TinyVelocity()
    noise = torch.randn(3, 2, 3, generator=gen(6))
    sigmas = sigma_grid(4, shift=3.0)
    a = sample(net, noise, sigmas, "cps(0.9)", generator=gen(7))
    b = sample(net, noise, sigmas, "cps(0.9)", generator=gen(7))
    c = sample(net, noise, sigmas, "cps(0.9)", generator=gen(8))
    assert torch.equal(a.final, b.final) and not torch.equal(a.final, c.final)
    # CPS final step (σ'=0) is deterministic: x0 = x̂0
    assert torch.equal(a.std[3], torch.zeros(3, 1, 1))
    assert torch.equal(a.final, x0_from_v(a.x_in[3], a.sigma[3], a.v[3]))
    # stop=2 reproduces the first two steps of the full run
    s2 = sample(net, noise, sigmas, "cps(0.9)", generator=gen(7), stop=2)
    assert s2.stop == 2 and len(s2.x_out) == 2 and torch.equal(s2.final, a.x_out[1])
    with pytest.raises(ValueError, match="stop"):
        sample(net, noise, sigmas, "cps(0.9)", generator=gen(7), stop=5)
    with pytest.raises(ValueError, match="generator"):
        sample(net, noise, sigmas, "cps(0.9)")


def test_sample_grad_modes():
    net = TinyVelocity()
    noise = torch.randn(2, 2, 3, generator=gen(9))
    sigmas = sigma_grid(4, shift=3.0)
    none = sample(net, noise, sigmas, "cps(0.9)", generator=gen(1))
    assert not any(v.requires_grad for v in none.v) and not none.final.requires_grad
    last = sample(net, noise, sigmas, "cps(0.9)", generator=gen(1), grad="last", stop=3)
    assert [v.requires_grad for v in last.v] == [False, False, True]
    assert last.mean[2].requires_grad and last.final.requires_grad and not last.x_in[2].requires_grad
    assert torch.equal(last.final.detach(), none.x_out[2])  # grad mode does not change values
    allg = sample(net, noise, sigmas, "cps(0.9)", generator=gen(1), grad="all")
    assert all(v.requires_grad for v in allg.v)
    # in "all" mode the first step's velocity influences the final sample through the chain
    gv0 = torch.autograd.grad(allg.final.sum(), allg.v[0], retain_graph=True)[0]
    assert gv0.abs().sum() > 0
    assert not any(lp.requires_grad for lp in allg.log_prob)


def test_sample_shared_noise_source():
    net = TinyVelocity()
    prompts = ["a", "a", "b"]
    g = gen(12)
    noise = torch.randn(1, 2, 3, generator=g).expand(3, 2, 3).contiguous()  # shared initial noise
    sigmas = sigma_grid(4, shift=3.0)
    ns = NoiseSource(gen(13), prompts=prompts, shared_steps=(0, 1, 2))
    traj = sample(net, noise, sigmas, "cps(0.9)", noise_source=ns)
    assert torch.equal(traj.final[0], traj.final[1])  # same prompt, all noise shared → same trajectory
    assert not torch.equal(traj.x_out[0][0], traj.x_out[0][2])


@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("mode", MODES)
def test_recompute_log_prob_exact(transition, mode):
    net = TinyVelocity(seed=1)
    noise = torch.randn(4, 2, 3, generator=gen(14))
    sigmas = sigma_grid(4, shift=3.0)
    traj = sample(net, noise, sigmas, transition, generator=gen(15), log_prob_mode=mode, grad="last")
    for j in range(traj.stop):
        lp, mean, v = recompute_log_prob(net, traj, j)
        assert torch.equal(lp, traj.log_prob[j]), (transition, mode, j)
        assert torch.equal(mean.detach(), traj.mean[j].detach())
        assert torch.equal(v.detach(), traj.v[j].detach())
        if bool((traj.std[j] > 0).all()) or mode == "cps_mse":
            assert lp.requires_grad
    with pytest.raises(IndexError):
        recompute_log_prob(net, traj, 4)


def test_recompute_log_prob_exact_float64_partial_stop():
    net = TinyVelocity(seed=2).double()
    noise = torch.randn(3, 2, 3, generator=gen(16), dtype=torch.float64)
    sigmas = sigma_grid(4, shift=3.0)
    traj = sample(net, noise, sigmas, "flow_sde(0.7)", generator=gen(17), stop=2, sigma_max=0.9)
    for j in range(2):
        assert torch.equal(recompute_log_prob(net, traj, j)[0], traj.log_prob[j])


def test_random_stop_uniform_and_reproducible():
    g = gen(18)
    draws = [random_stop(4, g) for _ in range(4000)]
    counts = [draws.count(k) for k in (1, 2, 3, 4)]
    assert sum(counts) == 4000 and all(850 < c < 1150 for c in counts), counts  # 1000 ± ~5σ (σ ≈ 27)
    assert [random_stop(4, gen(19)) for _ in range(3)] == [random_stop(4, gen(19)) for _ in range(3)]
    g1, g2 = gen(20), gen(20)  # two "ranks"
    assert [random_stop(4, g1) for _ in range(10)] == [random_stop(4, g2) for _ in range(10)]


# ---- timesteps (§7.5, §2.3) ------------------------------------------------------------------------------------


def test_sample_uniform_hand():
    """low + (high-low)·U with the same generator stream."""
    out = sample_uniform(5, gen(21), 2.0, 4.0)
    assert torch.allclose(out, 2.0 + 2.0 * torch.rand(5, generator=gen(21)))
    assert ((out >= 2) & (out <= 4)).all()
    with pytest.raises(ValueError):
        sample_uniform(2, gen(0), 1.0, 0.0)


def test_sample_logit_normal():
    """std=0 → sigmoid(mean): sigmoid(0) = 0.5; clamping into [0.2, 0.4] → 0.4."""
    assert torch.equal(sample_logit_normal(3, gen(0), mean=0.0, std=0.0), torch.full((3,), 0.5))
    assert torch.equal(sample_logit_normal(3, gen(0), mean=0.0, std=0.0, low=0.2, high=0.4), torch.full((3,), 0.4))
    out = sample_logit_normal(10000, gen(22), 0.0, 1.0, 0.1, 0.9)
    assert out.min() >= 0.1 and out.max() <= 0.9
    assert torch.allclose(out, torch.sigmoid(torch.randn(10000, generator=gen(22))).clamp(0.1, 0.9))


def test_sample_interval_shared():
    shared = sample_interval(6, gen(23), 0.2, 0.4, shared=True)
    assert shared.shape == (6,) and torch.unique(shared).numel() == 1 and 0.2 <= shared[0] <= 0.4
    per = sample_interval(6, gen(23), 0.2, 0.4)
    assert torch.unique(per).numel() == 6
    lo, hi = torch.tensor([0.0, 0.5]), torch.tensor([0.1, 0.6])
    out = sample_interval(2, gen(24), lo, hi, shared=True)
    assert out[1] - out[0] == pytest.approx(0.5, abs=1e-6)  # same u mapped into both intervals


def test_ambient_renoise_levels():
    """t = (s+0.01) + (1-(s+0.01))·U, clamped to [0.02, 0.98]."""
    s = torch.tensor([0.0, 0.5, 0.9, 0.0] * 500)
    tt = ambient_renoise_levels(s, gen(25))
    assert (tt >= s + 0.01).all() and (tt >= 0.02).all() and (tt <= 0.98).all()
    u = torch.rand(s.shape, generator=gen(25))
    assert torch.allclose(tt, ((s + 0.01) + (0.99 - s) * u).clamp(0.02, 0.98))


def test_global_rng_untouched():
    """Randomness comes only from explicit generators: the global RNG state is unchanged."""
    net = TinyVelocity()  # nn.Linear's default init uses the global RNG, so build it first
    state = torch.random.get_rng_state()
    for tr in TRANSITIONS:
        sample(net, torch.zeros(2, 2, 3), sigma_grid(4, shift=3.0), tr, generator=gen(0), stop=random_stop(4, gen(1)))
    sample_uniform(3, gen(2))
    sample_logit_normal(3, gen(2))
    ambient_renoise_levels(torch.zeros(3), gen(2))
    group_noise(["a"], 0, 0, (2,))
    assert torch.equal(torch.random.get_rng_state(), state)
