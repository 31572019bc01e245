"""toy2d: exact Gaussian-mixture teacher, role adapters, exact tilted targets, energy distance (architecture.md §4)."""

import math

import pytest
import torch

from fewstep_rl.backbones.toy2d import GaussianMixtureBackbone
from fewstep_rl.config import ConfigError, build
from fewstep_rl.eval.metrics import energy_distance
from fewstep_rl.rewards import MultiReward
from fewstep_rl.rewards.toy2d import LinearReward, RegionConfig, RegionReward
from fewstep_rl.roles import add_roles, copy_role
from fewstep_rl.worlds.toy2d import Toy2DConfig, Toy2DWorld


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mixture_backbone():
    means = [[-2.0, 0.5], [1.5, -1.0], [0.5, 2.0]]
    return GaussianMixtureBackbone(means, [0.4, 0.7, 1.2], [0.2, 0.5, 0.3], {"a": [0], "bc": [1, 2]}, hidden=16)


# ------------------------------------------------------------------ analytic teacher
def test_single_gaussian_velocity_hand_checked():
    # 1-D, μ=1, s=0.5, σ=0.5, x=0.3: v_k = 0.25·0.25 + 0.25 = 0.3125, x − (1−σ)μ = −0.2
    # E[x0|x] = 1 + 0.5·0.25/0.3125·(−0.2) = 0.92 ; E[ε|x] = 0.5/0.3125·(−0.2) = −0.32
    # v = ε̂ − x̂0 = −1.24 = (x − x̂0)/σ ; score = 0.2/0.3125 = 0.64
    bb = GaussianMixtureBackbone([[1.0]], [0.5], [1.0])
    x, c = torch.tensor([[0.3]], dtype=torch.float64), bb.encode_prompts([""])
    assert bb.posterior_x0(x, 0.5, c).item() == pytest.approx(0.92, abs=1e-12)
    assert bb.posterior_eps(x, 0.5, c).item() == pytest.approx(-0.32, abs=1e-12)
    assert bb.velocity(x, 0.5, c, role="teacher").item() == pytest.approx(-1.24, abs=1e-12)
    assert bb.score(x, 0.5, c).item() == pytest.approx(0.64, abs=1e-12)
    # σ = 1: pure noise, x̂0 = μ, ε̂ = x ; σ = 0: x̂0 = x, ε̂ = 0
    assert bb.velocity(x, 1.0, c, role=None).item() == pytest.approx(0.3 - 1.0, abs=1e-12)
    assert bb.velocity(x, 0.0, c, role=None).item() == pytest.approx(-0.3, abs=1e-12)


def test_posterior_identities_and_sigma_to_zero():
    bb = mixture_backbone()
    x = torch.randn(64, 2, generator=gen(), dtype=torch.float64) * 2
    c = bb.encode_prompts(["", "a", "bc", "bc"] * 16)
    for s in (0.05, 0.3, 0.7, 0.99):
        x0, eps, v = bb.posterior_x0(x, s, c), bb.posterior_eps(x, s, c), bb.analytic_velocity(x, s, c)
        torch.testing.assert_close(x, (1 - s) * x0 + s * eps, rtol=0, atol=1e-10)  # x = (1−σ)x̂0 + σε̂
        torch.testing.assert_close(v, (x - x0) / s, rtol=0, atol=1e-9)
        torch.testing.assert_close(bb.score(x, s, c), -eps / s, rtol=0, atol=1e-9)
    torch.testing.assert_close(bb.posterior_x0(x, 1e-7, c), x, rtol=0, atol=1e-5)
    assert bb.velocity(x.float(), torch.zeros(64), c, role=None).dtype == torch.float32


def reference_log_density(x, sigma, means, stds, weights):
    """log Σ_k w_k N(x; (1−σ)μ_k, ((1−σ)² s_k² + σ²) I), written out independently of the backbone."""
    d = x.shape[1]
    var = (1 - sigma) ** 2 * stds**2 + sigma**2
    sq = ((x[:, None, :] - (1 - sigma) * means[None]) ** 2).sum(-1)
    comp = torch.log(weights) - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(comp, dim=1)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_score_equals_autograd_of_log_density(sigma):
    bb = mixture_backbone()
    means, stds = bb.means.clone(), bb.stds.clone()
    for prompt in ("", "bc"):
        w = bb.encode_prompts([prompt], dtype=torch.float64)[0]
        keep = w > 0
        x = (torch.randn(32, 2, generator=gen(1), dtype=torch.float64) * 2).requires_grad_(True)
        logp = reference_log_density(x, sigma, means[keep], stds[keep], w[keep])
        (grad,) = torch.autograd.grad(logp.sum(), x)
        c = bb.encode_prompts([prompt] * 32, dtype=torch.float64)
        torch.testing.assert_close(bb.score(x.detach(), sigma, c), grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(bb.log_density(x.detach(), sigma, c), logp.detach(), rtol=1e-10, atol=1e-10)


def euler(bb, x, cond, steps, role="generator"):
    for i in range(steps):
        s, sn = 1 - i / steps, 1 - (i + 1) / steps
        x = x + (sn - s) * bb.velocity(x, s, cond, role=role)
    return x


def test_euler_ode_reaches_the_exact_distribution():
    world = Toy2DWorld()
    bb = world.build_backbone()
    bb.add_role("generator")
    prompts = ["left", "right", "left", "left"] * 400
    noise = torch.randn(len(prompts), 2, generator=gen(3))
    x = euler(bb, noise, bb.encode_prompts(prompts), 200)
    m = world.evaluate(x, prompts, generator=gen(4))
    assert abs(m["energy_noise_floor"]) < 0.01
    assert m["energy_teacher"] < 0.01, m
    coarse = world.evaluate(euler(bb, noise, bb.encode_prompts(prompts), 1), prompts, generator=gen(4))
    assert coarse["energy_teacher"] > 0.1, coarse  # one Euler step lands on the posterior mean: clearly off


def test_guidance_is_a_no_op_for_the_null_prompt_and_changes_a_subset_prompt():
    bb = mixture_backbone()
    x = torch.randn(8, 2, generator=gen())
    c0, ca = bb.null_cond(8), bb.encode_prompts(["a"] * 8)
    torch.testing.assert_close(bb.velocity(x, 0.5, c0, "teacher", guidance=3.0), bb.velocity(x, 0.5, c0, "teacher"))
    assert not torch.allclose(bb.velocity(x, 0.5, ca, "teacher", guidance=3.0), bb.velocity(x, 0.5, ca, "teacher"))


# ------------------------------------------------------------------ prompts
def test_prompts_full_mixture_and_unknown():
    bb = mixture_backbone()
    torch.testing.assert_close(bb.encode_prompts([""])[0], torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(bb.null_cond(3), torch.tensor([[0.2, 0.5, 0.3]] * 3))
    torch.testing.assert_close(bb.encode_prompts(["bc", "a"]), torch.tensor([[0.0, 0.5 / 0.8, 0.3 / 0.8], [1, 0, 0]]))
    with pytest.raises(KeyError, match="valid prompts.*'a'"):
        bb.encode_prompts(["a", "nope"])
    x = bb.sample_exact(["a"] * 4000, gen())
    torch.testing.assert_close(x.mean(0), torch.tensor([-2.0, 0.5]), rtol=0, atol=0.03)
    assert x.std(0).mean().item() == pytest.approx(0.4, abs=0.02)
    assert Toy2DWorld().train_prompts == ["left", "right"]
    assert Toy2DWorld({"prompts": {}}).train_prompts == [""]


# ------------------------------------------------------------------ roles
def test_roles_start_equal_to_teacher_and_merge():
    bb = mixture_backbone()
    add_roles(bb, ["generator", "fake_score"], {"ema": "generator"})
    x, c = torch.randn(16, 2, generator=gen()), bb.encode_prompts(["", "a", "bc", "a"] * 4)
    s = torch.rand(16, generator=gen(1))
    teacher = bb.velocity(x, s, c, role="teacher")
    for role in ("generator", "fake_score", "ema"):
        assert torch.equal(bb.velocity(x, s, c, role=role), teacher), role
    # the hidden layers are random and distinct per role, deterministic across builds
    gen_w, fake_w = bb.role_parameters("generator")[0].clone(), bb.role_parameters("fake_score")[0]
    assert not torch.equal(gen_w, fake_w)
    other = mixture_backbone()
    other.add_role("generator")
    assert torch.equal(gen_w, other.role_parameters("generator")[0])

    with torch.no_grad():
        bb.store.adapters["generator"].last.weight.normal_(generator=gen(5))
    v_gen = bb.velocity(x, s, c, role="generator")
    assert not torch.allclose(v_gen, teacher)
    assert torch.equal(bb.velocity(x, s, c, role="fake_score"), teacher)  # roles are independent
    v_gen.sum().backward()
    assert bb.store.adapters["generator"].last.weight.grad is not None and bb.store.adapters["fake_score"].last.weight.grad is None

    bb.merge_role("generator")
    torch.testing.assert_close(bb.velocity(x, s, c, role="teacher"), v_gen, rtol=0, atol=1e-6)
    assert torch.equal(bb.velocity(x, s, c, role="generator"), bb.velocity(x, s, c, role="teacher"))  # reset
    assert not torch.equal(bb.role_parameters("generator")[0], gen_w)  # fresh hidden layers after a reset
    assert all(not p.requires_grad for p in bb.store.merged.parameters())
    assert all(p.requires_grad for p in bb.role_parameters("generator"))


def test_state_dict_holds_roles_and_merged_deltas_and_reloads():
    bb = mixture_backbone()
    add_roles(bb, ["generator"], {"ema": "generator"})
    with torch.no_grad():
        bb.store.adapters["generator"].last.bias.fill_(0.25)
    copy_role(bb, "ema", "generator")
    torch.testing.assert_close(bb.role_parameters("ema")[-1], torch.full((2,), 0.25))
    bb.merge_role("generator")
    sd = bb.state_dict()
    assert sd and all(bb.is_role_key(k) for k in sd)
    assert not bb.is_role_key("means") and bb.is_role_key("store.merged.0.net.0.weight")
    fresh = mixture_backbone()
    add_roles(fresh, ["generator"], {"ema": "generator"})
    fresh.load_state_dict(sd)
    x, c = torch.randn(8, 2, generator=gen()), fresh.null_cond(8)
    for role in ("teacher", "generator", "ema"):
        assert torch.equal(fresh.velocity(x, 0.3, c, role), bb.velocity(x, 0.3, c, role)), role
    assert len(list(bb.fsdp_units())) == 3  # each role adapter and the merged one (each called by its own forward)


def test_dtype_casts_keep_the_analytic_teacher_in_float64():
    bb = mixture_backbone()
    bb.add_role("generator")
    bb.to(torch.bfloat16)
    assert bb.means.dtype == torch.float64 and bb.prompt_weights.dtype == torch.float64
    assert bb.role_parameters("generator")[0].dtype == torch.bfloat16
    x = torch.randn(4, 2, generator=gen()).bfloat16()
    assert bb.velocity(x, 0.5, bb.null_cond(4), "generator").dtype == torch.bfloat16


def test_unknown_role_and_reserved_names():
    bb = mixture_backbone()
    with pytest.raises(KeyError, match="unknown role"):
        bb.velocity(torch.zeros(1, 2), 0.5, bb.null_cond(1), role="generator")
    with pytest.raises(ValueError, match="reserved"):
        bb.add_role("teacher")


# ------------------------------------------------------------------ world config
def test_world_config_validation():
    cfg = build(Toy2DConfig, {"means": [[0.0, 0.0]], "stds": [1], "weights": [1], "prompts": {"a": [0]}}, "world")
    assert cfg.stds == [1.0]
    with pytest.raises(ConfigError, match="world.nme"):
        build(Toy2DConfig, {"nme": 1}, "world")
    bad = [
        ({"stds": [0.5]}, "stds"),
        ({"stds": [0.5, -1.0]}, "std must be > 0"),
        ({"weights": [0.5, 0.0]}, "weight must be > 0"),
        ({"prompts": {"x": [2]}}, "prompt 'x'"),
        ({"prompts": {"": [0]}}, "reserved"),
        ({"means": [[0.0, 0.0], [1.0]]}, "dimension"),
    ]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            build(Toy2DConfig, data, "world")
    assert Toy2DWorld().default_rewards() == [{"name": "linear", "w": [1.0, 0.0]}]
    assert Toy2DConfig().means == [[-2.0, 0.0], [2.0, 0.0]] and Toy2DConfig().eval_samples == 2000


# ------------------------------------------------------------------ exact tilted targets
def test_tilted_single_gaussian_hand_checked():
    # μ=1, s=0.5, w=2, β=0.5: μ' = μ + s²w/β = 1 + 0.25·2/0.5 = 2
    world = Toy2DWorld({"means": [[1.0]], "stds": [0.5], "weights": [1.0], "prompts": {"p": [0]}})
    means, stds, weights = world.tilted_mixture("p", [2.0], 0.5)
    assert means.item() == pytest.approx(2.0) and stds.item() == 0.5 and weights.item() == pytest.approx(1.0)


def test_tilted_mixture_matches_importance_weighting():
    world = Toy2DWorld()
    beta, w = 2.0, torch.tensor([1.0, 0.5])
    means, stds, weights = world.tilted_mixture("", w, beta)
    # hand-checked gains: exp(w·μ_k/β + s²‖w‖²/(2β²)) = exp(∓1 + 0.25·1.25/8); the common factor cancels
    torch.testing.assert_close(weights, torch.tensor([1.0, math.e**2]).double() / (1 + math.e**2))
    torch.testing.assert_close(means, torch.tensor([[-2 + 0.125, 0.0625], [2 + 0.125, 0.0625]]).double())
    target_mean = (weights[:, None] * means).sum(0)
    x = world.sample_teacher([""] * 200_000, gen()).double()
    iw = torch.softmax(x @ w.double() / beta, 0)
    torch.testing.assert_close((iw[:, None] * x).sum(0), target_mean, rtol=0, atol=0.02)
    reward = LinearReward(LinearReward.Config(w=[1.0, 0.5]))
    xt = world.sample_tilted([""] * 50_000, [reward], None, beta, gen(1)).double()
    torch.testing.assert_close(xt.mean(0), target_mean, rtol=0, atol=0.02)
    # two linear rewards with weights add their directions: 0.5·(2, 1) = (1, 0.5)
    two = MultiReward(
        [LinearReward(LinearReward.Config(w=[2.0, 0.0])), _named(LinearReward(LinearReward.Config(w=[0.0, 1.0])))],
        [0.5, 0.5],
    )
    xt2 = world.sample_tilted([""] * 50_000, two, None, beta, gen(2)).double()
    torch.testing.assert_close(xt2.mean(0), target_mean, rtol=0, atol=0.02)


def _named(reward, name="linear2"):
    reward.name = name
    return reward


def test_region_rejection_matches_importance_weighting_and_closed_form():
    world = Toy2DWorld()
    region, beta = RegionReward(RegionConfig()), 0.5
    # teacher box mass for prompt "": 0.5 · P(|N(0,.25)·|<1)² = 0.5 · erf(√2)², tilted m e^{1/β}/(m e^{1/β} + 1 − m)
    m = 0.5 * math.erf(2 / math.sqrt(2)) ** 2
    tilted = m * math.exp(1 / beta) / (m * math.exp(1 / beta) + 1 - m)
    x = world.sample_teacher([""] * 100_000, gen())
    r = region(x, [""] * len(x))
    iw = torch.softmax(r.double() / beta, 0)
    assert r.mean().item() == pytest.approx(m, abs=0.01)
    assert (iw * r.double()).sum().item() == pytest.approx(tilted, abs=0.01)
    xt = world.sample_tilted([""] * 20_000, [region], None, beta, gen(1))
    assert region(xt, [""] * len(xt)).mean().item() == pytest.approx(tilted, abs=0.015)
    # linear + region: the rejection step runs on the linear-tilted proposal
    lin = LinearReward(LinearReward.Config(w=[0.0, 1.0]))
    xt2 = world.sample_tilted(["left"] * 20_000, [lin, region], [1.0, 1.0], beta, gen(2))
    assert xt2[:, 1].mean().item() == pytest.approx(0.25 / beta, abs=0.02)  # left has no box mass: pure linear tilt


def test_evaluate_keys_and_values():
    world = Toy2DWorld()
    rewards = MultiReward([LinearReward(), RegionReward()], [1.0, 1.0])
    prompts = ["left", "right"] * 500
    teacher = world.sample_teacher(prompts, gen(7))
    m = world.evaluate(teacher, prompts, rewards, beta=1.0, generator=gen(8))
    for key in (
        "energy_teacher",
        "energy_noise_floor",
        "energy_tilted",
        "energy_tilted_floor",
        "reward_mean",
        "tilted_reward_mean",
        "teacher_reward_mean",
        "region_mass",
        "tilted_region_mass",
        "teacher_region_mass",
    ):
        assert key in m and math.isfinite(m[key]), key
    assert abs(m["energy_teacher"]) < 0.02 and m["energy_tilted"] > 5 * abs(m["energy_tilted_floor"])
    assert m["tilted_reward_mean"] > m["teacher_reward_mean"]
    assert m["tilted_region_mass"] > m["teacher_region_mass"]
    assert world.evaluate(teacher, prompts) == world.evaluate(teacher, prompts)  # repeatable without a generator
    with pytest.raises(NotImplementedError, match="no exact tilted target"):
        from fewstep_rl.rewards.jpeg import JpegCompressibility

        world.sample_tilted(["left"], [JpegCompressibility()], None, 1.0, gen())
    with pytest.raises(ValueError, match="d=2"):
        world.sample_tilted(["left"], [LinearReward(LinearReward.Config(w=[1.0]))], None, 1.0, gen())


# ------------------------------------------------------------------ energy distance
def test_energy_distance():
    # V-statistic: 2·mean|x−y| = 2·(2+4+1+3)/4 = 5; mean|x−x'| = (0+1+1+0)/4 = .5; mean|y−y'| = (0+2+2+0)/4 = 1
    assert energy_distance(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 4.0])) == pytest.approx(3.5)
    a, b = torch.randn(1000, 2, generator=gen(1)), torch.randn(1000, 2, generator=gen(2))
    assert abs(energy_distance(a, a)) < 0.01 and abs(energy_distance(a, b)) < 0.02
    assert energy_distance(a, b + torch.tensor([1.0, 0.0])) > 0.3
    with pytest.raises(ValueError):
        energy_distance(torch.zeros(1, 2), torch.zeros(5, 2))



def test_fold_role_keeps_function_and_teacher_and_round_trips():
    bb = mixture_backbone()
    add_roles(bb, ["generator", "fake_score"], {"ema": "generator"})
    with torch.no_grad():
        bb.store.adapters["generator"].last.weight.normal_(generator=gen(5))
        bb.store.adapters["fake_score"].last.bias.fill_(0.5)
    x, c, s = torch.randn(16, 2, generator=gen()), bb.encode_prompts(["", "a", "bc", "a"] * 4), 0.4
    before = {r: bb.velocity(x, s, c, r) for r in ("teacher", "generator", "fake_score", "ema")}
    bb.fold_role("generator", into=["ema"])
    assert bb.folds == ["fold0__generator__ema"] and bb.folds_of("fake_score") == []
    torch.testing.assert_close(bb.velocity(x, s, c, "generator"), before["generator"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bb.velocity(x, s, c, "ema"), before["generator"], rtol=0, atol=1e-12)
    assert torch.equal(bb.velocity(x, s, c, "teacher"), before["teacher"])
    assert torch.equal(bb.velocity(x, s, c, "fake_score"), before["fake_score"])
    assert float(bb.store.adapters["generator"].last.weight.abs().sum()) == 0  # a fresh adapter on top
    assert all(not p.requires_grad for p in bb.store.folded.parameters())
    bb.velocity(x, s, c, "generator").sum().backward()
    assert all(p.grad is None for p in bb.store.folded.parameters())
    with pytest.raises(ValueError, match="sits on folds"):
        bb.fold_role("fake_score", into=["generator"])
    with pytest.raises(KeyError, match="unknown role"):
        bb.fold_role("nope")
    with torch.no_grad():
        bb.store.adapters["generator"].last.bias.fill_(-0.25)
    fresh = mixture_backbone()
    add_roles(fresh, ["generator", "fake_score"], {"ema": "generator"})
    fresh.load_state_dict(bb.state_dict())  # strict: the fold comes back from the state dict
    assert fresh.folds == bb.folds and not any(p.requires_grad for p in fresh.store.folded.parameters())
    for r in ("teacher", "generator", "fake_score", "ema"):
        assert torch.equal(fresh.velocity(x, s, c, r), bb.velocity(x, s, c, r)), r
    with pytest.raises(ValueError, match="letters, digits"):
        bb.add_role("a__b")
