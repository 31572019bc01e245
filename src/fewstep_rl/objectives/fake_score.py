"""Fake-score (and generic) flow-matching loss (methods.md §1.1, §6.1 "fake: standard denoising loss").

With ``x_σ = (1-σ)x0 + σε`` the regression target of a velocity network is ``u = ε - x0``.
"""

from __future__ import annotations

from torch import Tensor

from fewstep_rl.objectives._reduce import per_sample_mean, upcast, weighted_batch_mean


def flow_matching_loss(v_pred: Tensor, x0: Tensor, eps: Tensor, weight: Tensor | float | None = None) -> Tensor:
    """``mean_b[w_b · mean_d (v - (ε - x0))²]`` (methods.md §1.1).

    Args:
        v_pred: Predicted velocity at ``x_σ``.
        x0: Clean sample.
        eps: Noise used to build ``x_σ``.
        weight: Optional per-sample weight ``(B,)`` or scalar.

    Returns:
        Scalar loss (at least float32).

    Shapes:
        v_pred, x0, eps: (B, ...); weight: (B,).
    """
    err = (upcast(v_pred) - (upcast(eps) - upcast(x0))) ** 2
    return weighted_batch_mean(per_sample_mean(err), weight)
