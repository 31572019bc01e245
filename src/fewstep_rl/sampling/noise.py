"""Explicit-generator noise and group-shared noise (methods.md §2.4 step 2, §7.5, §7.11).

RTDMD (stage 2) makes the injected noise identical for all members of a prompt group at the non-selected
stochastic steps, seeding a CPU generator from the prompt, the step and the epoch so that it is rank-independent.
We key it by :func:`stable_hash` of ``(seed, prompt, step, epoch)``.

Deviations: RTDMD's seed is ``hash(prompt) + 10007·step + epoch_seed``; we use a SHA-256 based hash of all parts
instead (Python's ``hash`` of a string is salted per process, so it is not rank-stable without PYTHONHASHSEED).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK_63 = (1 << 63) - 1


def stable_hash(*parts: object) -> int:
    """Process- and rank-stable 63-bit hash of ``parts`` (SHA-256 of their joined ``repr``).

    Unlike Python's ``hash`` this does not depend on ``PYTHONHASHSEED``. ``repr`` distinguishes ``1`` from
    ``"1"``.

    Args:
        *parts: Values with a deterministic ``repr`` (str, int, float, tuples of those, ...).

    Returns:
        Non-negative int < 2**63, usable as a ``torch.Generator`` seed.
    """
    payload = "\x1f".join(repr(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & _MASK_63


def randn(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal noise drawn from ``generator`` (on its device, float32), moved to ``like``'s device/dtype.

    Drawing in float32 on the generator's device makes the values independent of the target dtype and device.

    Args:
        shape: Output shape.
        generator: The only source of randomness.
        like: Reference tensor for the output device and dtype.

    Returns:
        Tensor of ``shape`` on ``like.device`` with ``like.dtype``.
    """
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device=like.device, dtype=like.dtype)


def group_noise(
    prompts: Sequence[str],
    step: int,
    epoch: int,
    shape_per_sample: Sequence[int],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Noise that is identical for equal prompts, on any rank (methods.md §2.4 step 2).

    Sample ``i`` is drawn (float32) from a fresh CPU generator seeded with
    ``stable_hash(seed, prompts[i], step, epoch)``.

    Args:
        prompts: One prompt per sample (group members repeat the same prompt).
        step: Sampler step index.
        epoch: Epoch (or any other outer counter).
        shape_per_sample: Shape of one sample's noise.
        seed: Run-level seed.
        dtype: Output dtype.
        device: Output device (default CPU).

    Returns:
        Tensor of shape ``(len(prompts), *shape_per_sample)``.
    """
    shape = tuple(shape_per_sample)
    cache: dict[str, Tensor] = {}
    out = []
    for prompt in prompts:
        if prompt not in cache:
            g = torch.Generator(device="cpu").manual_seed(stable_hash(seed, prompt, step, epoch))
            cache[prompt] = torch.randn(shape, generator=g, dtype=torch.float32, device="cpu")
        out.append(cache[prompt])
    stacked = torch.stack(out) if out else torch.empty((0, *shape))
    return stacked.to(device=device, dtype=dtype)


class NoiseSource:
    """Per-step noise for :func:`fewstep_rl.sampling.sample`: fresh noise, or group-shared noise at chosen steps.

    Args:
        generator: Source of fresh (per-sample independent) noise.
        prompts: Prompt of each sample; required when ``shared_steps`` is non-empty.
        epoch: Epoch keying the shared noise.
        shared_steps: Steps whose noise is shared within prompt groups (:func:`group_noise`).
        seed: Run-level seed keying the shared noise.
    """

    def __init__(
        self,
        generator: torch.Generator,
        prompts: Sequence[str] | None = None,
        epoch: int = 0,
        shared_steps: Sequence[int] = (),
        seed: int = 0,
    ) -> None:
        self.generator = generator
        self.prompts = list(prompts) if prompts is not None else None
        self.epoch = epoch
        self.shared_steps = frozenset(int(s) for s in shared_steps)
        self.seed = seed
        if self.shared_steps and self.prompts is None:
            raise ValueError(f"shared_steps={sorted(self.shared_steps)} need the prompts of the batch")

    def __call__(self, step: int, shape: Sequence[int], like: Tensor) -> Tensor:
        """Noise for sampler step ``step`` with the given shape, on ``like``'s device/dtype."""
        if step not in self.shared_steps:
            return randn(shape, self.generator, like)
        assert self.prompts is not None
        if len(self.prompts) != shape[0]:
            raise ValueError(f"got {len(self.prompts)} prompts for a batch of {shape[0]} samples")
        return group_noise(self.prompts, step, self.epoch, tuple(shape[1:]), self.seed, like.dtype, like.device)
