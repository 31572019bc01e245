"""Lightning callbacks of a run: periodic evaluation and checkpoints keyed on iterations (not optimiser steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fewstep_rl.eval.evaluate import score_samples
from fewstep_rl.eval.generate import cycle_prompts
from fewstep_rl.eval.plots import plot_curves


def evaluate_method(method: Any, n: int, seed: int, steps: int | None = None) -> tuple[dict[str, float], Any, list]:
    """Generate ``n`` samples of the method's sampling role over the eval prompts and score them."""
    g = torch.Generator(device=method.device).manual_seed(seed)
    prompts = cycle_prompts(method.world.eval_prompts, n)
    was_training = method.training
    method.eval()
    samples = method.generate(prompts, g, steps=steps)
    method.train(was_training)
    beta = getattr(method.cfg, "beta", None)
    metrics = score_samples(method.world, method.rewards, samples, prompts, beta=beta, generator=g)
    return metrics, samples, prompts


class RunCallback(L.Callback):
    """Evaluates every ``eval_every`` iterations and at the end; checkpoints every ``ckpt_every`` iterations.

    Metrics go to the logger as ``val/<name>`` and to ``eval.jsonl``; the final ones to ``final_metrics.json``.
    All ranks generate (FSDP needs every rank in a forward); rank 0 writes.
    """

    def __init__(
        self, run_dir: Path, eval_every: int, eval_samples: int, ckpt_every: int, seed: int, max_steps: int
    ) -> None:
        self.run_dir, self.eval_every, self.eval_samples = Path(run_dir), eval_every, eval_samples
        self.max_steps = max_steps
        self.ckpt_every, self.seed = ckpt_every, seed
        self.final: dict[str, float] = {}

    def _evaluate(self, trainer: L.Trainer, module: Any, done: int) -> dict[str, float]:
        metrics, samples, prompts = evaluate_method(module, self.eval_samples, self.seed + 7919)
        if trainer.is_global_zero:
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=done)
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"iteration": done, **metrics}) + "\n")
            plot_curves(self.run_dir)
            log_samples = getattr(module.world, "log_samples", None)
            if log_samples is not None:
                log_samples(samples, prompts, self.run_dir, done)
        return metrics

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.ckpt_path is None:  # a fresh run: start the curves, with the untrained generator at iteration 0
            if trainer.is_global_zero:
                (self.run_dir / "eval.jsonl").unlink(missing_ok=True)
            if self.eval_every:
                self._evaluate(trainer, module, 0)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = int(batch["pos"]) + 1
        if self.eval_every and done % self.eval_every == 0 and done < self.max_steps:
            self._evaluate(trainer, module, done)
        if self.ckpt_every and done % self.ckpt_every == 0:
            trainer.save_checkpoint(self.run_dir / "checkpoints" / f"iter={done:06d}.ckpt")

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.final = self._evaluate(trainer, module, module.iteration + 1)
        if trainer.is_global_zero:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(self.final, indent=2))
