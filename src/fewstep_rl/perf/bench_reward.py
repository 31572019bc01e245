"""A cheap differentiable reward for benchmarks: the mean of the decoded image's centre crop.

Real rewards (PickScore, CLIPScore) need local checkpoints; the performance benchmarks measure the generator side
(transformer passes, VAE decode, optimiser steps) and use this stand-in so reward back-prop paths still run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fewstep_rl.rewards.base import Reward


class MeanPixelReward(Reward):
    """``r(img) = mean(img)`` over channels and pixels (differentiable)."""

    name = "mean_pixel"
    differentiable = True

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        return samples.float().mean(dim=tuple(range(1, samples.dim())))
