"""Counted FLOPs of backbone passes (``torch.utils.flop_counter.FlopCounterMode``).

A training iteration's transformer work is the sum over the passes it actually made. :class:`PassRecorder` records
every ``backbone._predict`` call (role, input shape, whether autograd was on); :func:`count_pass_flops` runs one
pass of each distinct kind under ``FlopCounterMode`` — a forward for no-grad passes, forward + backward of the
output for grad passes (the backward of a trainable role reaches its adapter/copy weights; a frozen role's grad
pass differentiates its input, as DIDR's DRP and reward back-prop do) — and the total is Σ count × FLOPs.
FlopCounterMode counts matmuls, convolutions and attention (SDPA) — the ops that dominate; element-wise ops are
not counted, as in every MFU figure.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


class PassRecorder:
    """Wraps ``backbone._predict`` and counts ``(role, x shape, grad)`` while :attr:`on` is set."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone
        self.calls: Counter[tuple[str | None, tuple[int, ...], bool]] = Counter()
        self.on = False
        self.prev = vars(backbone).get("_predict")  # an instance wrapper (speed flags) stays in place
        orig = backbone._predict

        def rec(x, sigma, cond, role):  # noqa: ANN001
            if self.on:
                self.calls[(role, tuple(x.shape), torch.is_grad_enabled())] += 1
            return orig(x, sigma, cond, role)

        backbone._predict = rec

    def remove(self) -> None:
        if self.prev is not None:
            self.backbone._predict = self.prev
        elif "_predict" in vars(self.backbone):
            del self.backbone._predict


def count_pass_flops(backbone: Any, role: str | None, shape: tuple[int, ...], grad: bool,
                     prompts: list[str], autocast_dtype: torch.dtype | None = None) -> int:
    """FLOPs of one ``_predict`` pass of ``role`` on inputs of ``shape`` (forward, + backward when ``grad``)."""
    dev = next(backbone.parameters()).device
    cond = backbone.encode_prompts([prompts[i % len(prompts)] for i in range(shape[0])])
    trainable = role is not None and backbone.trainable.get(role, False)
    x = torch.randn(shape, device=dev, requires_grad=grad and not trainable)
    sigma = torch.full((shape[0],), 0.5, device=dev)
    ac = (torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None
          else torch.autocast(dev.type, enabled=False))
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        with ac:
            out = backbone._predict(x, sigma, cond, role)
        if grad:
            out.float().sum().backward()
    for p in backbone.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def total_flops(backbone: Any, calls: Counter, prompts: list[str], autocast_dtype: torch.dtype | None = None
                ) -> tuple[int, dict[str, int]]:
    """(Σ count × FLOPs over the recorded passes, FLOPs per distinct pass kind keyed ``role|shape|grad``)."""
    total, per = 0, {}
    for (role, shape, grad), n in calls.items():
        f = count_pass_flops(backbone, role, shape, grad, prompts, autocast_dtype)
        per[f"{role}|{'x'.join(map(str, shape))}|{'grad' if grad else 'nograd'}"] = f
        total += n * f
    return total, per
