"""TDM (methods/tdm.py): trajectory pieces by hand, gradient routing, toy2d distribution matching."""

import json
from pathlib import Path

import pytest
import torch

from fewstep_rl.config import ConfigError
from fewstep_rl.objectives.tdm import direction_weight, tdm_fake_loss
from fewstep_rl.run import assemble, build_method, resolve

METHOD = "fewstep_rl.methods.tdm:TDM"
PRESET = Path(__file__).resolve().parents[1] / "configs" / "tdm" / "toy2d.yaml"


def test_tdm_fake_loss_hand_values():
    # u = (x_τ − x̂0)/τ = ([1, 2] − [0, 1])/0.5 = [2, 2]; f = [1, 1] → mean (f − u)² = 1
    x_tau, x0, v_f = (
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[1.0, 1.0]], requires_grad=True),
    )
    assert float(tdm_fake_loss(v_f, x_tau, x0, 0.5)) == pytest.approx(1.0)
    # + 0.5 · mean (f − T)² with T = [0, 0] → 1 + 0.5 · 1 = 1.5; ∂/∂f = 2(f − u)/2 + 0.5 · 2(f − T)/2 = [-0.5, -0.5]
    loss = tdm_fake_loss(v_f, x_tau, x0, torch.tensor([0.5]), torch.zeros(1, 2), 0.5)
    assert float(loss) == pytest.approx(1.5)
    loss.backward()
    assert v_f.grad[0].tolist() == pytest.approx([-0.5, -0.5])
    with pytest.raises(ValueError, match="v_teacher"):
        tdm_fake_loss(v_f, x_tau, x0, 0.5, None, 0.1)


def test_direction_weight_hand_values():
    x0, ref = torch.tensor([[1.0, 3.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert direction_weight(x0, ref).tolist() == pytest.approx([2.0, 1.0])
    assert direction_weight(x0, ref, "batch").tolist() == pytest.approx([1.5, 1.5])
    with pytest.raises(ValueError, match="normalizer"):
        direction_weight(x0, ref, "global")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method.train_steps", 0, "train_steps"),
        ("method.level_margin", 1.0, "level_margin"),
        ("method.huber_c", -1.0, "huber_c"),
    ],
)
def test_bad_config_is_rejected(key, value, match):
    with pytest.raises(ConfigError, match=match):
        resolve(METHOD, "toy2d", (str(PRESET),), {key: value})


def test_fake_loss_reaches_only_the_fake_and_generator_loss_only_the_generator():
    module = build_method(resolve(METHOD, "toy2d", (str(PRESET),), {"world.hidden": 32}))
    module.configure_model()
    bb = module.backbone
    with torch.no_grad():
        for p in bb.role_parameters("fake_score"):
            p.add_(0.1 * torch.randn_like(p))
    prompts = ["left", "right"] * 4
    cond = bb.encode_prompts(prompts)
    x, sigma, s_next = torch.randn(8, 2), torch.full((8,), 0.75), torch.full((8,), 0.5)
    losses = module.step_losses(x, sigma, s_next, cond, "t")
    losses["fake"].backward(retain_graph=True)
    assert all(p.grad is None for p in bb.role_parameters("generator"))
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in bb.role_parameters("fake_score"))
    for p in bb.parameters():
        p.grad = None
    losses["generator"].backward()
    assert all(p.grad is None for p in bb.role_parameters("fake_score"))
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in bb.role_parameters("generator"))


def _fit(tmp_path, steps, **over):
    overrides = {
        "trainer.max_steps": steps,
        "trainer.run_dir": str(tmp_path),
        "trainer.progress_bar": False,
        "trainer.eval_every": 0,
        **over,
    }
    module, dm, trainer = assemble(resolve(METHOD, "toy2d", (str(PRESET),), overrides), tmp_path, [])
    trainer.fit(module, datamodule=dm)
    return module, json.loads((tmp_path / "final_metrics.json").read_text())


def _init_energy(module, n):
    """Energy distance to the teacher of the untrained generator's 4-step Euler chain (the teacher's own sampler)."""
    from fewstep_rl.eval.generate import cycle_prompts

    prompts = cycle_prompts(module.world.eval_prompts, n)
    g = torch.Generator().manual_seed(3)
    x = module.generate(prompts, g, role="teacher")
    return module.world.evaluate(x, prompts, generator=torch.Generator().manual_seed(4))["energy_teacher"]


def test_tdm_moves_the_generator_toward_the_teacher(tmp_path):
    """400 iterations (about 10 s): energy distance to the exact teacher falls well below the 4-step Euler start."""
    module, fm = _fit(tmp_path, 400, **{"trainer.eval_samples": 2000})
    init = _init_energy(module, 2000)
    assert fm["energy_teacher"] < 0.5 * init, (fm["energy_teacher"], init)
    assert module.updates == {"generator": 400, "fake_score": 400}
