"""Generic direction loss, the TDM/TDM-R1 generalisation of the DMD loss (methods.md §1.4, §4.1, §4.6).

For a stop-gradient correction direction ``d`` and per-sample weight ``w``:

    e = (sg(y + d) - y)²,   L = mean[ρ(e) / w],   ρ(e) = e   or   √(e + c²) - c  (pseudo-Huber, c = 1e-3).

Deviations: the pseudo-Huber is applied elementwise (per latent entry), as in LCM-style losses; the TDM code was
not re-checked on this point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import upcast
from fewstep_rl.sampling.param import expand_sigma


def direction_loss(y: Tensor, d: Tensor, w: Tensor | float | None = None, huber_c: float | None = None) -> Tensor:
    """``mean[ρ((sg(y+d) - y)²) / w]`` (methods.md §1.4 TDM generalisation).

    Without Huber and ``w = 1`` the gradient with respect to ``y`` is ``-2d/numel``.

    Args:
        y: Differentiable generator quantity.
        d: Correction direction (detached).
        w: Per-sample weight ``(B,)`` or scalar (detached); None → 1.
        huber_c: Pseudo-Huber constant c; None → squared error.

    Returns:
        Scalar loss (at least float32).

    Shapes:
        y, d: (B, ...); w: () or (B,).
    """
    y = upcast(y)
    target = (y + upcast(d)).detach()
    e = (target - y) ** 2
    if huber_c is not None:
        e = torch.sqrt(e + huber_c**2) - huber_c
    if w is not None:
        e = e / expand_sigma(w.detach() if isinstance(w, Tensor) else w, e)
    return e.mean()
