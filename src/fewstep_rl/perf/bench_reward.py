"""Stand-in rewards for benchmarks.

Real rewards (PickScore, CLIPScore) need local checkpoints; the performance benchmarks measure the generator side
(transformer passes, VAE decode, optimiser steps) and use :class:`MeanPixelReward` so reward back-prop paths still
run. :class:`SlowReward` is a deliberately slow black box (a reward server's latency) for the overlap benchmark
(``benchmarks/bench_overlap.py``) and the ``trainer.reward_overlap`` tests.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.base import Reward


class MeanPixelReward(Reward):
    """``r(img) = mean(img)`` over channels and pixels (differentiable)."""

    name = "mean_pixel"
    differentiable = True

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        return samples.float().mean(dim=tuple(range(1, samples.dim())))


@dataclasses.dataclass
class SlowConfig:
    """Knobs of :class:`SlowReward`."""

    ms_per_sample: float = knob(10.0, "seconds slept per call: this × batch size / 1000 (latency, no CPU work)")

    def __post_init__(self) -> None:
        if self.ms_per_sample < 0:
            raise ValueError(f"slow reward: ms_per_sample must be >= 0, got {self.ms_per_sample}")


class SlowReward(Reward):
    """``r(x) = tanh(mean(x))`` that first sleeps ``ms_per_sample`` per sample: a black box with a server's latency.

    Works on points and images; bounded (:meth:`bounds`), so toy2d's exact tilted evaluation applies. ``threads``
    records the names of the threads that scored (tests check that ``trainer.reward_overlap`` moved scoring off the
    main thread).
    """

    name = "slow"
    differentiable = False
    Config = SlowConfig

    def __init__(self, cfg: SlowConfig | None = None) -> None:
        super().__init__(cfg)
        self.threads: set[str] = set()

    def bounds(self) -> tuple[float, float]:
        """``(min r, max r)``."""
        return -1.0, 1.0

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.cfg.ms_per_sample * samples.shape[0] / 1000)
        return torch.tanh(samples.float().mean(dim=tuple(range(1, samples.dim()))))
