"""A fault-injecting reward plugin for the fault suite (``tests/test_faults*.py``), loaded by path::

    --rewards '[{name: "fewstep_rl.testing.faulty:FaultyReward", mode: nan, after: 3}]'

It is the toy2d linear reward ``r(x) = w·x`` (so toy2d's exact evaluation still applies) that misbehaves on
purpose once it has been called ``after`` times:

* ``nan`` / ``inf``: one score is NaN / +Inf;
* ``shape``: returns shape ``(B, 1)`` instead of ``(B,)``;
* ``nan_grad``: finite scores whose gradient is NaN (a non-finite loss gradient in methods that back-propagate the
  reward), on every call, or every ``every``-th call;
* ``raise_eval``: raises ``RuntimeError`` on a batch of at least ``eval_batch`` samples (the final evaluation);
* ``ok``: never misbehaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards.toy2d import LinearReward


@dataclasses.dataclass
class FaultyConfig:
    w: list[float] = knob([1.0, 0.0], "direction of the linear reward")
    b: float = knob(0.0, "offset")
    mode: Literal["ok", "nan", "inf", "shape", "nan_grad", "raise_eval"] = knob("ok", "how to misbehave")
    after: int = knob(0, "calls before misbehaving")
    every: int = knob(1, "nan_grad: misbehave on every k-th call")
    eval_batch: int = knob(64, "raise_eval: raise on batches at least this large")


class FaultyReward(LinearReward):
    """The linear reward, misbehaving on purpose (see the module docstring)."""

    name = "faulty"
    Config = FaultyConfig  # type: ignore[assignment]

    def __init__(self, cfg: FaultyConfig | None = None) -> None:
        super().__init__(cfg)  # type: ignore[arg-type]
        self.calls = 0

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        out = super().score(samples, prompts, meta)
        self.calls += 1
        mode = self.cfg.mode
        if mode == "ok" or self.calls <= self.cfg.after:
            return out
        if mode in ("nan", "inf"):
            out = out.clone()
            out[0] = float("nan") if mode == "nan" else float("inf")
            return out
        if mode == "shape":
            return out[:, None]
        if mode == "nan_grad" and (self.calls - self.cfg.after) % self.cfg.every == 0:
            z = samples[:, 0] - samples[:, 0].detach()  # 0 in value; d sqrt(z)/dz at 0 is inf, times 0: NaN
            return out + 0.0 * torch.sqrt(z)
        if mode == "raise_eval" and samples.shape[0] >= self.cfg.eval_batch:
            raise RuntimeError(f"faulty reward: injected failure on a batch of {samples.shape[0]}")
        return out
