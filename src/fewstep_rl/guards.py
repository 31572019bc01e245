"""Run guards: scheduled ``last.ckpt``, save-then-exit on SIGINT/SIGTERM, skipping non-finite updates, valid JSON.

:class:`SafetyCallback` (placed before the evaluation callback, so its ``on_train_end`` runs first):

* refreshes ``<run_dir>/checkpoints/last.ckpt`` every ``trainer.ckpt_last_every`` iterations or
  ``trainer.ckpt_last_minutes`` minutes, whichever comes first, and once more when training ends, *before* the
  final evaluation (an exception or a kill during the evaluation keeps the trained state);
* on SIGINT/SIGTERM finishes the current iteration, saves ``last.ckpt`` and raises :class:`Interrupted`
  (the CLI exits 130/143 with one line naming the checkpoint to resume from); a second signal stops at once;
* inspects every gradient just before each optimiser step (``on_before_optimizer_step``): a non-finite gradient
  (from a non-finite loss or backward) drops the step (gradients set to None, so the optimiser leaves the
  parameters and its moments alone), counts it (``train/nonfinite_skipped`` in ``metrics.csv``, a line on
  stderr) and, after ``trainer.nonfinite_limit`` iterations in a row with a dropped step, raises
  :class:`RunAborted` naming the last good checkpoint (no ``last.ckpt`` is written while steps are being dropped);
* on resume, re-applies the config's optimiser hyper-parameters (lr, betas, weight decay, eps) over the ones
  restored from the checkpoint, so an ``--allow_changes method.optim.lr`` takes effect for real.

Under DDP the stop/save decisions are all-reduced every iteration so every rank saves and stops together (rank 0
writes); the gradient check is all-reduced per optimiser step. Under ``16-mixed`` precision the gradient scaler
already skips inf/NaN steps, so the gradient guard is off there.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep_rl.config import ConfigError


class Interrupted(Exception):  # noqa: N818 - the name says what happened
    """A run stopped by SIGINT/SIGTERM; ``saved`` is the checkpoint written on the way out (or None)."""

    def __init__(self, signum: int, done: int, saved: Path | None) -> None:
        self.signum, self.done, self.saved = signum, done, saved
        name = signal.Signals(signum).name
        where = f"saved {saved} ({done} iterations)" if saved else "no new checkpoint written"
        super().__init__(f"interrupted by {name}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class RunAborted(ConfigError):
    """Training stopped because its updates kept being non-finite."""


# --------------------------------------------------------------------------------------------------- JSON
def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON ``null``); tensors/numpy scalars become floats."""
    if isinstance(obj, dict):
        return {str(k): finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON (``allow_nan=False``) with ``null`` for NaN/Inf."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


# --------------------------------------------------------------------------------------------------- prompts
def check_prompts(world: Any, prompts: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for a prompt the world cannot condition on (one line naming it and what is allowed).

    A world may define ``check_prompt(prompt)`` (raising ValueError); otherwise toy2d accepts its configured prompt
    names and ``""``, and shapes accepts its grammar.
    """
    check = getattr(world, "check_prompt", None)
    for p in prompts:
        try:
            if check is not None:
                check(p)
            elif type(world).__name__ == "Toy2DWorld" or hasattr(world.cfg, "means"):
                allowed = set(world.train_prompts) | {""}
                if p not in allowed:
                    raise ValueError(f"unknown prompt {p!r}; this toy2d world's prompts are "
                                     f"{', '.join(repr(a) for a in sorted(allowed))}")
            elif "shapes" in type(world).__module__:
                from fewstep_rl.worlds.shapes import grammar

                grammar.parse(p)
        except ValueError as e:
            msg = str(e)
            if "shapes" in type(world).__module__ and "prompt" not in msg:
                msg = f"{msg} (prompt {p!r})"
            raise ConfigError(f"prompt outside the world's vocabulary: {msg}") from None


# --------------------------------------------------------------------------------------------------- callback
def _grads(optimizer: Any) -> list:
    opt = getattr(optimizer, "optimizer", optimizer)
    return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]


def _all_finite(grads: list) -> bool:
    import torch

    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not local:
        return True
    norms = torch._foreach_norm([g.float() if g.dtype in (torch.float16,) else g for g in local])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _sync_max(trainer: Any, values: list[float]) -> list[float]:
    """Element-wise max over ranks (a no-op on one process)."""
    if trainer.world_size <= 1:
        return values
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _align_logger_step(checkpoint: dict[str, Any], done: int) -> None:
    """Make the resumed run log iteration ``done`` at step ``done``, as the uninterrupted run does.

    Lightning assumes a checkpoint written in ``on_train_batch_end`` and, on restart, adds 1 to the saved
    ``_batches_that_stepped`` unless the progress counters say the checkpoint was taken after the last batch
    (``update_restart_stage``/``reset`` of its training epoch loop). Our checkpoints are taken at other points (the
    start of the next iteration, the end of training), so store the value that restart turns into ``done``.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    state, prog = loop.get("epoch_loop.state_dict"), loop.get("epoch_loop.batch_progress", {}).get("total")
    if not isinstance(state, dict) or not isinstance(prog, dict) or "_batches_that_stepped" not in state:
        return
    on_last = prog["started"] == prog["ready"] and prog["processed"] == prog["started"] == prog["completed"]
    state["_batches_that_stepped"] = done - (0 if on_last else 1)


def _callback_cls() -> type:
    import lightning as L

    class SafetyCallback(L.Callback):
        def __init__(self, run_dir: Path, max_steps: int, last_every: int = 100, last_minutes: float = 10.0,
                     nonfinite_limit: int = 3, guard_grads: bool = True, resumed: bool = False) -> None:
            self.run_dir, self.max_steps = Path(run_dir), max_steps
            self.last_every, self.last_minutes = last_every, last_minutes
            self.nonfinite_limit, self.guard_grads, self.resumed = nonfinite_limit, guard_grads, resumed
            self.skipped = 0  # optimiser steps dropped, whole run
            self.bad_in_a_row = 0  # iterations in a row with a dropped step
            self._bad_now = False
            self._signal: int | None = None
            self._old: dict[int, Any] = {}
            self.phase = "setup"
            self.last_saved: tuple[Path, int] | None = None
            self._t_saved = time.monotonic()
            self._first_pos: int | None = None

        @property
        def last_path(self) -> Path:
            return self.run_dir / "checkpoints" / "last.ckpt"

        @property
        def state_key(self) -> str:
            return "SafetyCallback"

        def state_dict(self) -> dict[str, Any]:
            return {"skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.skipped = int(state.get("skipped", 0))
            self.bad_in_a_row = int(state.get("bad_in_a_row", 0))

        # ---------------------------------------------------------------- signals
        def _on_signal(self, signum: int, frame: Any) -> None:
            if self.phase == "train" and self._signal is None:
                self._signal = signum
                print(f"received {signal.Signals(signum).name}: saving {self.last_path} after this iteration "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
                return
            saved = self.last_saved[0] if self.last_saved else None
            raise Interrupted(signum, self.last_saved[1] if self.last_saved else 0, saved)

        def _install(self) -> None:
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._on_signal)
                except ValueError:  # not the main thread
                    return

        def _restore(self) -> None:
            for s, h in self._old.items():
                with contextlib.suppress(ValueError):
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
            self._old = {}

        # ---------------------------------------------------------------- hooks
        def on_train_start(self, trainer: Any, module: Any) -> None:
            if trainer.ckpt_path is not None:
                self._apply_optimizer_config(trainer, module)
                if int(module.stream_pos) >= self.max_steps:  # a finished run: only the final evaluation is left
                    trainer.should_stop = True
            self._t_saved = time.monotonic()
            self.phase = "train"
            self._install()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            # Checkpoints are written here, before the next iteration, rather than at the end of the previous one:
            # by now Lightning has handed the previous iteration's metrics (and the evaluation callback its eval
            # row) to the logger, so the flushed metrics.csv holds every row up to the checkpoint.
            self._bad_now = False
            done = int(batch["pos"])
            if self._first_pos is None:
                self._first_pos = done
                return
            due = bool((self.last_every and done % self.last_every == 0)
                       or (self.last_minutes and time.monotonic() - self._t_saved >= 60.0 * self.last_minutes))
            stop, due = _sync_max(trainer, [float(self._signal is not None), float(due)])
            if (due and not self.bad_in_a_row) or stop:
                self.save(trainer, done)
            if stop:
                raise Interrupted(self._signal or signal.SIGTERM, done, self.last_path)

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            if not self.guard_grads:
                return
            grads = _grads(optimizer)
            bad = 0.0 if _all_finite(grads) else 1.0
            bad = _sync_max(trainer, [bad])[0]
            if bad:
                opt = getattr(optimizer, "optimizer", optimizer)
                for g in opt.param_groups:
                    for p in g["params"]:
                        p.grad = None
                self.skipped += 1
                self._bad_now = True

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            done = int(batch["pos"]) + 1
            if self._bad_now:
                self.bad_in_a_row += 1
                if trainer.is_global_zero:
                    print(f"iteration {done}: non-finite loss or gradient, update skipped ({self.skipped} skipped "
                          f"so far, {self.bad_in_a_row} in a row)", file=sys.stderr, flush=True)
                    if trainer.logger is not None:
                        trainer.logger.log_metrics({"train/nonfinite_skipped": float(self.skipped)}, step=done - 1)
            else:
                self.bad_in_a_row = 0
            if self.nonfinite_limit and self.bad_in_a_row >= self.nonfinite_limit:
                good = (f"last good checkpoint: {self.last_saved[0]} ({self.last_saved[1]} iterations)"
                        if self.last_saved else "no checkpoint was written")
                raise RunAborted(
                    f"training aborted at iteration {done}: {self.bad_in_a_row} iterations in a row had a non-finite "
                    f"loss or gradient (updates skipped); lower the learning rate or check the rewards; {good}")

        def on_train_end(self, trainer: Any, module: Any) -> None:
            done = int(module.iteration) + 1
            self.save(trainer, done)
            self.phase = "final"
            if _sync_max(trainer, [float(self._signal is not None)])[0]:
                raise Interrupted(self._signal or signal.SIGTERM, done, self.last_path)

        def teardown(self, trainer: Any, module: Any, stage: str) -> None:
            self._restore()

        def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
            self._restore()

        def on_save_checkpoint(self, trainer: Any, module: Any, checkpoint: dict[str, Any]) -> None:
            _align_logger_step(checkpoint, int(module.stream_pos))

        # ---------------------------------------------------------------- helpers
        def save(self, trainer: Any, done: int) -> None:
            """Flush the logger (so ``metrics.csv`` holds every row up to the checkpoint), then save ``last.ckpt``."""
            if trainer.is_global_zero and trainer.logger is not None:
                trainer.logger.save()
            trainer.save_checkpoint(self.last_path, weights_only=False)
            self.last_saved = (self.last_path, done)
            self._t_saved = time.monotonic()

        @staticmethod
        def _apply_optimizer_config(trainer: Any, module: Any) -> None:
            """Optimiser hyper-parameters from the (possibly changed) config, over those restored from the checkpoint."""
            fresh = module.configure_optimizers()
            fresh = fresh if isinstance(fresh, (list, tuple)) else [fresh]
            for live, new in zip(trainer.optimizers, fresh):
                for g, ng in zip(live.param_groups, new.param_groups):
                    for k in ("betas", "weight_decay", "eps"):
                        if k in ng and g.get(k) != ng[k]:
                            g[k] = ng[k]
                    if g.get("initial_lr", g["lr"]) != ng["lr"]:  # step_role scales initial_lr by the schedule
                        g["initial_lr"] = g["lr"] = ng["lr"]

    return SafetyCallback


def SafetyCallback(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a factory that keeps lightning out of import time
    return _callback_cls()(*args, **kwargs)
