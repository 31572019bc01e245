"""Shared pieces of the backbones whose prompt encodings have a per-prompt length (``zimage``, ``qwen_image``).

Their pipelines keep only the prompt's own tokens (the text encoder's attention mask, and for Qwen-Image the
chat-template prefix dropped); rows of different lengths are padded with zeros and a mask. Here:
:class:`PromptRows` (an LRU cache of per-prompt rows ``(L_i, D)``), :func:`pad_rows` (rows → ``{"seq": (B, L, D),
"mask": (B, L) bool}``, ``L`` the longest row), :func:`cat_padded` (the batch concatenation CFG needs, padding the
shorter conditioning), :func:`clean_base` (the base transformer without role layers, for ``save_pretrained``) and
:func:`scheduler_sigmas` (a pipeline's σ grid through its scheduler, dynamic shift included).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.backbones.loading import dtype_of


def pad_rows(rows: Sequence[Tensor]) -> dict[str, Tensor]:
    """``{"seq": (B, L, D), "mask": (B, L) bool}``: rows padded with zeros to the longest one."""
    n = max(int(r.shape[0]) for r in rows)
    seq = torch.stack([torch.cat([r, r.new_zeros(n - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(n, device=r.device) < r.shape[0] for r in rows])
    return {"seq": seq, "mask": mask}


def cat_padded(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Batch concatenation of two padded conditionings (the shorter one padded to the longer)."""
    n = max(a["seq"].shape[1], b["seq"].shape[1])

    def grow(c: dict[str, Tensor]) -> dict[str, Tensor]:
        k = n - c["seq"].shape[1]
        if k == 0:
            return c
        seq, mask = c["seq"], c["mask"]
        return {"seq": torch.cat([seq, seq.new_zeros(seq.shape[0], k, seq.shape[2])], 1),
                "mask": torch.cat([mask, mask.new_zeros(mask.shape[0], k)], 1)}

    a, b = grow(a), grow(b)
    return {k: torch.cat([a[k], b[k]]) for k in ("seq", "mask")}


def _clone(x: Any) -> Any:
    """A copy of a tensor, or of every tensor in a tuple/dict of tensors (drops views of a larger encoder output)."""
    if isinstance(x, dict):
        return {k: v.clone() for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(v.clone() for v in x)
    return x.clone()


class PromptRows:
    """LRU cache ``prompt -> its encoding`` over an encoder ``prompts -> list of per-prompt encodings`` (a tensor, or
    a tuple/dict of tensors, each copied when cached; size 0: no cache). Every backbone's prompt cache."""

    def __init__(self, encode: Callable[[list[str]], Sequence[Any]], size: int = 256) -> None:
        self.encode, self.size = encode, int(size)
        self.rows: OrderedDict[str, Any] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> list[Any]:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        todo = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        fresh = dict(zip(todo, (_clone(r) for r in self.encode(todo)))) if todo else {}
        out = [fresh[p] if p in fresh else self.rows[p] for p in prompts]
        for p in prompts:
            if p in self.rows:
                self.rows.move_to_end(p)
        if self.size > 0:
            self.rows.update(fresh)
            while len(self.rows) > self.size:
                self.rows.popitem(last=False)
        return out

    def __iter__(self) -> Any:
        return iter(self.rows)

    def clear(self) -> None:
        self.rows.clear()


class VarLenPrompts:
    """Backbone mixin for families whose prompt encodings vary in length (Z-Image, Qwen-Image): the class provides
    ``_rows(prompts)`` (one ``(L_i, D)`` row per prompt), ``_encode`` and ``guidance_null_prompt``, and sets
    ``self._null = None`` (both dropped on device/dtype moves); prompts are padded to ``{"seq", "mask"}`` and CFG batches rows of different lengths."""

    _null: Tensor | None = None
    guidance_null_prompt: str = ""

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"seq": (B, L, D), "mask": (B, L) bool}``: each prompt's own tokens, zero-padded (cached per prompt)."""
        return pad_rows(self._rows(prompts))  # type: ignore[attr-defined]

    def null_cond(self, n: int) -> dict[str, Tensor]:
        """The encoding of ``guidance_null_prompt`` for ``n`` samples (computed once)."""
        if self._null is None:
            self._null = self._encode([self.guidance_null_prompt])[0]  # type: ignore[attr-defined]
        c = pad_rows([self._null])
        return {k: v.expand(n, *v.shape[1:]) for k, v in c.items()}

    def cat_cond(self, a: Any, b: Any) -> Any:
        return cat_padded(a, b)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Device/dtype moves invalidate the cached prompt encodings (rows and the null prompt)."""
        self._rows.clear()  # type: ignore[attr-defined]
        self._null = None
        return super()._apply(fn, recurse)  # type: ignore[misc]


def clean_base(transformer: nn.Module, store: object) -> nn.Module:
    """The base transformer without role layers (a fresh module holding the current base weights, merges in)."""
    if not store.wraps_base():  # type: ignore[attr-defined]
        return transformer
    with torch.random.fork_rng(devices=[]):
        base = type(transformer).from_config(transformer.config)
    base.load_state_dict(store.base_state_dict(), strict=True)  # type: ignore[attr-defined]
    dt = dtype_of(transformer)
    return (base if dtype_of(base) == dt else base.to(dt)).eval()


def calculate_mu(config: Any, image_seq_len: int) -> float:
    """The pipelines' ``calculate_shift``: ``μ`` linear in the image token count (scheduler config keys)."""
    c = config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    m = (c.get("max_shift", 1.15) - c.get("base_shift", 0.5)) / (max_len - base_len)
    return image_seq_len * m + c.get("base_shift", 0.5) - m * base_len


def scheduler_sigmas(scheduler: Any, sigmas: Sequence[float], image_seq_len: int) -> Tensor:
    """σ grid (final 0 included) a pipeline steps through: ``sigmas`` given to (a copy of) ``scheduler`` with the
    ``μ`` of ``image_seq_len`` (used when the scheduler shifts dynamically), as ``retrieve_timesteps`` does."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(sigmas=list(sigmas), mu=calculate_mu(sched.config, image_seq_len))
    return sched.sigmas.float()


def equivalent_shift(scheduler: Any, image_seq_len: int) -> float | None:
    """The static shift γ of ``σ' = γσ/(1 + (γ−1)σ)`` the scheduler applies at this token count: ``shift``, or
    ``e^μ`` under exponential dynamic shifting (``shift_terminal`` stretching is not a shift and is left out)."""
    if scheduler is None:
        return None
    c = scheduler.config
    if not c.get("use_dynamic_shifting", False):
        return float(c.get("shift", 1.0))
    if c.get("time_shift_type", "exponential") != "exponential":
        return None
    return math.exp(calculate_mu(c, image_seq_len))
