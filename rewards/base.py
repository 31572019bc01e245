"""The reward interface and :class:`MultiReward`.

A reward maps decoded samples (images ``(B, 3, H, W)`` in [0, 1], or points ``(B, d)`` in toy2d) plus prompts and
per-prompt metadata to one score per sample, ``Tensor[B]`` (float32). ``differentiable`` rewards are
``nn.Module``s whose gradient flows to the input; black-box rewards are evaluated under ``no_grad`` (they may run
on the CPU, in a thread pool or over HTTP).

Every reward has a typed ``Config`` dataclass; the registry builds it from a YAML mapping such as
``{name: linear, w: [1.0, 0.0], weight: 1.0}`` (``name`` and ``weight`` are consumed by :class:`MultiReward`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
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


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load(path)`` on the CPU with ``weights_only=True``; an unreadable file is one ``ValueError``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on a bad file
        raise ValueError(f"cannot read {str(path)!r} as a torch checkpoint: {type(e).__name__}: {e}") from None


def load_weights(
    module: nn.Module, state_dict: Mapping[str, Tensor], reward: str, source: str | Path, what: str = "the model",
    rebuilt: tuple[str, ...] = ("position_ids",),
) -> None:
    """Load a reward model's ``state_dict`` into ``module``, strictly: a missing key (other than buffers the model
    builds itself, whose names end in ``rebuilt``), an unexpected key or a shape mismatch is one ``ValueError`` naming
    the reward, the file and the first five keys."""
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"reward {reward!r}: {str(source)!r} does not fit {what}: {e}") from None
    missing = [k for k in missing if not k.endswith(rebuilt)]
    if missing or unexpected:
        raise ValueError(f"reward {reward!r}: {str(source)!r} does not fit {what}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


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
        meta = self._meta(samples, prompts, meta)
        if self.differentiable:
            out = self.score(samples, prompts, meta)
        else:
            with torch.no_grad():
                out = self.score(samples.detach(), prompts, meta)
        return check_scores(self.name, out, samples.shape[0])

    def _meta(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None) -> list[dict]:
        """``meta`` as a list (empty dicts by default), checked to hold one entry per sample and prompt."""
        meta = list(meta) if meta is not None else [{} for _ in prompts]
        if len(prompts) != samples.shape[0] or len(meta) != samples.shape[0]:
            raise ValueError(
                f"reward {self.name!r}: got {samples.shape[0]} samples, {len(prompts)} prompts, {len(meta)} meta"
            )
        return meta

    def submit(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> Future:
        """Start scoring and return a ``Future`` of ``Tensor[B]``, the scores ``reward(samples, prompts, meta)`` gives.

        Black-box rewards score in a background thread (one per reward, taking its submissions in order), so the
        caller's next work overlaps with scoring; the thread runs under the caller's autocast, CUDA device and stream
        (:func:`in_background`), so the scores are bit for bit those of a direct call. The caller must not modify
        ``samples`` in place until the future is done. Differentiable rewards score now (their graph belongs to the
        caller); the ``remote`` reward sends its request from its own thread.
        """
        meta = self._meta(samples, prompts, meta)
        if self.differentiable:
            return done_future(lambda: self(samples, prompts, meta))
        return in_background(self, lambda: self(samples, prompts, meta), samples.device)


def done_future(fn: Callable[[], Any]) -> Future:
    """A finished ``Future`` holding ``fn()``, or the exception it raised."""
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
        fut.set_exception(e)
    return fut


def _resolved(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


_WORKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner → its single background thread
_WORKERS_LOCK = threading.Lock()


def in_background(owner: Any, fn: Callable[[], Any], device: torch.device) -> Future:
    """Run ``fn()`` on ``owner``'s background thread (created on first use, one per owner, jobs in submission order)
    under the calling thread's autocast state and, on CUDA, its current device and stream — the thread-local state
    that would otherwise make the result differ from a call on the caller's thread."""
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def job() -> Any:
        with contextlib.ExitStack() as ctx:
            if stream is not None:
                ctx.enter_context(torch.cuda.device(device))
                ctx.enter_context(torch.cuda.stream(stream))
            for device_type, dtype in autocast:
                ctx.enter_context(torch.autocast(device_type, dtype=dtype))
            return fn()

    with _WORKERS_LOCK:
        pool = _WORKERS.get(owner)
        if pool is None:
            pool = _WORKERS[owner] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
    return pool.submit(job)


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


class RolloutScores:
    """Per-reward scores of one rollout, submitted chunk by chunk as the rollout produces them, collected once.

    A method that rolls out in chunks calls :meth:`add` on each finished chunk (its clean samples and prompts): the
    chunk is decoded and handed to every black-box reward (:meth:`Reward.submit`). With ``overlap`` they score in
    the background while the method generates the next chunk — and does any other work that needs no score — until
    :meth:`result` waits for them; without it each chunk is scored as it is added. Both settings score the same
    chunks with the same code, so the scores, and everything trained from them, are identical (bit for bit); only
    the wall time differs. Differentiable rewards (never run in a thread: their scoring competes with the rollout
    for the same device) score the whole rollout at :meth:`result`, in one batch under ``no_grad``; without a
    black-box reward the rollout is also decoded there in one batch, exactly as a direct call would.

    Shapes:
        ``add(x0 (b, ...), prompts [b])``; ``result()``: ``{name: (B,)}`` with ``B`` the samples of every chunk, in
        the order they were added.
    """

    def __init__(self, rewards: MultiReward, decode: Callable[[Tensor], Tensor] | None = None,
                 overlap: bool = False) -> None:
        self.rewards, self.decode, self.overlap = rewards, decode or (lambda x: x), overlap
        self.black_box = [r for r in rewards.rewards if not r.differentiable]
        self._kept: list[Tensor] = []  # for the differentiable rewards: decoded chunks, or clean ones (no black box)
        self._prompts: list[str] = []
        self._meta: list[dict] = []
        self._pending: list[tuple[int, dict[str, Future]]] = []

    def add(self, x0: Tensor, prompts: Sequence[str], meta: Sequence[dict] | None = None) -> None:
        """Decode a finished chunk of the rollout and submit it to every black-box reward."""
        n = x0.shape[0]
        futures = {}
        if self.black_box:
            with torch.no_grad():
                x0 = self.decode(x0)
            for r in self.black_box:  # without overlap a failure raises here, as a direct call would
                futures[r.name] = r.submit(x0, prompts, meta) if self.overlap else _resolved(r(x0, prompts, meta))
        self._pending.append((n, futures))
        if len(self.black_box) < len(self.rewards):
            self._kept.append(x0)
            self._prompts += list(prompts)
            self._meta += list(meta) if meta is not None else [{} for _ in prompts]

    def add_chunks(self, chunks: Iterable[tuple[Tensor, Sequence[str]]]) -> Tensor:
        """:meth:`add` every ``(x0, prompts)`` of a lazy iterable — a generator rolls chunk c+1 out while the black-box
        rewards score chunk c — and return the clean samples ``x0`` of all chunks, concatenated."""
        finals = []
        for x0, prompts in chunks:
            self.add(x0, prompts)
            finals.append(x0)
        return torch.cat(finals)

    def result(self) -> dict[str, Tensor]:
        """``{reward name: scores}`` over every chunk (waits for background scoring; re-raises its first error)."""
        if not self._pending:
            raise ValueError("RolloutScores.result(): no chunk was added")
        for _, futures in self._pending:  # let every job finish before raising: no scoring left running behind
            wait(futures.values())
        out = {}
        if self._kept:  # the differentiable rewards: one batch, decoded at once unless a black box needed chunks
            with torch.no_grad():
                samples = torch.cat(self._kept) if self.black_box else self.decode(torch.cat(self._kept))
        for r in self.rewards.rewards:
            if r.differentiable:
                with torch.no_grad():
                    out[r.name] = r(samples, self._prompts, self._meta)
            else:
                out[r.name] = torch.cat([check_scores(r.name, futures[r.name].result(), n)
                                         for n, futures in self._pending])
        return out

    def combined(self) -> Tensor:
        """The weighted sum ``Σ_k w_k r_k`` of :meth:`result` (``MultiReward.combine``)."""
        return self.rewards.combine(self.result())
