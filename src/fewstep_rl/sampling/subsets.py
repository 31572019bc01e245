"""Rank-synchronised random subsets of sampler steps (methods.md §2.4 step 1 "SubGRPO", §6.3 ``timestep_fraction``).

RTDMD optimises only a random subset of the stochastic steps per epoch (2 of {0, 1, 2} for a 4-step CPS chain),
drawn with an epoch-seeded generator so that every rank picks the same subset; the steps left out use group-shared
noise (:class:`~fewstep_rl.sampling.noise.NoiseSource`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_subset(candidates: Sequence[int], k: int, generator: torch.Generator) -> tuple[int, ...]:
    """``k`` distinct steps drawn uniformly without replacement from ``candidates``, sorted ascending.

    Identical on every rank when ``generator`` is seeded identically (e.g. ``FewStepMethod.rng(tag, per_rank=False)``).

    Args:
        candidates: Step indices to choose from (distinct).
        k: Subset size, ``0 <= k <= len(candidates)``.
        generator: Rank-synchronised source of randomness (one ``randperm`` draw).

    Returns:
        The chosen steps, sorted.

    Raises:
        ValueError: If ``k`` is out of range or ``candidates`` has duplicates.
    """
    cands = [int(c) for c in candidates]
    if len(set(cands)) != len(cands):
        raise ValueError(f"candidate steps must be distinct, got {cands}")
    if not 0 <= k <= len(cands):
        raise ValueError(f"subset size must be in 0..{len(cands)} (number of candidate steps), got {k}")
    perm = torch.randperm(len(cands), generator=generator, device=generator.device)[:k]
    return tuple(sorted(cands[int(i)] for i in perm.tolist()))
