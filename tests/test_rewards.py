"""Built-in rewards: linear and region (toy2d), JPEG (in)compressibility."""

import pytest
import torch

from fewstep_rl import registry
from fewstep_rl.config import ConfigError, build
from fewstep_rl.rewards import MultiReward
from fewstep_rl.rewards.jpeg import JpegCompressibility, JpegConfig
from fewstep_rl.rewards.toy2d import LinearConfig, LinearReward, RegionConfig, RegionReward


def test_registered_names():
    assert registry.load("rewards", "linear") is LinearReward
    assert registry.load("rewards", "region") is RegionReward
    assert registry.load("rewards", "jpeg") is JpegCompressibility


def test_linear_value_and_gradient_hand_checked():
    r = LinearReward(build(LinearConfig, {"w": [2, -1], "b": 0.5}, "reward"))
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], requires_grad=True)
    out = r(x, ["a"] * 3)
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 7.5]))  # 2·1 − 2 + .5, .5, 6 + 1 + .5
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.tensor([[2.0, -1.0]] * 3))
    assert LinearReward().cfg.w == [1.0, 0.0] and LinearReward.differentiable
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        r(torch.zeros(2, 3), ["a", "b"])


def test_region_indicator_and_black_box():
    r = RegionReward(build(RegionConfig, {"low": [1, -1], "high": [3, 1], "value": 2.0}, "reward"))
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.99, 0.0], [2.0, 1.01], [-2.0, 0.0]], requires_grad=True)
    out = r(x, [""] * 5)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))  # bounds included
    assert not out.requires_grad and not RegionReward.differentiable
    assert r.bounds() == (0.0, 2.0)
    with pytest.raises(ConfigError, match="low < high"):
        build(RegionConfig, {"low": [1, 2], "high": [3, 2]}, "reward")
    with pytest.raises(ConfigError, match="same non-zero length"):
        build(RegionConfig, {"low": [1], "high": [3, 2]}, "reward")


def test_multireward_combines_linear_and_region():
    mr = MultiReward([LinearReward(), RegionReward()], [1.0, 3.0])
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    torch.testing.assert_close(mr.combine(mr(x, ["", ""])), torch.tensor([2.0 + 3.0, -2.0]))


def test_jpeg_compressibility():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=gen)
    r = JpegCompressibility()
    s_flat, s_noise = r(flat, ["x"]), r(noise, ["x"])
    assert s_flat.item() < 0 and s_flat.item() > s_noise.item()  # flat compresses better
    assert s_noise.item() < -5.0  # 64² noise at q=95 is > 5 kB
    inc = JpegCompressibility(build(JpegConfig, {"sign": "incompressibility"}, "reward"))
    torch.testing.assert_close(inc(torch.cat([flat, noise]), ["x", "y"]), -torch.cat([s_flat, s_noise]))
    assert r(torch.cat([flat, flat]), ["x", "x"]).unique().numel() == 1  # deterministic
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        r(torch.rand(2, 64, 64), ["x", "y"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        r(torch.rand(1, 1, 8, 8), ["x"])
    with pytest.raises(ConfigError, match="did you mean 'incompressibility'"):
        build(JpegConfig, {"sign": "incompresibility"}, "reward")
    with pytest.raises(ConfigError, match="quality"):
        build(JpegConfig, {"quality": 0}, "reward")
