"""Fake-score self-consistency regulariser (methods.md §2.3 "Consistency regulariser", RTDMD
``_compute_consistency_loss``).

With the fake denoiser's clean estimate ``h(x, t) = x - t·v_φ(x, t)``, anchor ``h0 = h(x_t, t)`` and two independent
CPS transitions ``x'_1, x'_2`` to ``t' < t``, ``h_i = h(x'_i, t')``:

    L_cons = mean[(h1 - h0) ⊙ (h2 - h0)]

is an unbiased estimate of ``‖E[h(x_{t'}) | x_t] - h(x_t)‖²`` (the two paths are conditionally independent).
The plain MSE ``mean (h1 - h0)²`` is the biased alternative (it adds the conditional variance of ``h1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import upcast


def consistency_loss(h0: Tensor, h1: Tensor, h2: Tensor) -> Tensor:
    """Two-sample unbiased consistency loss ``mean[(h1-h0)(h2-h0)]``; non-finite products → 0 (methods.md §2.3).

    Non-finite entries are masked before the product, so their gradient is 0 (not NaN).

    Shapes:
        h0, h1, h2: (B, ...).
    """
    d1, d2 = upcast(h1) - upcast(h0), upcast(h2) - upcast(h0)
    with torch.no_grad():
        ok = torch.isfinite(d1) & torch.isfinite(d2) & torch.isfinite(d1 * d2)
    d1 = torch.where(ok, d1, torch.zeros_like(d1))
    d2 = torch.where(ok, d2, torch.zeros_like(d2))
    return (d1 * d2).mean()


def consistency_mse(h0: Tensor, h1: Tensor) -> Tensor:
    """Biased single-sample alternative ``mean (h1 - h0)²`` (methods.md §2.3).

    Shapes:
        h0, h1: (B, ...).
    """
    return ((upcast(h1) - upcast(h0)) ** 2).mean()
