"""Rewards of the ``toy2d`` world on points ``x ∈ R^d``: a differentiable linear reward and a black-box box indicator.

Both have closed-form reward-tilted targets ``p(x|c)·exp(r(x)/β)/Z(c)`` in :mod:`fewstep_rl.worlds.toy2d`: the
linear tilt of a Gaussian mixture is again a Gaussian mixture; the bounded region reward is sampled exactly by
rejection (acceptance ``exp((r − r_max)/β)``), which is why :class:`RegionReward` exposes :meth:`~RegionReward.bounds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward


def _check_points(name: str, samples: Tensor, d: int) -> None:
    if samples.dim() != 2 or samples.shape[1] != d:
        raise ValueError(f"reward {name!r} expects points of shape (B, {d}), got {tuple(samples.shape)}")


@dataclasses.dataclass
class LinearConfig:
    """Knobs of :class:`LinearReward`."""

    w: list[float] = knob([1.0, 0.0], "direction w of r(x) = w·x + b; its length must equal the world's dimension")
    b: float = knob(0.0, "offset b of r(x) = w·x + b (does not change the tilted target)")

    def __post_init__(self) -> None:
        if len(self.w) == 0:
            raise ValueError("linear reward: w must have at least one entry")


class LinearReward(Reward):
    """``r(x) = w·x + b`` (differentiable), with ``∇_x r = w``."""

    name = "linear"
    differentiable = True
    Config = LinearConfig

    def __init__(self, cfg: LinearConfig | None = None) -> None:
        super().__init__(cfg)
        self.register_buffer("w", torch.tensor(self.cfg.w, dtype=torch.float32), persistent=False)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        _check_points(self.name, samples, self.w.numel())
        return samples @ self.w.to(samples) + self.cfg.b


@dataclasses.dataclass
class RegionConfig:
    """Knobs of :class:`RegionReward`."""

    low: list[float] = knob([1.0, -1.0], "lower corner of the box (one entry per dimension)")
    high: list[float] = knob([3.0, 1.0], "upper corner of the box (one entry per dimension, > low)")
    value: float = knob(1.0, "reward inside the box (0 outside)")

    def __post_init__(self) -> None:
        if len(self.low) != len(self.high) or len(self.low) == 0:
            raise ValueError(
                f"region reward: low and high need the same non-zero length, got {self.low} and {self.high}"
            )
        bad = [i for i, (lo, hi) in enumerate(zip(self.low, self.high)) if not lo < hi]
        if bad:
            raise ValueError(f"region reward: need low < high in every dimension; violated at index {bad}")


class RegionReward(Reward):
    """Box indicator ``r(x) = value · 1[low ≤ x ≤ high]`` (element-wise, bounds included); a black box."""

    name = "region"
    differentiable = False
    Config = RegionConfig

    def __init__(self, cfg: RegionConfig | None = None) -> None:
        super().__init__(cfg)
        self.register_buffer("low", torch.tensor(self.cfg.low, dtype=torch.float32), persistent=False)
        self.register_buffer("high", torch.tensor(self.cfg.high, dtype=torch.float32), persistent=False)

    def bounds(self) -> tuple[float, float]:
        """``(min r, max r)`` over R^d: ``(min(0, value), max(0, value))``."""
        return min(0.0, self.cfg.value), max(0.0, self.cfg.value)

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        _check_points(self.name, samples, self.low.numel())
        inside = ((samples >= self.low.to(samples)) & (samples <= self.high.to(samples))).all(dim=1)
        return inside.to(samples.dtype) * self.cfg.value
