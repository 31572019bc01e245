"""Flow-GRPO (methods/flow_grpo.py): contract checks, PPO ratio, KL reference, init_from, toy2d behaviour."""

import pytest
import torch

from fewstep_rl.config import ConfigError
from fewstep_rl.testing.contract import role_state, run_fit, run_interrupted_and_resumed, same, teacher_probe

M = "fewstep_rl.methods.flow_grpo:FlowGRPO"
# the paper regime with two optimiser steps per epoch (the toy2d preset runs regime tilt with one)
SMALL = {"method.batch_size": 4, "method.group_size": 4, "method.optim.lr": 1e-3, "method.regime": "paper",
         "method.opt_steps_per_epoch": 2}


def _build(over):
    from fewstep_rl.run import build_method, resolve

    m = build_method(resolve(M, "toy2d", (), {"world.hidden": 32, "trainer.progress_bar": False, **over}))
    m.configure_model()
    return m


def test_contract_roles_change_snapshots_and_teacher_frozen_checkpoint_slim(tmp_path):
    fresh = _build(SMALL)
    before, probe = role_state(fresh), teacher_probe(fresh)
    ck = tmp_path / "a.ckpt"
    module, _, logged = run_fit(M, tmp_path, steps=4, overrides=SMALL, save_as=str(ck))
    after = role_state(module)
    assert logged["_all_finite"] == 1.0 and "train/generator/loss" in logged
    assert not same(before, after, "generator") and not same(before, after, "ema")
    assert same(before, after, "ref_policy"), "the KL reference must stay frozen"
    assert torch.equal(probe, teacher_probe(module))
    sd = torch.load(ck, weights_only=False)["state_dict"]
    n_role = sum(p.numel() for r in module.backbone.roles for p in module.backbone.role_parameters(r))
    assert sum(v.numel() for v in sd.values()) == n_role
    assert module.updates == {"generator": 4 * 2}  # two optimiser steps per epoch


def test_resume_is_bit_exact(tmp_path):
    full, _, _ = run_fit(M, tmp_path / "full", steps=5, overrides=SMALL)
    resumed = run_interrupted_and_resumed(M, tmp_path, steps=5, interrupt_after=2, overrides=SMALL)
    a, b = role_state(full), role_state(resumed)
    for role in a:
        assert same(a, b, role), role
    assert resumed.updates == full.updates


def test_ppo_ratio_is_one_in_the_first_chunk_only(tmp_path):
    _, _, logged = run_fit(M, tmp_path, steps=1, overrides=SMALL)
    assert logged["train/ppo/log_ratio_max_abs_chunk0"] == 0.0  # same weights as the rollout
    assert logged["train/ppo/log_ratio_max_abs_chunk1"] > 0.0  # after the first optimiser step


def test_kl_to_reference_is_zero_at_start_and_grows():
    m = _build(SMALL)
    prompts = ["left", "right"] * 4
    cond = m.backbone.encode_prompts(prompts)
    m.cfg.opt_steps_per_epoch = 1
    tr = m.rollout(prompts, [cond])[0]
    adv = torch.linspace(-1, 1, len(prompts))
    _, metrics = m.step_loss(tr, 0, cond, adv)
    assert metrics["kl"].item() == 0.0
    with torch.no_grad():
        for p in m.backbone.role_parameters("generator"):
            p.add_(0.05)
    _, metrics = m.step_loss(tr, 0, cond, adv)
    assert metrics["kl"].item() > 0.0


def test_shared_init_noise_is_shared_within_groups():
    m = _build({**SMALL, "method.shared_init_noise": True, "method.opt_steps_per_epoch": 1})
    prompts = ["left"] * 4 + ["right"] * 4
    tr = m.rollout(prompts, [m.backbone.encode_prompts(prompts)])[0]
    x = tr.x_in[0]
    assert torch.equal(x[0], x[3]) and torch.equal(x[4], x[7]) and not torch.equal(x[0], x[4])


@pytest.mark.parametrize(
    "over, match",
    [({"method.transition": "euler"}, "deterministic"), ({"method.opt_steps_per_epoch": 3}, "opt_steps_per_epoch"),
     ({"method.group_size": 1}, "group_size"), ({"method.transition": "ddim"}, "transition")],
)
def test_bad_config_is_rejected(over, match):
    from fewstep_rl.run import resolve

    with pytest.raises((ValueError, ConfigError), match=match):
        resolve(M, "toy2d", (), {**SMALL, **over})


def test_init_from_loads_generator_reference_and_ema(tmp_path):
    ck = tmp_path / "a.ckpt"
    src, _, _ = run_fit(M, tmp_path / "a", steps=2, overrides=SMALL, save_as=str(ck))
    m = _build({**SMALL, "method.init_from": str(ck)})
    for role in ("generator", "ref_policy", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(m.backbone.role_parameters(role),
                                                     src.backbone.role_parameters("ema")))


def test_flow_grpo_raises_the_reward_on_toy2d(tmp_path):
    from fewstep_rl.eval.callbacks import evaluate_method

    over = {"method.batch_size": 8, "method.group_size": 16, "method.optim.lr": 1e-3, "method.ema_every": 1}
    start = evaluate_method(_build(over), 2000, seed=11)[0]
    module, _, _ = run_fit(M, tmp_path, steps=80, overrides=over)
    end = evaluate_method(module, 2000, seed=11)[0]
    assert end["reward_mean"] > start["reward_mean"] + 0.2, (start, end)


def test_ema_warmup_counts_optimisation_steps_not_ema_updates():
    """Flow-GRPO's EMAModuleWrapper: d = min((1+n)/(10+n), 0.9) with n the optimisation step, updated when
    (n+1) % every == 0. With every = 8 the first blend (n = 7) uses d = 8/17, not the d = 1/10 of a count of EMA
    updates (which tracks the raw generator ~8× longer)."""
    from fewstep_rl.roles import EMA, add_roles
    from fewstep_rl.worlds.toy2d import Toy2DConfig, Toy2DWorld

    bb = Toy2DWorld(Toy2DConfig(hidden=8)).build_backbone()
    add_roles(bb, ("generator",), {"ema": "generator"})
    ema = EMA("ema", "generator", decay=0.9, every=8, warmup=True)
    with torch.no_grad():
        for p in bb.role_parameters("generator"):
            p.fill_(1.0)
        for p in bb.role_parameters("ema"):
            p.zero_()
    for n in range(7):  # no blend before the 8th optimisation step
        ema.update(bb, n)
    assert all(float(p.abs().max()) == 0.0 for p in bb.role_parameters("ema"))
    ema.update(bb, 7)
    d1 = 8 / 17
    got = bb.role_parameters("ema")[0].flatten()[0].item()
    assert got == pytest.approx(1 - d1, abs=1e-6)
    for n in range(8, 16):
        ema.update(bb, n)
    d2 = min(16 / 25, 0.9)  # n = 15
    got = bb.role_parameters("ema")[0].flatten()[0].item()
    assert got == pytest.approx(1 - d2 * d1, abs=1e-6)
