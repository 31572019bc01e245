"""PPO-clip policy loss and mean-space KL (methods.md §2.4 step 6, §6.2 Flow-GRPO, §6.3 DanceGRPO).

``ρ = exp(log π_θ - log π_old)``, ``L = mean max(-A ρ, -A clip(ρ, 1-ε_lo, 1+ε_hi))``. With RTDMD's CPS surrogate
log-prob (§1.2) ratios are ``exp(-ΔMSE)``, hence its tight clip (1e-5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewstep_rl.objectives._reduce import upcast


def ppo_clip_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate ``mean max(-A ρ, -A clip(ρ, 1-ε_lo, 1+ε_hi))`` (methods.md §2.4, §6.2).

    Args:
        log_prob: Current per-sample log-probs ``(B,)`` (with gradient).
        old_log_prob: Rollout log-probs ``(B,)`` (treated as constant).
        adv: Advantages ``(B,)`` (treated as constant).
        eps_low: Lower clip range.
        eps_high: Upper clip range (default ``eps_low``).

    Returns:
        ``(loss, metrics)``; metrics (detached tensors): ``ratio_mean``, ``clip_frac`` (fraction of ratios outside
        the clip range), ``approx_kl`` (``½ mean (log π - log π_old)²``, as Flow-GRPO).
    """
    eps_high = eps_low if eps_high is None else eps_high
    log_ratio = upcast(log_prob) - upcast(old_log_prob).detach()
    ratio = torch.exp(log_ratio)
    a = upcast(adv).detach()
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(-a * ratio, -a * clipped).mean()
    with torch.no_grad():
        metrics = {
            "ratio_mean": ratio.mean(),
            "clip_frac": ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, metrics


def mean_kl(mu: Tensor, mu_ref: Tensor, std: Tensor | float) -> Tensor:
    """KL between equal-variance Gaussian steps, ``mean_b[mean_d (μ - μ_ref)² / (2 std²)]`` (methods.md §6.2).

    Samples with std = 0 (deterministic steps) contribute 0, matching the log-prob convention of
    :func:`fewstep_rl.sampling.step_log_prob`.

    Shapes:
        mu, mu_ref: (B, ...); std: per-sample, broadcastable (e.g. (B, 1, ..., 1)).
    """
    mu, mu_ref = upcast(mu), upcast(mu_ref)
    std = torch.as_tensor(std, dtype=mu.dtype, device=mu.device).detach()
    ok = std > 0
    safe = torch.where(ok, std, torch.ones_like(std))
    kl = torch.where(ok, (mu - mu_ref) ** 2 / (2 * safe**2), torch.zeros_like(mu))
    return kl.mean()  # = mean_b mean_d for a per-sample std
