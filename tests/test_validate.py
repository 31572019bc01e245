"""Random toy2d problems and ``fewstep-rl validate`` (issue 13, item 2)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fewstep_rl.cli import main
from fewstep_rl.validate import reward_values, score_samples, summarise
from fewstep_rl.worlds.toy2d import Toy2DWorld
from fewstep_rl.worlds.toy2d_problems import MIN_MOVE, Problem, box_probabilities, make_problem, make_problems


def test_generator_is_seeded_and_deterministic():
    a = [p.to_dict() for p in make_problems(6, 3, "all", "mixed")]
    b = [p.to_dict() for p in make_problems(6, 3, "all", "mixed")]
    assert a == b
    c = [p.to_dict() for p in make_problems(6, 4, "all", "mixed")]
    assert all(x["means"] != y["means"] for x, y in zip(a, c))
    assert make_problem(3, 2, "2d", "linear").to_dict() == make_problem(3, 2, "2d", "linear").to_dict()
    assert [p.family for p in make_problems(10, 0)] == ["2d"] * 4 + ["8d"] + ["2d"] * 4 + ["8d"]
    assert [p.reward["name"] for p in make_problems(4, 0)] == ["linear", "region", "linear", "region"]


@pytest.mark.parametrize("family,kind", [("2d", "linear"), ("2d", "region"), ("8d", "linear"), ("8d", "region")])
def test_every_problem_moves_enough_mass(family, kind):
    for p in make_problems(12, 7, family, kind):
        assert 2 <= len(p.means) <= 4 and p.dim == (2 if family == "2d" else 8)
        assert any(len(c) >= 2 for c in p.prompts.values())
        assert p.max_mass_moved() >= MIN_MOVE
        assert 0.1 <= p.beta <= 20
        # the world accepts the config
        Toy2DWorld({**p.world_config(), "hidden": 8, "layers": 1})


def _two_component_problem(reward: dict, beta: float) -> Problem:
    return Problem("hand", "2d", [[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.4], [1.0, 3.0], {"p0": [0, 1], "p1": [1]},
                   reward, beta)


def test_linear_tilt_mass_by_numeric_integration():
    """w'_0 = ∫ w̃_0 N_0 e^{r/β} / ∫ p e^{r/β}, by a 2-D Riemann sum on a fine grid."""
    p = _two_component_problem({"name": "linear", "w": [-0.6, -0.8]}, 1.5)
    h = 0.02
    g = torch.arange(-8.0, 8.0, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    x = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    wt = p.prompt_weights("p0")
    dens = []
    for k in range(2):
        mu = torch.tensor(p.means[k], dtype=torch.float64)
        s = p.stds[k]
        dens.append(wt[k] * torch.exp(-((x - mu) ** 2).sum(1) / (2 * s * s)) / (2 * math.pi * s * s))
    tilt = torch.exp(reward_values(p, x) / p.beta)
    mass = torch.stack([(d * tilt).sum() * h * h for d in dens])
    numeric = mass / mass.sum()
    assert torch.allclose(p.tilted_weights("p0"), numeric, atol=1e-6)
    assert p.tilted_weights("p0")[0] > 0.5 > float(wt[0])  # the hand case moves mass toward component 0


def test_region_tilt_mass_by_monte_carlo():
    p = _two_component_problem({"name": "region", "low": [-2.5, -0.5], "high": [-1.0, 0.7], "value": 1.0}, 0.4)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    mass = []
    for k in range(2):
        x = torch.tensor(p.means[k], dtype=torch.float64) + p.stds[k] * torch.randn(n, 2, generator=g,
                                                                                  dtype=torch.float64)
        inside = reward_values(p, x)
        assert abs(float(inside.mean()) - float(box_probabilities(p)[k])) < 4e-3
        mass.append(float(p.prompt_weights("p0")[k]) * float(torch.exp(inside / p.beta).mean()))
    mc = torch.tensor(mass) / sum(mass)
    assert torch.allclose(p.tilted_weights("p0").float(), mc.float(), atol=5e-3)
    # exact mean reward of the target = P_target(box), checked by the same Monte-Carlo
    num = sum(float(p.prompt_weights("p0")[k]) * math.exp(1 / p.beta) * float(box_probabilities(p)[k]) for k in (0, 1))
    assert abs(p.mean_reward("p0", tilted=True) - num / sum(mass)) < 5e-3


@pytest.mark.parametrize("kind", ["linear", "region"])
def test_metrics_on_exact_target_and_teacher_samples(kind):
    p = make_problem(11, 0, "2d", kind)
    world = Toy2DWorld({**p.world_config(), "hidden": 8, "layers": 1})
    prompts = ["p0", "p1"] * 1000
    from fewstep_rl.rewards.toy2d import LinearReward, RegionReward

    spec = {k: v for k, v in p.reward.items() if k != "name"}
    reward = LinearReward(LinearReward.Config(**spec)) if kind == "linear" else RegionReward(RegionReward.Config(**spec))
    g = torch.Generator().manual_seed(5)
    target = world.sample_tilted(prompts, reward, None, p.beta, g)
    m = score_samples(p, target, prompts, seed=9)
    assert abs(m["closure"] - 1.0) < 0.12  # 3 standard errors at 2000 samples
    assert 0.5 < m["energy_ratio"] < 2.0
    assert abs(m["mode_closure"] - 1.0) < 0.12 and m["mass_tv"] < 0.05
    teacher = world.sample_teacher(prompts, g)
    t = score_samples(p, teacher, prompts, seed=9)
    assert abs(t["closure"]) < 0.12 and abs(t["mode_closure"]) < 0.12
    assert t["energy_ratio"] > 10
    for q, d in t["prompts"].items():
        assert d["teacher_mass"] == pytest.approx([float(w) for w in p.prompt_weights(q)[d["components"]]], abs=1e-4)
    s = summarise([{**m, "closure": 1.2}, {**m, "closure": 0.95}, t])
    assert s["closure_worst"] == pytest.approx(t["closure"]) and s["worlds"] == 3


def test_cli_validate_one_tiny_world(tmp_path, capsys):
    out = tmp_path / "v"
    rc = main(["validate", "--method", "crd", "--worlds", "1", "--steps", "3", "--eval_samples", "64", "--seed", "2",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "closure" in text and "median" in text
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "crd" and len(res["worlds"]) == 1 and res["worlds"][0]["steps"] == 3
    assert math.isfinite(res["worlds"][0]["energy_ratio"])
    assert (out / "results.csv").read_text().splitlines()[0].startswith("world,")


@pytest.mark.parametrize("argv,needle", [
    (["--method", "crd", "--worlds", "0"], "--worlds"),
    (["--method", "nope"], "unknown method"),
    (["--method", "crd", "--family", "3d"], "--family"),
    (["--method", "crd", "--reward", "quad"], "--reward"),
    (["--method", "crd", "--config", "/no/such.yaml"], "config file not found"),
    (["--worlds", "2"], "needs --method"),
    (["--method", "crd,nope"], "unknown method"),
    (["--method", "crd", "--worlds", "3", "--only", "5"], "--only"),
])
def test_cli_validate_bad_input(argv, needle, capsys):
    assert main(["validate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


# ---------------------------------------------------------------- the convergence fixes (issue 13 item 2)
def test_rtdmd_beta_advantages_by_hand():
    """G_j = r/β − Σ_{k>j} KL_k, leave-one-out per prompt group (K = 3 steps → 2 stochastic steps): with groups of two,
    A_i = G_i − G_other (a group-mean centring would halve it and train toward the tilt at 2β)."""
    from fewstep_rl.config import build
    from fewstep_rl.methods.rtdmd import RTDMD, RTDMDConfig
    from fewstep_rl.rewards import MultiReward
    from fewstep_rl.rewards.toy2d import LinearReward

    cfg = build(RTDMDConfig, {"beta": 0.5, "num_steps": 3, "subgrpo_steps": 1, "ppo_advantage": "beta",
                              "ppo_kl": 1.0, "adv_clip": 100.0}, "method")
    m = RTDMD(cfg, Toy2DWorld(), MultiReward([LinearReward()]))
    assert "ppo_ref" in m.snapshot_roles and "ppo_ref" not in RTDMD.snapshot_roles
    r = torch.tensor([1.0, 3.0, 0.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]])
    adv = m.beta_advantages(r, torch.tensor([0, 0, 1, 1]), kl)
    # step 0: r/β − KL_1 = [1, 4, −3, 0] → leave-one-out [−3, 3, −3, 3]; step 1: r/β = [2, 6, 0, 4] → [−4, 4, −4, 4]
    assert torch.allclose(adv, torch.tensor([[-3.0, 3.0, -3.0, 3.0], [-4.0, 4.0, -4.0, 4.0]]))


def test_rtdmd_ppo_kl_runs_and_measures_the_distance_to_its_reference(tmp_path):
    from fewstep_rl.testing.contract import run_fit

    over = {"method.ppo_advantage": "beta", "method.ppo_kl": 1.0, "method.stage1_iterations": 2,
            "method.batch_size": 4, "method.group_size": 4, "method.optim_stage2.lr": 1e-2, "method.subgrpo_steps": 2}
    module, _, logged = run_fit("rtdmd", tmp_path, steps=5, overrides=over)
    assert logged["_all_finite"]
    assert logged["train/ppo/kl_ref"] > 0  # the generator has left the frozen stage-1 reference
    x = torch.randn(8, 2)
    cond = module.backbone.encode_prompts(["left", "right"] * 4)
    with torch.no_grad():
        v_ref = module.backbone.velocity(x, torch.full((8,), 0.6), cond, "ppo_ref")
        v_t = module.backbone.velocity(x, torch.full((8,), 0.6), cond, "teacher")
        v_g = module.backbone.velocity(x, torch.full((8,), 0.6), cond, "generator")
    assert not torch.allclose(v_ref, v_t)  # the reference is the stage-1 generator, not the teacher
    assert not torch.allclose(v_ref, v_g)


def test_didr_chain_grad_all_trains_through_every_step(tmp_path):
    """With chain_grad: all the first step's velocity (at σ = 1) changes; with last only it changes only through
    weight sharing, so the two runs differ there."""
    from fewstep_rl.testing.contract import run_fit

    over = {"method.num_steps": 4, "method.fake_updates_per_gen": 1, "method.drs": "exact", "method.optim.lr": 1e-2,
            "method.batch_size": 16}
    a, _, la = run_fit("didr", tmp_path / "a", steps=2, overrides={**over, "method.chain_grad": "all"})
    b, _, lb = run_fit("didr", tmp_path / "b", steps=2, overrides={**over, "method.chain_grad": "last"})
    assert la["_all_finite"] and lb["_all_finite"]
    x = torch.randn(8, 2)
    cond = a.backbone.encode_prompts(["left", "right"] * 4)
    with torch.no_grad():
        va = a.backbone.velocity(x, torch.ones(8), cond, "generator")
        vb = b.backbone.velocity(x, torch.ones(8), cond, "generator")
    assert not torch.allclose(va, vb)
