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

from fewstep_rl.config import ConfigError


class RewardError(ConfigError):
    """A reward returned something other than finite float scores of shape ``(B,)`` (names the reward)."""


def check_scores(name: str, out: Any, batch: int) -> Tensor:
    """The boundary check every reward call passes: a float tensor of shape ``(batch,)``, all finite.

    Raises :class:`RewardError` naming the reward, what it returned and what is allowed.
    """
    if not isinstance(out, Tensor):
        raise RewardError(f"reward {name!r} returned a {type(out).__name__}; a reward must return a float tensor of "
                          f"shape ({batch},), one score per sample")
    if tuple(out.shape) != (batch,):
        raise RewardError(f"reward {name!r} returned shape {tuple(out.shape)} for {batch} samples; a reward must "
                          f"return shape ({batch},), one score per sample")
    if not (out.is_floating_point() or out.dtype in (torch.int32, torch.int64, torch.bool)):
        raise RewardError(f"reward {name!r} returned dtype {out.dtype}; a reward must return float scores")
    finite = torch.isfinite(out.detach())
    if not bool(finite.all()):
        bad = out.detach()[~finite]
        kinds = ", ".join(k for k, m in (("NaN", bad.isnan()), ("+Inf", bad == float("inf")),
                                          ("-Inf", bad == float("-inf"))) if bool(m.any()))
        raise RewardError(f"reward {name!r} returned {int((~finite).sum())} non-finite score(s) ({kinds}) for "
                          f"{batch} samples; a reward must return finite scores")
    return out.float()


@dataclasses.dataclass
class NoConfig:
    """A reward without knobs."""


class Reward(nn.Module):
    """Base class of every reward.

    Subclasses set ``name``, ``differentiable`` and ``Config`` and implement :meth:`score`. Call the reward as
    ``reward(samples, prompts, meta)``; black-box rewards are wrapped in ``no_grad`` automatically, and every
    result passes :func:`check_scores` (shape ``(B,)``, finite) at this boundary.
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
        return check_scores(self.name, out, samples.shape[0])

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
        return self._subset(lambda r, w: r.differentiable)

    def weighted(self) -> MultiReward:
        """The rewards with a nonzero weight: what training scores (weight-0 rewards are evaluation-only)."""
        return self._subset(lambda r, w: w != 0)

    def _subset(self, keep: Any) -> MultiReward:
        """The rewards (same modules) and weights for which ``keep(reward, weight)`` holds."""
        pairs = [(r, w) for r, w in zip(self.rewards, self.weights) if keep(r, w)]
        return MultiReward([r for r, _ in pairs], [w for _, w in pairs])

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
