"""Ambient re-noising, ambient velocity target and DSM loss, CPS transport, TDM anchored target (methods.md §1.3).

Data observed only at noise level ``s`` (``x_s = (1-s)x0 + sε``) is re-noised to ``t > s`` with

    a = (1-t)/(1-s),  b = √(t² - a²s²),  x_t = a·x_s + b·n,

which has exactly the forward marginal at ``t``. The ambient velocity target

    u_amb = -x_s/(1-s) + (t + (1-t)s²/(1-s)²)/b · n

has conditional mean ``E[u_amb | x_t]`` equal to the true marginal velocity at ``t`` and reduces to ``n - x0`` at
``s = 0``. Its variance blows up as ``t ↓ s`` (``b → 0``), so RTDMD's "scale-out" form regresses ``b·v`` on ``b·u``
(where ``b·u`` has no division by ``b``) with weight ``min(1/b², max_weight)``, i.e. an effective weight
``min(1, max_weight·b²)`` on ``‖v - u‖²`` (RTDMD ``flow_forward_target_v2``, §2.3 fake-score loss).

Deviations: none known; the scale-out loss is computed in the b-scaled form to stay finite at ``b = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import upcast
from fewstep_rl.sampling.param import expand_sigma
from fewstep_rl.sampling.transitions import Transition, transition_step


def ambient_coeffs(t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
    """Ambient kernel coefficients ``a = (1-t)/(1-s)``, ``b = √max(t² - a²s², 0)`` (methods.md §1.3).

    Args:
        t: Target level(s), ``t > s``.
        s: Observation level(s), ``s < 1``.

    Returns:
        ``(a, b)`` with the broadcast shape of ``t`` and ``s`` (not expanded to data dims).
    """
    t, s = torch.as_tensor(t), torch.as_tensor(s)
    a = (1 - t) / (1 - s)
    b = torch.sqrt(torch.clamp(t**2 - a**2 * s**2, min=0))
    return a, b


def _level(t: Tensor | float, x: Tensor) -> Tensor:
    """A level as a tensor on ``x``'s device (Python floats take ``x``'s floating dtype)."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t.to(x.device)
    return torch.as_tensor(t, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)


def ambient_renoise(x_s: Tensor, n: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
    """Re-noise ``x_s`` from level ``s`` to ``t``: ``x_t = a·x_s + b·n`` (methods.md §1.3).

    Shapes:
        x_s, n: (B, ...); t, s: () or (B,).
    """
    a, b = ambient_coeffs(_level(t, x_s), _level(s, x_s))
    return expand_sigma(a, x_s) * x_s + expand_sigma(b, x_s) * n


def _scaled_target(x_s: Tensor, n: Tensor, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(b·u_amb, b)`` with ``b·u_amb = -b·x_s/(1-s) + (t + (1-t)s²/(1-s)²)·n`` (no division by b)."""
    t, s = _level(t, x_s), _level(s, x_s)
    _, b = ambient_coeffs(t, s)
    c = t + (1 - t) * s**2 / (1 - s) ** 2
    bs, ss, cs = expand_sigma(b, x_s), expand_sigma(s, x_s), expand_sigma(c, x_s)
    return -bs * x_s / (1 - ss) + cs * n, bs


def ambient_velocity_target(x_s: Tensor, n: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
    """Ambient velocity target ``u = -x_s/(1-s) + (t + (1-t)s²/(1-s)²)/b · n`` (methods.md §1.3).

    ``n`` must be the noise used in :func:`ambient_renoise`. Infinite/NaN where ``b = 0`` (``t = s``).

    Shapes:
        x_s, n: (B, ...); t, s: () or (B,).
    """
    t, s = _level(t, x_s), _level(s, x_s)
    _, b = ambient_coeffs(t, s)
    c = t + (1 - t) * s**2 / (1 - s) ** 2
    ss, cs = expand_sigma(s, x_s), expand_sigma(c / b, x_s)
    return -x_s / (1 - ss) + cs * n


def ambient_dsm_loss(
    v_pred: Tensor,
    x_s: Tensor,
    n: Tensor,
    t: Tensor | float,
    s: Tensor | float,
    scale_out: bool = True,
    max_weight: float = 10.0,
) -> Tensor:
    """Ambient denoising score matching for a velocity network (methods.md §1.3, §2.3 fake-score loss).

    * ``scale_out=True`` (RTDMD): ``mean[min(1/b², max_weight)·(b·v - b·u)²]`` = ``mean[min(1, max_weight·b²)·(v-u)²]``.
    * ``scale_out=False``: plain ``mean (v - u)²`` (high variance as ``t ↓ s``).

    Args:
        v_pred: Velocity predicted at ``(x_t, t)``, ``x_t = ambient_renoise(x_s, n, t, s)``.
        x_s: Observed sample at level ``s`` (no gradient expected).
        n: Re-noising noise.
        t: Target level(s).
        s: Observation level(s).
        scale_out: Use RTDMD's b-scaled, weight-clamped form.
        max_weight: Weight clamp ``min(1/b², max_weight)``.

    Returns:
        Scalar loss (at least float32).

    Shapes:
        v_pred, x_s, n: (B, ...); t, s: () or (B,).
    """
    v, x_s, n = upcast(v_pred), upcast(x_s), upcast(n)
    if not scale_out:
        return ((v - ambient_velocity_target(x_s, n, t, s)) ** 2).mean()
    bu, b = _scaled_target(x_s, n, t, s)
    weight = 1 / torch.clamp(b**2, min=1 / max_weight)  # = min(1/b², max_weight)
    return (weight * (b * v - bu) ** 2).mean()


def cps_transport(x_t: Tensor, v: Tensor, t: Tensor | float, s: Tensor | float, z: Tensor, eta: float) -> Tensor:
    """CPS transition ``t → s`` with externally supplied noise ``z`` (methods.md §1.2 CPS, §2.3 generator step 3).

    ``(1-s)x̂0 + s cos θ ε̂ + s sin θ z`` with ``θ = ηπ/2``, ``x̂0 = x_t - t·v``, ``ε̂ = x_t + (1-t)v``. Using the same
    ``z`` for teacher and fake velocities makes their difference noise-free:
    ``[s cos θ (1-t) - t(1-s)]·(v_F - v_T)``.

    Shapes:
        x_t, v, z: (B, ...); t, s: () or (B,).
    """
    x_next, _, _ = transition_step(Transition("cps", eta), x_t, t, s, v, z)
    return x_next


def anchored_target(x_tau: Tensor, x0_hat: Tensor, tau: Tensor | float) -> Tensor:
    """TDM x0-anchored velocity target ``u = (x_τ - x̂0)/τ`` (methods.md §1.3), which denoises exactly to ``x̂0``.

    Shapes:
        x_tau, x0_hat: (B, ...); tau: () or (B,).
    """
    return (x_tau - x0_hat) / expand_sigma(tau, x_tau)
