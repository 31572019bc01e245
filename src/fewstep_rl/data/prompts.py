"""Prompt streams: K-per-prompt groups, rank-aware, resumable.

A batch at position ``pos`` on rank ``r`` is a pure function of ``(seed, r, pos)``: ``prompts_per_batch`` prompts
drawn from the world's prompt list, each repeated ``group_size`` times (a GRPO group stays whole on one rank), and
group ids that are unique across ranks (``(pos·world_size + rank)·M + j``). Resuming only needs the position of the
next unconsumed batch, which the method stores in its checkpoint (Lightning prefetches one batch, so the
DataLoader's own position is off by one — infra.md Q5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from fewstep_rl.sampling.noise import stable_hash


class PromptStream(IterableDataset):
    """Infinite stream of prompt batches.

    Args:
        prompts: the prompt list to draw from.
        prompts_per_batch: distinct prompts per batch on each rank (M).
        group_size: samples per prompt (K).
        seed: stream seed.
        rank / world_size: data-parallel position (set by :class:`PromptDataModule.setup`).
    """

    def __init__(
        self, prompts: Sequence[str], prompts_per_batch: int, group_size: int = 1, seed: int = 0, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not prompts:
            raise ValueError("the prompt list is empty")
        if prompts_per_batch < 1 or group_size < 1:
            raise ValueError(f"prompts_per_batch and group_size must be >= 1, got {prompts_per_batch}, {group_size}")
        self.prompts = list(prompts)
        self.m, self.k, self.seed = prompts_per_batch, group_size, seed
        self.rank, self.world_size = rank, world_size
        self.start = 0

    def batch(self, pos: int) -> dict[str, Any]:
        """The batch at position ``pos`` for this rank."""
        g = torch.Generator().manual_seed(stable_hash("prompts", self.seed, self.rank, pos))
        idx = torch.randint(len(self.prompts), (self.m,), generator=g, device="cpu").tolist()
        prompts = [self.prompts[i] for i in idx for _ in range(self.k)]
        base = (pos * self.world_size + self.rank) * self.m
        group = torch.arange(base, base + self.m).repeat_interleave(self.k)
        return {"prompts": prompts, "group": group, "pos": pos}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pos = self.start
        while True:
            yield self.batch(pos)
            pos += 1


def _collate(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class PromptDataModule(L.LightningDataModule):
    """Wraps a :class:`PromptStream` for the Trainer; ranks are read from the trainer in ``setup``."""

    def __init__(self, prompts: Sequence[str], prompts_per_batch: int, group_size: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.stream = PromptStream(prompts, prompts_per_batch, group_size, seed)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.stream.rank = self.trainer.global_rank
            self.stream.world_size = self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.stream, batch_size=None, collate_fn=_collate, num_workers=0)
