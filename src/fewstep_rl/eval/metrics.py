"""Sample-based distances between point clouds (used by the ``toy2d`` world's evaluation)."""

from __future__ import annotations

import torch
from torch import Tensor

_CHUNK = 4096


def _mean_pairwise(a: Tensor, b: Tensor, exclude_diagonal: bool) -> float:
    """Mean Euclidean distance ``|a_i − b_j|`` over all pairs (or all ``i ≠ j`` when ``a`` is ``b``), row-chunked."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], _CHUNK):
        total = total + torch.cdist(a[start : start + _CHUNK], b, compute_mode="donot_use_mm_for_euclid_dist").sum()
    # without the matmul shortcut the diagonal of cdist(a, a) is exactly 0, so excluding it only changes the count
    count = a.shape[0] * (b.shape[0] - 1) if exclude_diagonal else a.shape[0] * b.shape[0]
    return float(total) / count


def energy_distance(x: Tensor, y: Tensor) -> float:
    """V-statistic estimate of the energy distance between the laws of ``x`` and ``y``.

    ``D²(P, Q) = 2 E|X − Y| − E|X − X'| − E|Y − Y'|`` (Székely & Rizzo 2013), with ``X, X' ~ P`` and
    ``Y, Y' ~ Q`` independent and ``|·|`` the Euclidean norm. ``D² ≥ 0`` with equality iff ``P = Q``. The estimate
    averages over all ``n·m`` cross pairs and all ``n²`` / ``m²`` within-set pairs (diagonal included): the
    V-statistic, which is always ≥ 0 and for two independent sets of one law has a positive expected value (the
    *noise floor*) ``≈ E|X − X'|·(1/n + 1/m)/2``. That makes "within k× the noise floor" a meaningful test, unlike the
    unbiased U-statistic, whose floor is 0 and whose sign fluctuates. Computed in float64.

    Args:
        x: (n, d) samples (n ≥ 2); a (n,) tensor is treated as 1-D points.
        y: (m, d) samples (m ≥ 2).

    Returns:
        The estimate as a Python float.
    """
    x = x.detach().to(torch.float64)
    y = y.detach().to(device=x.device, dtype=torch.float64)
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape[0] < 2 or y.shape[0] < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"energy_distance needs (n>=2, d) and (m>=2, d) samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    xy = _mean_pairwise(x, y, exclude_diagonal=False)
    xx = _mean_pairwise(x, x, exclude_diagonal=False)
    yy = _mean_pairwise(y, y, exclude_diagonal=False)
    return 2.0 * xy - xx - yy
