"""ReFL / DRaFT (methods.md §6.5): reward back-prop through the last sampler step(s); contract and behaviour."""

import pytest
import torch

from fewstep_rl.testing.contract import role_state, run_fit, run_interrupted_and_resumed, same, teacher_probe

REFL = "fewstep_rl.methods.refl:ReFL"
LINEAR = [{"name": "linear", "w": [1.0, 0.0]}]
TOY = {"method.num_steps": 4, "method.beta": 0.5, "method.kl_weight": 1.0, "rewards": LINEAR}


def test_config_checks():
    from fewstep_rl.config import ConfigError
    from fewstep_rl.run import build_method, resolve

    for key, value in (("draft_k", 5), ("draft_k", 0), ("beta", 0.0), ("kl_weight", -1.0), ("objective", "log")):
        with pytest.raises((ValueError, ConfigError)):
            resolve(REFL, "toy2d", (), {"method.num_steps": 4, f"method.{key}": value, "rewards": LINEAR})
    with pytest.raises(ValueError, match="differentiable"):
        build_method(resolve(REFL, "toy2d", (), {"rewards": [{"name": "region"}]}))


@pytest.mark.parametrize("extra", [{"method.draft_k": 1}, {"method.draft_k": 3, "method.random_stop": True}])
def test_contract_roles_change_frozen_do_not_and_resume_is_exact(extra, tmp_path):
    from fewstep_rl.run import build_method, resolve
    from fewstep_rl.testing.contract import TINY

    over = TOY | extra
    fresh = build_method(resolve(REFL, "toy2d", (), {**TINY, **over}))
    fresh.configure_model()
    before, probe = role_state(fresh), teacher_probe(fresh)
    full, _, logged = run_fit(REFL, tmp_path / "full", steps=7, overrides=over)
    assert logged["_all_finite"] == 1.0 and "train/generator/loss" in logged
    assert not same(before, role_state(full), "generator")
    assert torch.equal(probe, teacher_probe(full))
    resumed = run_interrupted_and_resumed(REFL, tmp_path, steps=7, interrupt_after=3, overrides=over)
    a, b = role_state(full), role_state(resumed)
    assert all(same(a, b, r) for r in a)


def test_draft_k_backpropagates_through_k_steps():
    """DRaFT-K mechanics as ReFL wires them (grad="all" on the last K grid steps): Euler with v = w·x on the grid
    [1, ½, 0] gives x0 = x(1 − w/2)², so ∂Σx0/∂w = −Σx(1 − w/2) through both steps (K = 2) but only
    −½Σx(1 − w/2) with the penultimate state held fixed (K = 1). Hand values at w = ½, x = 1 (6 entries)."""
    from fewstep_rl.sampling import sample, sigma_grid, x0_from_v

    sig = sigma_grid(2)
    for k, grad_mode, expect in ((2, "all", -4.5), (1, "last", -2.25)):
        w = torch.nn.Parameter(torch.tensor(0.5))
        tr = sample(lambda x, s: w * x, torch.ones(3, 2), sig, "euler", grad=grad_mode)  # noqa: B023
        x_in = tr.x_out[-2] if k == 2 else tr.x_in[-1]
        x0_from_v(x_in, tr.sigma[-1], tr.v[-1]).sum().backward()
        assert torch.isclose(w.grad, torch.tensor(expect)), (k, w.grad)


def test_reward_backprop_raises_the_mean_reward(tmp_path):
    from fewstep_rl.eval.callbacks import evaluate_method

    over = TOY | {"method.batch_size": 128, "world.hidden": 64, "trainer.eval_samples": 64}
    module, _, logged = run_fit(REFL, tmp_path, steps=200, overrides=over)
    assert logged["_all_finite"] == 1.0
    m, _, _ = evaluate_method(module, 2000, seed=3)
    assert m["reward_mean"] > 0.1 + m["teacher_reward_mean"], m  # teacher ≈ 0; seen 0.156
