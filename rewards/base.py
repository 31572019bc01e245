"""The reward interface and :class:`MultiReward`.

A reward maps decoded samples (images ``(B, 3, H, W)`` in [0, 1], or points ``(B, d)`` in toy2d) plus prompts and
per-prompt metadata to one score per sample, ``Tensor[B]`` (float32). ``differentiable`` rewards are
``nn.Module``s whose gradient flows to the input; black-box rewards are evaluated under ``no_grad`` (they may run
on the CPU, in a thread pool or over HTTP).

Every reward has a typed ``Config`` dataclass; the registry builds it from a YAML mapping such as
``{name: linear, w: [1.0, 0.0], weight: 1.0}`` (``name`` and ``weight`` are consumed by :class:`MultiReward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclasses.dataclass
class NoConfig:
    """A reward without knobs."""


class Reward(nn.Module):
    """Base class of every reward.

    Subclasses set ``name``, ``differentiable`` and ``Config`` and implement :meth:`score`. Call the reward as
    ``reward(samples, prompts, meta)``; black-box rewards are wrapped in ``no_grad`` automatically.
    """

    name: ClassVar[str] = "reward"
    differentiable: ClassVar[bool] = False
    Config: ClassVar[type] = NoConfig

    def __init__(self, cfg: Any = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else self.Config()

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        """Scores ``(B,)`` for a batch of decoded samples."""
        raise NotImplementedError

    def forward(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> Tensor:
        meta = list(meta) if meta is not None else [{} for _ in prompts]
        if len(prompts) != samples.shape[0] or len(meta) != samples.shape[0]:
            raise ValueError(
                f"reward {self.name!r}: got {samples.shape[0]} samples, {len(prompts)} prompts, {len(meta)} meta"
            )
        if self.differentiable:
            out = self.score(samples, prompts, meta)
        else:
            with torch.no_grad():
                out = self.score(samples.detach(), prompts, meta)
        return out.float().reshape(samples.shape[0])

    def submit(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> Future:
        """Start scoring and return a ``Future`` of ``Tensor[B]``: rewards that can work in the background (the
        ``remote`` reward) overlap with the caller's next step; the default scores now."""
        fut: Future = Future()
        try:
            fut.set_result(self(samples, prompts, meta))
        except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(e)
        return fut


class MultiReward(nn.Module):
    """Several named rewards with weights.

    ``forward`` returns a dict ``{name: Tensor[B]}`` of raw scores; :meth:`combine` gives the weighted sum
    ``Σ_k w_k r_k``. Methods that normalise each reward into an advantage first ("normalise-then-sum",
    methods.md §1.5) use the per-reward dict with :func:`fewstep_rl.objectives.advantages.multi_reward_advantages`.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"two rewards share a name: {names}; give them distinct names")
        self.rewards = nn.ModuleList(rewards)
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * len(rewards))]
        if len(self.weights) != len(self.rewards):
            raise ValueError("MultiReward: one weight per reward")
        for r in self.rewards:
            r.requires_grad_(False)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def differentiable(self) -> bool:
        """True when every reward is differentiable."""
        return len(self.rewards) > 0 and all(r.differentiable for r in self.rewards)

    def differentiable_subset(self) -> MultiReward:
        """The differentiable rewards with their weights (for reward back-prop branches)."""
        keep = [(r, w) for r, w in zip(self.rewards, self.weights) if r.differentiable]
        return MultiReward([r for r, _ in keep], [w for _, w in keep])

    def forward(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> dict[str, Tensor]:
        return {r.name: r(samples, prompts, meta) for r in self.rewards}

    def combine(self, scores: dict[str, Tensor]) -> Tensor:
        """Weighted sum of per-reward scores."""
        total = None
        for name, w in zip(self.names, self.weights):
            total = w * scores[name] if total is None else total + w * scores[name]
        if total is None:
            raise ValueError("MultiReward has no rewards")
        return total

    def __len__(self) -> int:
        return len(self.rewards)
