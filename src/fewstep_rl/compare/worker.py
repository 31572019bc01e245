"""One run of a comparison, in its own process: ``python -m fewstep_rl.compare.worker RUN_DIR/job.json``.

The job file holds the fully resolved run config (so the worker layers nothing), the budget, the shared evaluation
settings and the checkpoint to resume from. The worker trains under :class:`BudgetCallback` (iterations, training
wall seconds or generated training samples; resume checkpoints; step time; peak memory), then writes the final
pinned-noise samples and their per-sample training and judge scores (``final.pt``) and, last, ``done.json`` — the
marker the runner uses to skip a finished run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class BudgetCallback(L.Callback):
    """Stops a run at its budget and writes resume checkpoints; its counters are saved in every checkpoint.

    Step time is measured from ``on_train_batch_start`` to this callback's ``on_train_batch_end``, which runs before
    the evaluation callbacks (it is placed first), so evaluations count in neither step time nor the wall budget.
    """

    def __init__(self, kind: str, amount: float, run_dir: Path, checkpoint_every: int = 0,
                 checkpoint_seconds: float = 30.0) -> None:
        self.kind, self.amount, self.run_dir = kind, amount, Path(run_dir)
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, checkpoint_seconds
        self.seconds, self.samples, self.iterations = 0.0, 0, 0
        self.step_times: list[float] = []
        self.resumed_at: int | None = None
        self._t0 = 0.0
        self._last_ckpt = time.perf_counter()
        self._per_iter = 1

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "samples": self.samples, "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds, self.samples = float(state["seconds"]), int(state["samples"])
        self.iterations = self.resumed_at = int(state["iterations"])

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        b, k = module.batch_spec()
        self._per_iter = b * k * trainer.world_size
        self._last_ckpt = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        dt = now - self._t0
        self.step_times.append(dt)
        self.seconds += dt
        self.samples += self._per_iter
        self.iterations = int(batch["pos"]) + 1
        if (self.kind == "seconds" and self.seconds >= self.amount) or (
            self.kind == "samples" and self.samples >= self.amount
        ):
            trainer.should_stop = True
        due = (self.iterations % self.checkpoint_every == 0) if self.checkpoint_every else (
            now - self._last_ckpt >= self.checkpoint_seconds)
        if due and not trainer.should_stop:
            tmp = self.run_dir / "checkpoints" / "resume.ckpt.tmp"
            trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                os.replace(tmp, self.run_dir / "checkpoints" / "resume.ckpt")
            self._last_ckpt = time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a GPU run, else the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def final_samples(method: Any, judges: Any, prompts: list[str], seed: int) -> dict[str, Any]:
    """Pinned-noise samples and their per-sample training and judge scores."""
    from fewstep_rl.eval.paired import paired_samples, score_per_sample

    method.eval()
    x = paired_samples(lambda p, g, s: method.generate(p, g, steps=s), prompts, seed, device=method.device)
    out: dict[str, Any] = {"samples": x.float().cpu(), "prompts": prompts, "train": {}, "judge": {}}
    if method.eval_rewards is not None and len(method.eval_rewards):  # every configured reward, as the report's teacher
        out["train"] = score_per_sample(method.eval_rewards, method.world, x, prompts)
    if judges is not None and len(judges):
        out["judge"] = score_per_sample(judges.to(method.device), method.world, x, prompts)
    return out


def run_job(job_path: Path) -> int:
    from fewstep_rl.eval.callbacks import RunCallback
    from fewstep_rl.eval.generate import cycle_prompts
    from fewstep_rl.run import _multi_reward, assemble, resolve, write_run_files

    job = json.loads(Path(job_path).read_text())
    resolved = resolve(None, raw=job["config"])
    tc = resolved.trainer
    run_dir = Path(tc.run_dir)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    write_run_files(run_dir, resolved)
    b = job["budget"]
    budget = BudgetCallback(job["budget_kind"], float(b[job["budget_kind"]]), run_dir, b["checkpoint_every"],
                            b["checkpoint_seconds"])
    run_cb = RunCallback(run_dir, tc.eval_every, tc.eval_samples, tc.ckpt_every, tc.seed, tc.max_steps)
    method, dm, trainer = assemble(resolved, run_dir, [budget, run_cb], run_callback=False)
    ckpt = job.get("ckpt_path")
    if ckpt:
        print(f"resuming from {ckpt}", file=sys.stderr)
    t0 = time.time()
    trainer.fit(method, datamodule=dm, ckpt_path=ckpt)
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    ev = job["eval"]
    prompts = cycle_prompts(ev["prompts"] or method.world.eval_prompts, ev["samples"])
    judges = _multi_reward(resolved.judges, method.world) if resolved.judges else None
    torch.save(final_samples(method, judges, prompts, ev["seed"]), run_dir / "final.pt")
    monitor = [c for c in trainer.callbacks if type(c).__name__ == "MonitorCallback"]
    done = {
        "label": job["label"], "iterations": budget.iterations, "train_seconds": budget.seconds,
        "train_samples": budget.samples, "resumed_at": budget.resumed_at,
        "step_time_ms": 1000 * float(torch.tensor(budget.step_times).median()) if budget.step_times else None,
        "peak_memory_mb": peak_memory_mb(method.device), "process_seconds": time.time() - t0,
        "alarm": bool(monitor and monitor[0].alarmed), "config_hash": job["config_hash"],
    }
    (run_dir / "done.json").write_text(json.dumps(done, indent=2))
    return 0


def main() -> int:
    from fewstep_rl.config import ConfigError

    try:
        return run_job(Path(sys.argv[1]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
