"""Speed flags of the image worlds (``sd3``, ``flux``, ``flux2``, ``zimage``, ``qwen_image``), applied to a built backbone (``world.attention_backend``, ``world.compile``,
``world.grad_checkpointing``).

* **attention backend** — every transformer pass runs inside ``torch.nn.attention.sdpa_kernel`` with the chosen
  SDPA backend (``flash``, ``efficient``, ``cudnn``, ``math``; ``auto`` leaves PyTorch's choice);
* **torch.compile** — ``transformer.compile(backend=...)`` (in place; Dynamo guards on the peft adapter state, so
  each active-adapter set gets its own graph — one graph per role, recompiled only when a new role is first used);
* **activation checkpointing** — grad passes run through ``torch.utils.checkpoint`` (non-reentrant) at the level of
  the whole ``_predict`` call: autograd keeps only the pass's inputs and recomputes the forward during backward.
  The recomputation calls ``_predict(x, σ, cond, role)`` again, which re-activates *that pass's* role, so roles
  interleaved in one graph (the hazard the sd3 backbone's docstring warns about for per-block checkpointing inside
  diffusers) still differentiate the right adapter.

bf16 with fp32 math needs no flag: with ``world.dtype: bfloat16`` (and ``trainer.precision: bf16-mixed``) the
transformer runs in bf16 while the sampler state, velocities (``_predict`` casts its output back to the input's
dtype), log-probabilities and losses stay float32 (the methods create their noise in the module's float32 dtype).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


@dataclass
class SpeedFlags:
    """The speed keys every image world's config carries (its ``Config`` derives from this; ``world.*`` keys)."""

    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = knob(
        "auto", "SDPA backend of every transformer pass (fewstep_rl.perf.speed)")
    compile: bool = knob(False, "torch.compile the transformer (one graph per active adapter set)")
    compile_backend: str = knob("inductor", "torch.compile backend (inductor; aot_eager for debugging)")
    grad_checkpointing: bool = knob(False, "recompute grad passes in backward (activation checkpointing)")

    def apply_speed(self, backbone: Any) -> Any:
        """:func:`apply_speed` with these flags."""
        return apply_speed(backbone, self.attention_backend, self.compile, self.compile_backend,
                           self.grad_checkpointing)


def _sdpa_context(backend: str) -> Any:
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
    return sdpa_kernel([kind])


def apply_speed(backbone: Any, attention_backend: str = "auto", compile: bool = False,
                compile_backend: str = "inductor", grad_checkpointing: bool = False) -> Any:
    """Install the flags on ``backbone`` (wraps its ``_predict`` on the instance; compiles the transformers)."""
    if attention_backend not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {attention_backend!r}")
    if compile:
        for t in backbone.store.networks():
            t.compile(backend=compile_backend, dynamic=False)
    if attention_backend == "auto" and not grad_checkpointing:
        return backbone
    inner = backbone._predict

    def run(x: Tensor, sigma: Tensor, role: str | None, keys: tuple[str, ...], *vals: Tensor) -> Tensor:
        with _sdpa_context(attention_backend):
            return inner(x, sigma, dict(zip(keys, vals)), role)

    def predict(x: Tensor, sigma: Tensor, cond: dict[str, Tensor], role: str | None) -> Tensor:
        keys = tuple(cond)  # the conditioning tensors travel as arguments (checkpoint tracks their gradients)
        if grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(run, x, sigma, role, keys, *cond.values(), use_reentrant=False)
        return run(x, sigma, role, keys, *cond.values())

    backbone._predict = predict
    return backbone
