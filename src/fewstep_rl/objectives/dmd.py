"""Normalised DMD surrogate loss (methods.md §1.4; used by RTDMD §2.3–2.4, DMD/DMD2 §6.1, TDM, TDM-R1).

Given a differentiable generator quantity ``y`` and stop-gradient fake/teacher estimates ``ŷ_F``, ``ŷ_T``:

    g = (ŷ_F - ŷ_T) / mean_d |y - ŷ_T|     (per sample; non-finite → 0)
    L = ½ · mean (y - sg(y - g))²

computed in float64 (as RTDMD and DMD2), so ``∂L/∂y = g / numel(y)``.

Deviations: DMD2 uses ``torch.nan_to_num`` (which maps ±inf to ±float-max); here every non-finite entry of ``g``
becomes 0, as the spec states.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dmd_grad_direction(y: Tensor, y_fake: Tensor, y_teacher: Tensor, normalizer: str = "sample") -> Tensor:
    """Normalised DMD direction ``g = (ŷ_F - ŷ_T) / mean_d|y - ŷ_T|`` in float64, non-finite → 0 (methods.md §1.4).

    ``normalizer="sample"`` is the paper's per-sample mean over dimensions. ``"batch"`` divides by the mean over the
    whole batch instead: the same fixed point (g = 0 iff ŷ_F = ŷ_T), but a finite-variance estimator when samples
    have few dimensions — in 2-D the per-sample ``1/mean|y − ŷ_T|`` has infinite variance (its density near 0 is
    ∝ r), so a few samples dominate each step.

    Args:
        y: Generator quantity (only its value is used).
        y_fake: Fake-score estimate of ``y``.
        y_teacher: Teacher estimate of ``y``.
        normalizer: ``"sample"`` (per sample, DMD/DMD2) or ``"batch"``.

    Returns:
        float64 tensor shaped like ``y``, without gradient.

    Shapes:
        y, y_fake, y_teacher: (B, ...).
    """
    y64, yf, yt = y.detach().double(), y_fake.detach().double(), y_teacher.detach().double()
    if normalizer not in ("sample", "batch"):
        raise ValueError(f"normalizer must be 'sample' or 'batch', got {normalizer!r}")
    dims = tuple(range(1, y.ndim))
    if normalizer == "batch":
        norm = (y64 - yt).abs().mean()
    else:
        norm = (y64 - yt).abs().mean(dim=dims, keepdim=True) if dims else (y64 - yt).abs()
    g = (yf - yt) / norm
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g))


def dmd_loss(y: Tensor, y_fake: Tensor, y_teacher: Tensor, normalizer: str = "sample") -> Tensor:
    """DMD loss ``½·mean(y - sg(y - g))²`` (methods.md §1.4), gradient ``g/numel`` with respect to ``y``.

    Args:
        y: Differentiable generator quantity (clean latent or intermediate latent).
        y_fake: Fake-score estimate (treated as stop-gradient).
        y_teacher: Teacher estimate (treated as stop-gradient).

    Returns:
        Scalar loss in ``y``'s dtype (computed in float64).

    Shapes:
        y, y_fake, y_teacher: (B, ...).
    """
    g = dmd_grad_direction(y, y_fake, y_teacher, normalizer)
    y64 = y.double()
    target = (y64 - g).detach()
    return (0.5 * ((y64 - target) ** 2).mean()).to(y.dtype)
