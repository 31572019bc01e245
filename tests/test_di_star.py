"""DI*-style baseline (methods.md §6.8): terminal reward added to the IKL/DMD direction; contract and behaviour."""

import pytest
import torch

from fewstep_rl.objectives.diffused_reward import reward_input_grad, surrogate_loss
from fewstep_rl.testing.contract import role_state, run_fit, run_interrupted_and_resumed, same, teacher_probe

DISTAR = "fewstep_rl.methods.di_star:DIStar"
LINEAR = [{"name": "linear", "w": [1.0, 0.0]}]
TOY = {
    "method.num_steps": 4,
    "method.dmd_weighting": "batch",
    "method.optim.adam_betas": [0.9, 0.999],
    "method.beta": 0.5,
    "rewards": LINEAR,
}


def test_surrogate_loss_gradients_by_hand():
    y = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]], requires_grad=True)
    g = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -3.0]])
    surrogate_loss(y, g, "mean").backward()
    assert torch.allclose(y.grad, g / 6)
    y.grad = None
    surrogate_loss(y, g, "sample_sum").backward()
    assert torch.allclose(y.grad, g / 2)
    with pytest.raises(ValueError, match="reduce"):
        surrogate_loss(y, g, "sum")


def test_reward_input_grad_is_the_terminal_reward_gradient():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    g, r = reward_input_grad(lambda z: (z**2).sum(1), x * 2)
    assert torch.allclose(g, 4 * x.detach()) and torch.allclose(r, (4 * x.detach() ** 2).sum(1))
    assert x.grad is None and not g.requires_grad


def test_needs_a_differentiable_reward_and_valid_config():
    from fewstep_rl.config import ConfigError
    from fewstep_rl.run import build_method, resolve

    with pytest.raises(ValueError, match="differentiable"):
        build_method(resolve(DISTAR, "toy2d", (), {"rewards": [{"name": "region"}]}))
    for key, value in (("beta", -1.0), ("t_min", 0.0), ("dmd_weighting", "x")):
        with pytest.raises((ValueError, ConfigError)):
            resolve(DISTAR, "toy2d", (), {f"method.{key}": value, "rewards": LINEAR})


def test_contract_roles_change_frozen_do_not_and_resume_is_exact(tmp_path):
    from fewstep_rl.run import build_method, resolve
    from fewstep_rl.testing.contract import TINY

    fresh = build_method(resolve(DISTAR, "toy2d", (), {**TINY, **TOY}))
    fresh.configure_model()
    before, probe = role_state(fresh), teacher_probe(fresh)
    full, _, logged = run_fit(DISTAR, tmp_path / "full", steps=7, overrides=TOY)
    assert logged["_all_finite"] == 1.0 and "train/generator/loss" in logged
    after = role_state(full)
    for role in full.trainable_roles:
        assert not same(before, after, role), role
    assert torch.equal(probe, teacher_probe(full))
    resumed = run_interrupted_and_resumed(DISTAR, tmp_path, steps=7, interrupt_after=3, overrides=TOY)
    a, b = role_state(full), role_state(resumed)
    assert all(same(a, b, r) for r in a)
    sd = torch.load(tmp_path / "part" / "k.ckpt", weights_only=False)["state_dict"]  # the interrupted run's
    assert all(full.backbone.is_role_key(k[len("backbone.") :]) for k in sd)


def test_terminal_reward_raises_the_mean_reward(tmp_path):
    """Direction: 400 iterations on toy2d raise the mean linear reward clearly above the teacher's 0."""
    from fewstep_rl.eval.callbacks import evaluate_method

    over = TOY | {
        "method.batch_size": 128,
        "world.hidden": 64,
        "method.fake_updates_per_gen": 2,
        "trainer.eval_samples": 64,
    }
    module, _, logged = run_fit(DISTAR, tmp_path, steps=400, overrides=over)
    assert logged["_all_finite"] == 1.0
    m, _, _ = evaluate_method(module, 2000, seed=3)
    assert m["reward_mean"] > 0.2, m
