"""Batch statistics over every data-parallel rank.

Group advantages need every sample of a prompt group and the batch-wide std, but each rank holds only its own
samples (methods.md §1.5: "the global std over every rank"). :func:`over_ranks` gathers the per-sample inputs of
every rank (Lightning's ``all_gather``, one collective per input in argument order — every rank calls it at the
same point of its step), applies a pure function of the whole batch (e.g.
:func:`fewstep_rl.objectives.advantages.regime_advantages`) and keeps this rank's rows. On one process it is just
the function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

TRACE: list[dict[str, Any]] | None = None
"""When a list (set by :mod:`fewstep_rl.testing.dist_check`), every :func:`over_ranks` call appends its local inputs,
gathered inputs and whole-batch result (detached CPU copies) — the distributed contract compares them across ranks."""


def world_size(module: Any) -> int:
    """Number of data-parallel ranks of a LightningModule (1 when it is not attached to a Trainer)."""
    trainer = getattr(module, "_trainer", None)
    return 1 if trainer is None else int(trainer.world_size)


def gather_rows(module: Any, x: Tensor) -> Tensor:
    """``x`` ``(n, ...)`` of every rank concatenated in rank order, ``(world·n, ...)``; ``x`` itself on one process."""
    if world_size(module) == 1:
        return x
    return module.all_gather(x).reshape(-1, *x.shape[1:])


def over_ranks(module: Any, fn: Callable[..., Tensor], *local: Tensor) -> Tensor:
    """``fn`` applied to the ``local`` per-sample tensors of every rank (each gathered with :func:`gather_rows`), then
    this rank's rows of its ``(world·n, ...)`` result, ``(n, ...)``.

    Shapes:
        local: each ``(n, ...)`` with the same ``n`` on every rank; ``fn``'s result: ``(world·n, ...)``.
    """
    gathered = [gather_rows(module, x) for x in local]
    out = fn(*gathered)
    size = world_size(module)
    if TRACE is not None:
        TRACE.append({"local": [x.detach().cpu().clone() for x in local], "out": out.detach().cpu().clone(),
                      "gathered": [x.detach().cpu().clone() for x in gathered]})
    if size == 1:
        return out
    return out.reshape(size, -1, *out.shape[1:])[module.global_rank]
