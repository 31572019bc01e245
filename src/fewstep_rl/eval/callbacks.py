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
    metrics = score_samples(method.world, method.eval_rewards, samples, prompts, beta=beta, generator=g)
    return metrics, samples, prompts


def write_eval_row(path: Path, iteration: int, metrics: dict[str, float]) -> None:
    """Append ``{"iteration": …, **metrics}`` to ``eval.jsonl``, replacing a row of the same iteration (atomically).

    Idempotent on purpose: a run killed after its final evaluation's row but before it exits resumes from the final
    checkpoint, which keeps that row, and evaluates again — without this the row would appear twice.
    """
    from fewstep_rl.ckpt_io import atomic_write_text

    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                if int(json.loads(line).get("iteration", -1)) != iteration:
                    rows.append(line)
            except ValueError:  # a torn last line of a killed run
                continue
    rows.append(json.dumps({"iteration": iteration, **metrics}))
    atomic_write_text(path, "".join(r + "\n" for r in rows))


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
                for lg in trainer.loggers:
                    lg.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=done)
            write_eval_row(self.run_dir / "eval.jsonl", done, metrics)
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
            trainer.save_checkpoint(self.run_dir / "checkpoints" / f"iter={done:06d}.ckpt", weights_only=False)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self.final = self._evaluate(trainer, module, module.iteration + 1)
        if trainer.is_global_zero:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(self.final, indent=2))


class MonitorCallback(L.Callback):
    """Reward-hacking monitor (see :mod:`fewstep_rl.eval.monitor`): training reward vs judge, their divergence with
    an alarm, image statistics, and ``checkpoints/best.ckpt`` kept by the judge.

    The judges live on this callback only: the method never sees them and they never enter a checkpoint. Rows go to
    ``monitor.jsonl`` and to the logger as ``monitor/<key>``. All ranks generate; rank 0 writes.
    """

    def __init__(self, judges: Any, cfg: Any, run_dir: Path, every: int, max_steps: int) -> None:
        self.judges, self.cfg, self.run_dir = judges, cfg, Path(run_dir)
        self.every, self.max_steps = every, max_steps
        self.base: dict[str, list[float]] | None = None
        self.best: float | None = None
        self.alarmed = False
        from fewstep_rl.eval.monitor import AlarmState

        self.alarm = AlarmState(cfg.alarm, cfg.patience)
        self.rows: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "best": self.best, "alarm_run": self.alarm.run, "alarmed": self.alarmed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base, self.best = state.get("base"), state.get("best")
        self.alarm.run, self.alarmed = int(state.get("alarm_run", 0)), bool(state.get("alarmed", False))

    @torch.no_grad()
    def measure(self, module: Any) -> dict[str, Any]:
        """Mean training/judge rewards, their per-sample spreads and the sample statistics of the pinned samples."""
        from fewstep_rl.eval.monitor import monitor_prompts, sample_statistics
        from fewstep_rl.eval.paired import paired_samples

        prompts = monitor_prompts(module.world.eval_prompts, self.cfg.samples, self.cfg.per_prompt)
        was_training = module.training
        module.eval()
        samples = paired_samples(lambda p, g, s: module.generate(p, g, steps=s), prompts, self.cfg.seed,
                                 device=module.device)
        module.train(was_training)
        meta = [module.world.prompt_meta(p) for p in prompts]
        row: dict[str, Any] = {}
        for tag, rewards in (("train", module.rewards), ("judge", self.judges)):
            if rewards is None or not len(rewards):
                continue
            rewards.to(module.device)
            scores = rewards(samples, prompts, meta)
            for name, s in scores.items():
                row[f"{tag}/{name}"] = float(s.double().mean())
            total = rewards.combine(scores).double()
            row[f"{tag}_total"], row[f"{tag}_sd"] = float(total.mean()), float(total.std()) if len(total) > 1 else 0.0
        row.update(sample_statistics(samples.detach().cpu(), prompts, self.cfg))
        return row

    def _evaluate(self, trainer: L.Trainer, module: Any, done: int) -> None:
        from fewstep_rl.eval.monitor import standardised_gain

        row = {"iteration": done, **self.measure(module)}
        if self.base is None:
            self.base = {k: [row.get(f"{k}_total", 0.0), row.get(f"{k}_sd", 0.0)] for k in ("train", "judge")}
        g_train = standardised_gain(row.get("train_total", 0.0), *self.base["train"])
        g_judge = standardised_gain(row.get("judge_total", 0.0), *self.base["judge"])
        row.update(gain_train=g_train, gain_judge=g_judge, divergence=g_train - g_judge)
        row["alarm"] = self.alarm.update(row["divergence"])
        if row["alarm"] and not self.alarmed and trainer.is_global_zero:
            import sys

            print(f"reward-hacking alarm at iteration {done}: training reward {g_train:+.2f} sd, judge {g_judge:+.2f} "
                  f"sd (divergence {row['divergence']:.2f} > {self.cfg.alarm})", file=sys.stderr)
        self.alarmed = self.alarmed or row["alarm"]
        if row["alarm"] and self.cfg.stop_on_alarm:
            trainer.should_stop = True
        judge = row.get("judge_total")
        if self.cfg.keep_best and judge is not None and (self.best is None or judge > self.best):
            self.best = judge
            trainer.save_checkpoint(self.run_dir / "checkpoints" / "best.ckpt", weights_only=False)
            if trainer.is_global_zero:
                (self.run_dir / "best.json").write_text(json.dumps({"iteration": done, "judge_total": judge}))
        self.rows.append(row)
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics({f"monitor/{k}": float(v) for k, v in row.items() if k != "iteration"}, step=done)
            with open(self.run_dir / "monitor.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.ckpt_path is None:
            if trainer.is_global_zero:
                (self.run_dir / "monitor.jsonl").unlink(missing_ok=True)
            self.base, self.best, self.alarmed, self.alarm.run = None, None, False, 0
            self._evaluate(trainer, module, 0)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = int(batch["pos"]) + 1
        if self.every and done % self.every == 0 and done < self.max_steps:
            self._evaluate(trainer, module, done)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self._evaluate(trainer, module, module.iteration + 1)


def progress_bar(total: int, refresh_rate: int) -> L.Callback:
    """One training bar: iterations done / ``total`` (resumed runs start where they stopped), the stage when the
    method has stages (``module.stage()``), up to three key training metrics, rate and ETA."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class IterationBar(TQDMProgressBar):
        def init_train_tqdm(self) -> Any:
            import sys

            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            return Tqdm(desc="train", total=total, position=2 * self.process_position, disable=self.is_disabled,
                        leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

        def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
            # not Lightning's (an "Epoch N" bar of an unknown total): the prompt stream is one endless epoch
            start = int(getattr(trainer.lightning_module, "stream_pos", 0))
            bar = self.train_progress_bar
            bar.reset(total=total)
            bar.initial = bar.n = start
            bar.refresh()

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            bar = self.train_progress_bar
            n = int(batch["pos"]) + 1
            if bar is None or not (n % self.refresh_rate == 0 or n >= total):
                return
            bar.n = n
            stage = getattr(module, "stage", None)
            bar.set_description(f"train stage {stage()}" if callable(stage) else "train")
            keys = sorted(k for k in trainer.callback_metrics if k.startswith("train/"))
            key = [k for k in keys if "loss" in k or "reward" in k][:3] or keys[:3]
            bar.set_postfix({k[len("train/"):]: f"{float(trainer.callback_metrics[k]):.4g}" for k in key}, refresh=True)

        def get_metrics(self, trainer: L.Trainer, module: Any) -> dict:
            return {}  # the postfix above replaces Lightning's dump of every logged value (and v_num)

    return IterationBar(refresh_rate=refresh_rate)
