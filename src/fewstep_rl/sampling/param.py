"""Flow-matching parameterisation helpers (methods.md §1.1).

Convention everywhere in fewstep-rl: ``x_σ = (1-σ)·x0 + σ·ε`` with σ ∈ [0, 1] (σ = 1 is pure noise), and the
network predicts the velocity ``v ≈ ε - x0``. From a velocity at ``(x, σ)``:

* clean estimate ``x̂0 = x - σ·v``
* noise estimate ``ε̂ = x + (1-σ)·v``
* score ``∇ log p_σ(x) ≈ -ε̂/σ``
* inverse maps ``v = (x - x̂0)/σ = (ε̂ - x)/(1-σ)``.

All functions accept ``sigma`` as a Python float, a 0-d tensor or a per-sample tensor of shape ``(B,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Make a noise level broadcastable against ``x`` (methods.md §1.1).

    Args:
        sigma: Scalar, 0-d tensor, per-sample tensor ``(B,)``, or an already expanded ``(B, 1, ..., 1)``.
        x: Reference tensor; its device is used, and its dtype when ``sigma`` is not already a floating tensor.

    Returns:
        ``sigma`` as a tensor of shape ``()`` (scalar input) or ``(B, 1, ..., 1)`` with ``x.ndim`` dims.

    Raises:
        ValueError: If ``sigma`` does not have one entry per sample of ``x``.

    Shapes:
        sigma: (), (B,) or (B, 1, ..., 1); x: (B, ...).
    """
    if not isinstance(sigma, Tensor) or not sigma.is_floating_point():
        sigma = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else torch.float32)
    sigma = sigma.to(device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim == x.ndim and sigma.shape[0] in (1, x.shape[0]) and all(n == 1 for n in sigma.shape[1:]):
        return sigma  # already (B, 1, ..., 1)
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have shape (B,) = ({x.shape[0]},), got shape {tuple(sigma.shape)}"
            f" for x of shape {tuple(x.shape)}"
        )
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def x0_from_v(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Clean estimate ``x̂0 = x - σ·v`` (methods.md §1.1)."""
    return x - expand_sigma(sigma, x) * v


def eps_from_v(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Noise estimate ``ε̂ = x + (1-σ)·v`` (methods.md §1.1)."""
    return x + (1 - expand_sigma(sigma, x)) * v


def score_from_v(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Score estimate ``∇_x log p_σ(x) ≈ -ε̂/σ`` (methods.md §1.1). Undefined at σ = 0."""
    return -eps_from_v(x, sigma, v) / expand_sigma(sigma, x)


def v_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """Velocity from a clean estimate, ``v = (x - x̂0)/σ`` (methods.md §1.1). Undefined at σ = 0."""
    return (x - x0) / expand_sigma(sigma, x)


def v_from_eps(x: Tensor, sigma: Tensor | float, eps: Tensor) -> Tensor:
    """Velocity from a noise estimate, ``v = (ε̂ - x)/(1-σ)`` (methods.md §1.1). Undefined at σ = 1."""
    return (eps - x) / (1 - expand_sigma(sigma, x))


def forward_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Forward interpolation ``x_σ = (1-σ)·x0 + σ·ε`` (methods.md §1.1, §1.3 "clean forward")."""
    s = expand_sigma(sigma, x0)
    return (1 - s) * x0 + s * eps
