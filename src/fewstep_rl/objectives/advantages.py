"""Group-relative advantages (methods.md §1.5; GRPO, RTDMD §2.4 step 5, Flow-GRPO §6.2, NFT/CRD §6.4).

* GRPO: ``A_i = (r_i - mean_{g(i)} r) / (std + eps)``, std over the group or **global** over all samples
  (population std, as ``np.std``), then clipped to ``[-clip, clip]``.
* Multi-reward "normalise-then-sum": ``A = standardize(Σ_k w_k A^(k))`` then clip.
* NFT/CRD map to [0, 1]: ``clip(A, ±A_max)/(2 A_max) + ½``.
* β-regime (KL-regularised RL with the tilt ``p_ref·exp(r/β)`` as optimum): raw leave-one-out advantages
  ``A_i = r_i − mean_{j∈g(i), j≠i} r_j`` — in reward units (no std, no clip), and the baseline is independent of
  sample i, so ``E[A_i ∇log p(x_i)] = ∇E[r]`` exactly (the group mean including ``r_i`` would shrink the reward
  by (K−1)/K, i.e. train at the temperature β·K/(K−1)).

Callers gather rewards and group ids from all ranks first (:func:`fewstep_rl.distributed.over_ranks`); these
functions are local.

Deviations:

* Groups whose rewards are all equal get advantage exactly 0 (float round-off in the group mean would otherwise
  leave ~1e-8 values), so :func:`nonzero_mask` can drop them as RTDMD does.
* ``standardize`` in normalise-then-sum divides by the population std only: each ``A^(k)`` is group-centred, so
  the sum already has zero mean, and not re-centring keeps zero-spread groups exactly 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

StdMode = Literal["global", "group"]


def _group_stats(r: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group mean, group population std and zero-spread flag."""
    _, inv = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    var = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, (r - mean[inv]) ** 2) / count
    rmax = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    rmin = torch.full((n_groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    return mean[inv], var.sqrt()[inv], (rmax == rmin)[inv]


def _clip(a: Tensor, clip: float | None) -> Tensor:
    return a if clip is None else a.clamp(-clip, clip)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    std: StdMode = "global",
    clip: float | None = 5.0,
    eps: float = 1e-4,
) -> Tensor:
    """GRPO advantages ``(r - group mean)/(std + eps)``, clipped (methods.md §1.5).

    Args:
        rewards: Rewards ``(B,)``.
        group_ids: Integer group id per sample ``(B,)`` (same prompt in the same epoch → same id).
        std: ``global`` (population std of all rewards) or ``group`` (population std within each group).
        clip: Clip to ``[-clip, clip]``; None disables.
        eps: Added to the std.

    Returns:
        Advantages ``(B,)`` in at least float32; exactly 0 for samples of zero-spread groups.

    Raises:
        ValueError: On shape mismatch or an unknown std mode.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be (B,), got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    mean, group_std, flat = _group_stats(r, group_ids.to(r.device))
    scale = r.std(unbiased=False) if std == "global" else group_std
    adv = (r - mean) / (scale + eps)
    adv = torch.where(flat, torch.zeros_like(adv), adv)
    return _clip(adv, clip)


def multi_reward_advantages(
    rewards: Mapping[str, Tensor],
    weights: Mapping[str, float] | Sequence[float],
    group_ids: Tensor,
    std: StdMode = "global",
    clip: float | None = 5.0,
    eps: float = 1e-4,
) -> Tensor:
    """Normalise-then-sum: ``A = standardize(Σ_k w_k A^(k))`` then clip (methods.md §1.5, RTDMD ``weight_advantages``).

    Each ``A^(k)`` is the unclipped GRPO advantage of reward ``k`` (same ``std`` mode and ``eps``); the weighted
    sum is divided by its population std (+ eps).

    Args:
        rewards: Reward name → rewards ``(B,)``.
        weights: Reward name → weight, or a sequence aligned with ``rewards``' order.
        group_ids: Integer group id per sample ``(B,)``.
        std: Std mode of the per-reward advantages.
        clip: Final clip; None disables.
        eps: Added to every std.

    Returns:
        Advantages ``(B,)``.

    Raises:
        ValueError: If the weights do not match the rewards.
    """
    names = list(rewards)
    if not names:
        raise ValueError("rewards is empty")
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"weights keys {sorted(weights)} must match reward names {sorted(names)}")
        w = [float(weights[k]) for k in names]
    else:
        w = [float(x) for x in weights]
        if len(w) != len(names):
            raise ValueError(f"got {len(w)} weights for {len(names)} rewards {names}")
    total = sum(wk * group_advantages(rewards[k], group_ids, std, None, eps) for wk, k in zip(w, names))
    assert isinstance(total, Tensor)
    return _clip(total / (total.std(unbiased=False) + eps), clip)


def loo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Raw leave-one-out advantages ``r_i − mean_{j∈g(i), j≠i} r_j = K/(K−1)·(r_i − mean_g r)`` (reward units).

    Used by the β-regimes (module docstring): unbiased policy-gradient weights for ``∇E[r]``, so a KL coefficient
    β on the same scale makes the optimum the tilt ``p_ref·exp(r/β)``.

    Args:
        rewards: Rewards ``(B,)``.
        group_ids: Integer group id per sample ``(B,)``; every group needs at least two members.

    Returns:
        Advantages ``(B,)`` in at least float32.

    Raises:
        ValueError: On shape mismatch or a group of one.
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be (B,), got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    r = rewards.detach().to(torch.promote_types(rewards.dtype, torch.float32))
    _, inv = torch.unique(group_ids.to(r.device), return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    if bool((count < 2).any()):
        raise ValueError("leave-one-out advantages need at least two samples per group")
    total = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, r)
    return r - (total[inv] - r) / (count[inv] - 1)


def regime_advantages(
    rewards: Tensor, group_ids: Tensor, regime: Literal["paper", "tilt"], clip: float | None = 5.0
) -> Tensor:
    """The advantages of a method's regime: ``paper`` — GRPO advantages with the global std, clipped to ``±clip``
    (:func:`group_advantages`); ``tilt`` — raw leave-one-out advantages in reward units, no std, no clip
    (:func:`loo_advantages`; module docstring).

    Args:
        rewards: Rewards ``(B,)`` of the whole batch (every rank).
        group_ids: Integer group id per sample ``(B,)``.
        regime: ``paper`` or ``tilt``.
        clip: Clip of the ``paper`` advantages; None disables.

    Returns:
        Advantages ``(B,)``.

    Raises:
        ValueError: On an unknown regime (and as the two functions do).
    """
    if regime == "tilt":
        return loo_advantages(rewards, group_ids)
    if regime != "paper":
        raise ValueError(f"regime must be 'paper' or 'tilt', got {regime!r}")
    return group_advantages(rewards, group_ids, std="global", clip=clip)


def advantages_to_unit(adv: Tensor, a_max: float = 5.0) -> Tensor:
    """Map advantages to [0, 1]: ``clip(A, ±A_max)/(2 A_max) + ½`` (methods.md §1.5, NFT/CRD §6.4)."""
    return adv.clamp(-a_max, a_max) / (2 * a_max) + 0.5


def nonzero_mask(adv: Tensor) -> Tensor:
    """Boolean mask of samples whose advantage is not exactly 0 (RTDMD drops the others, methods.md §2.4 step 5)."""
    return adv != 0
