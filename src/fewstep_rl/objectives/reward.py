"""Reward back-prop hinge (methods.md §2.4 "BP" term of the aux branch, §6.5 ReFL/DRaFT)."""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import upcast


def reward_hinge(r: Tensor, margin: float, scale: float) -> Tensor:
    """``scale · mean_i ReLU(margin - r_i)`` (methods.md §2.4; RTDMD margin 3, scale 1e-4).

    Shapes:
        r: (B,) differentiable (weighted-sum) rewards.
    """
    return scale * torch.relu(margin - upcast(r)).mean()
