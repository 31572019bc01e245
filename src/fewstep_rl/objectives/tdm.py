"""TDM trajectory pieces shared by TDM and TDM-R1 (methods.md §4.1, §4.6(a), §4.6(c)).

* Fake score on the trajectory (§4.6(a)): at ``x_τ = a·x^G_{j+1} + b·n`` (ambient kernel from the generator's Euler
  next point, §1.3) regress the fake velocity on the x0-anchored target ``u = (x_τ − x̂0)/τ`` (it denoises exactly to
  the generator's clean estimate of step j), plus ``reg × mean (T(x_τ) − f(x_τ))²`` toward the frozen base:
  ``L_φ = mean (u − f)² + reg · mean (T − f)²``.
* Direction-loss weights (§4.6(c)): ``w = mean_d |x̂0 − x̂0_ref|`` per sample, or (``batch``) its batch mean — the same
  fixed point, but a finite-variance estimator in very low dimension (see :mod:`fewstep_rl.objectives.dmd`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import per_sample_mean, upcast
from fewstep_rl.objectives.ambient import anchored_target

Normalizer = Literal["sample", "batch"]


def tdm_fake_loss(
    v_fake: Tensor,
    x_tau: Tensor,
    x0_hat: Tensor,
    tau: Tensor | float,
    v_teacher: Tensor | None = None,
    reg: float = 0.0,
) -> Tensor:
    """``mean (u − f)² + reg · mean (T − f)²`` with ``u = (x_τ − x̂0)/τ`` (methods.md §4.6(a)).

    Args:
        v_fake: Fake-score velocity at ``(x_τ, τ)`` (with gradient).
        x_tau: Re-noised point.
        x0_hat: Generator clean estimate of the step (detached by this function).
        tau: Level(s) τ.
        v_teacher: Frozen-base velocity at ``(x_τ, τ)`` (needed when ``reg > 0``).
        reg: Weight of the pull toward the frozen base (TDM-R1: 0.02).

    Shapes:
        v_fake, x_tau, x0_hat, v_teacher: (B, ...); tau: () or (B,).
    """
    v = upcast(v_fake)
    u = anchored_target(upcast(x_tau), upcast(x0_hat).detach(), tau)
    loss = ((v - u) ** 2).mean()
    if reg:
        if v_teacher is None:
            raise ValueError("tdm_fake_loss: reg > 0 needs v_teacher")
        loss = loss + reg * ((v - upcast(v_teacher).detach()) ** 2).mean()
    return loss


def direction_weight(x0: Tensor, x0_ref: Tensor, normalizer: Normalizer = "sample") -> Tensor:
    """``w = mean_d |x̂0 − x̂0_ref|`` per sample ``(B,)``, or its batch mean broadcast to ``(B,)`` (detached).

    Shapes:
        x0, x0_ref: (B, ...).
    """
    if normalizer not in ("sample", "batch"):
        raise ValueError(f"normalizer must be 'sample' or 'batch', got {normalizer!r}")
    with torch.no_grad():
        w = per_sample_mean((upcast(x0) - upcast(x0_ref)).abs())
        if normalizer == "batch":
            w = w.mean().expand_as(w)
        return w.clamp_min(1e-8)
