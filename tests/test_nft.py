"""DiffusionNFT (methods/nft.py, objectives/nft.py): hand-checked loss, gradient signs, behaviour on toy2d."""

import pytest
import torch

from fewstep_rl.objectives.nft import nft_policy_loss

NFT = "fewstep_rl.methods.nft:DiffusionNFT"


def test_nft_loss_hand_value():
    x0 = torch.tensor([[1.0, -1.0]])
    x_t = torch.tensor([[0.5, 0.5]])
    t = torch.tensor([0.5])
    v = torch.tensor([[0.0, 1.0]])
    v_old = torch.tensor([[1.0, 1.0]])
    # β = 1: v+ = v -> x̂0 = [0.5, 0] -> e+ = [-0.5, 1]; mean e² = 0.625, mean|e| = 0.75
    #        v- = 2 v_old - v = [2, 1] -> x̂0 = [-0.5, 0] -> e- = [-1.5, 1]; mean e² = 1.625, mean|e| = 1.25
    for r, expected in (
        (1.0, 5 * 0.625 / 0.75),
        (0.0, 5 * 1.625 / 1.25),
        (0.25, 5 * (0.25 * 0.625 / 0.75 + 0.75 * 1.3)),
    ):
        loss, m = nft_policy_loss(v, v_old, x_t, x0, t, torch.tensor([r]), beta=1.0)
        assert float(loss) == pytest.approx(expected, rel=1e-6), r
    # β = 0.5: v+ = 0.5 v + 0.5 v_old = [0.5, 1] -> e+ = [-0.75, 1]; loss scale A_max/β = 10
    loss, _ = nft_policy_loss(v, v_old, x_t, x0, t, torch.tensor([1.0]), beta=0.5)
    assert float(loss) == pytest.approx(10 * ((0.75**2 + 1) / 2) / 0.875, rel=1e-6)


def test_nft_gradient_signs_at_the_old_policy():
    """At v = v_old positive samples pull x̂0 toward x0, negative ones push it away (equal and opposite)."""
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    t = torch.full((4,), 0.4)
    v_old = torch.randn(4, 3, generator=g)
    grads = {}
    for r in (1.0, 0.0):
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_policy_loss(v, v_old, x_t, x0, t, torch.full((4,), r), beta=1.0)
        (grads[r],) = torch.autograd.grad(loss, v)
    assert torch.allclose(grads[1.0], -grads[0.0], atol=1e-6)
    # descent on the positive loss moves x̂0 = x_t − t v toward x0
    e = x_t - t[:, None] * v_old - x0
    # dL/dv = −2 t e / (d w) for the positive term, so a descent step dv = −grad changes e by −t·dv ∝ −e
    assert float((grads[1.0] * (t[:, None] * e)).sum()) < 0
    w = e.abs().mean(1, keepdim=True)
    assert torch.allclose(grads[1.0], 5 * (-2 * t[:, None] * e) / (3 * w) / 4, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        nft_policy_loss(v_old, v_old, x_t, x0, t, torch.ones(4), beta=0.0)


def test_config_errors():
    from fewstep_rl.methods.nft import DiffusionNFTConfig

    with pytest.raises(ValueError, match="whole prompt groups"):
        DiffusionNFTConfig(batch_size=3, opt_steps_per_epoch=2)
    with pytest.raises(ValueError, match="nft_beta"):
        DiffusionNFTConfig(nft_beta=0.0)
    with pytest.raises(ValueError, match="old decay"):
        DiffusionNFTConfig(old_dmax=2.0)


def test_presets_resolve():
    from fewstep_rl.run import resolve

    for world in ("toy2d", "shapes", "sd3"):
        r = resolve(NFT, world, (f"configs/nft/{world}.yaml",))
        assert r.method.nft_beta == 1.0


def test_toy2d_reward_rises(tmp_path):
    """Linear reward x_1: after a few dozen epochs the generator's samples sit further right for both prompts."""
    from fewstep_rl.testing.contract import run_fit

    over = {
        "method.batch_size": 8,
        "method.group_size": 8,
        "method.num_steps": 8,
        "method.optim.lr": 3e-3,
        "method.opt_steps_per_epoch": 1,
        "world.hidden": 32,
        "trainer.eval_samples": 64,
        "trainer.progress_bar": False,
    }
    module, _, logged = run_fit(NFT, tmp_path, steps=40, overrides=over)
    g = torch.Generator().manual_seed(0)
    prompts = ["left", "right"] * 256
    with torch.no_grad():
        x = module.generate(prompts, g, role="generator")
        x_ref = module.generate(prompts, torch.Generator().manual_seed(0), role="teacher")
    shift = (x[:, 0] - x_ref[:, 0]).reshape(-1, 2).mean(0)
    assert (shift > 0.05).all(), f"both prompts should move toward larger x_1, got {shift.tolist()}"
