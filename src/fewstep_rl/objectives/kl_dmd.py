"""Unnormalised ("KL-scaled") distribution-matching loss: the exact gradient of KL between diffused marginals.

Let ``x_t = (1-t)·y + t·n`` with ``y`` the generator's clean sample and ``n ~ N(0, I)``. With scores
``s(x) = -(x - (1-t)x̂0)/t²`` (methods.md §1.1) the pathwise gradient of ``KL(q_t ‖ p_t)`` (generator law ``q``,
teacher law ``p``, both diffused to level ``t``) with respect to one clean sample is

    ∇_y KL_t = (1-t)·(s_q(x_t) - s_p(x_t)) = (1-t)²/t² · (x̂0_F - x̂0_T),

with ``x̂0_F``, ``x̂0_T`` the fake-score (≈ q) and teacher clean estimates at ``(x_t, t)``. :func:`kl_dmd_loss` is the
surrogate ``mean_b Σ_d ½ (y - sg(y - g))²`` with that ``g`` (float64, non-finite → 0): its gradient with respect to
sample ``b`` is ``g_b / B``, i.e. the batch mean of the per-sample KL gradients. Unlike the normalised DMD loss
(methods.md §1.4, :func:`~fewstep_rl.objectives.dmd.dmd_loss`), whose per-sample normaliser ``mean_d|y - x̂0_T|``
makes the scale arbitrary, this keeps the KL's scale, so adding ``-mean_b r(y)/β`` gives the gradient of
``KL_t(q ‖ p) - E_q[r]/β``. As ``t → 0`` its minimiser is the reward-tilted teacher ``p·exp(r/β)/Z``; for ``t > 0``
the diffused KL is weaker (a Gaussian teacher of std ``s`` tilted by a linear reward moves by
``s²w/β · s^{-2}/E_t[(1-t)²/((1-t)²s² + t²)]`` instead of ``s²w/β``), so callers keep ``t`` small.

This is not in methods.md: RTDMD uses the normalised loss with fixed weights (1e-3 DMD : 1e-4 BP), whose implied
β is not a closed form. ``methods/rtdmd.py`` offers this form as ``dmd_weighting: kl`` so β is explicit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.sampling.param import expand_sigma


def kl_dmd_direction(y: Tensor, y_fake: Tensor, y_teacher: Tensor, t: Tensor | float) -> Tensor:
    """``g = (1-t)²/t² · (x̂0_F - x̂0_T)`` in float64, non-finite → 0 (detached).

    Shapes:
        y, y_fake, y_teacher: (B, ...); t: () or (B,).
    """
    tt = expand_sigma(torch.as_tensor(t, dtype=torch.float64, device=y.device), y.detach().double())
    g = (1 - tt) ** 2 / tt**2 * (y_fake.detach().double() - y_teacher.detach().double())
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g))


def kl_dmd_loss(y: Tensor, y_fake: Tensor, y_teacher: Tensor, t: Tensor | float) -> Tensor:
    """``mean_b Σ_d ½(y - sg(y - g))²`` with :func:`kl_dmd_direction`; ``∂L/∂y_b = g_b / B``.

    Args:
        y: Differentiable clean generator samples.
        y_fake: Fake-score clean estimates at ``x_t = (1-t)y + t n`` (stop-gradient).
        y_teacher: Teacher clean estimates at the same ``x_t`` (stop-gradient).
        t: Re-noising level(s), ``0 < t < 1``.

    Returns:
        Scalar in ``y``'s dtype (computed in float64).

    Shapes:
        y, y_fake, y_teacher: (B, ...); t: () or (B,).
    """
    g = kl_dmd_direction(y, y_fake, y_teacher, t)
    y64 = y.double()
    per = 0.5 * ((y64 - (y64 - g).detach()) ** 2).reshape(y.shape[0], -1).sum(1)
    return per.mean().to(y.dtype)
