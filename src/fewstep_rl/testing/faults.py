"""Fault-injection harness (``tests/test_faults*.py``, ``make test-faults``).

Runs ``fewstep-rl`` commands in forked children of an interpreter that has already imported torch and Lightning
(a run then starts in about a second instead of ten), so many runs can be killed with ``SIGKILL`` at random points
and resumed; :func:`same_final_state` checks a resumed run against an uninterrupted one bit for bit (role weights,
optimiser state, ``metrics.csv``, ``eval.jsonl``, ``final_metrics.json``). :data:`BAD_INPUTS` lists the bad inputs
of issue #14 with the text each one-line error must contain.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOY = ["--world", "toy2d", "--world.hidden", "32", "--method.batch_size", "8", "--trainer.eval_samples", "64",
       "--trainer.progress_bar", "false", "--trainer.num_threads", "1", "--trainer.log_every", "1"]


@dataclass
class Proc:
    pid: int
    log: Path
    rc: int | None = None

    def wait(self, timeout: float = 1200.0) -> int:
        end = time.monotonic() + timeout
        while self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise TimeoutError(f"run {self.pid} did not finish in {timeout} s; log: {self.text()[-2000:]}")
            time.sleep(0.05)
        return self.rc

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stderr_lines(self) -> list[str]:
        """The log's lines minus Lightning's start-up chatter (what a user reads as the error)."""
        noise = ("Tip:", "GPU available", "TPU available", "HPU available", "_pytree", "LeafSpec", "weights_only",
                 "LOCAL_RANK", "warnings.warn", "UserWarning")
        return [ln for ln in self.text().splitlines() if ln.strip() and not any(n in ln for n in noise)]


def fork_cli(argv: list[str], log: Path, env: dict[str, str] | None = None,
             before: Callable[[], None] | None = None) -> Proc:
    """Run ``fewstep-rl ARGV`` in a forked child (stdout and stderr to ``log``); ``before`` runs in the child first."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Proc(pid, log)
    rc = 1
    try:  # the child: never return into the caller (pytest)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "FEWSTEP_RUN_DIR"):
            os.environ.pop(k, None)
        os.environ.update(env or {})
        if before is not None:
            before()
        from fewstep_rl.cli import main

        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report anything, then exit
        traceback.print_exc()
        rc = 1
    finally:
        with open(os.devnull, "w") as null:
            for s in (sys.stdout, sys.stderr):
                try:
                    s.flush()
                except Exception:  # noqa: BLE001
                    print("", file=null)
        os._exit(rc)


def run_cli(argv: list[str], log: Path, timeout: float = 1200.0, **kw: Any) -> Proc:
    p = fork_cli(argv, log, **kw)
    p.wait(timeout)
    return p


def wait_for(path: Path, proc: Proc, timeout: float = 120.0) -> bool:
    """Wait until ``path`` exists (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------------------------ comparison
def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def same_final_state(ref: Path, run: Path) -> list[str]:
    """Differences between two finished run directories (empty: bit-identical final state and logs)."""
    from fewstep_rl.ckpt_io import load_checkpoint

    diffs = []
    a = load_checkpoint(ref / "checkpoints" / "last.ckpt")
    b = load_checkpoint(run / "checkpoints" / "last.ckpt")
    for key in ("state_dict", "optimizer_states"):
        if not _equal(a[key], b[key]):
            diffs.append(key)
    for k in ("iteration", "stream_pos", "updates"):
        if a["fewstep"][k] != b["fewstep"][k]:
            diffs.append(f"fewstep.{k}")
    diffs += metrics_differences(ref / "metrics.csv", run / "metrics.csv")
    for f in ("eval.jsonl", "final_metrics.json"):
        fa, fb = ref / f, run / f
        if fa.exists() != fb.exists() or (fa.exists() and fa.read_bytes() != fb.read_bytes()):
            diffs.append(f)
    return diffs


def metrics_differences(ref: Path, run: Path) -> list[str]:
    """Rows of ``metrics.csv`` that differ; every row must be there with the same step and values.

    One allowance: Lightning repeats a metric's last value in later rows until it is logged again (e.g. a generator
    loss logged every k iterations); a resumed process starts without that memory, so such a *repeated* cell may be
    blank in the first rows after a resume. A blank cell is accepted only where the reference value repeats the
    reference's previous training row.
    """
    import csv

    if not ref.exists() or not run.exists():
        return ["metrics.csv missing"] if ref.exists() != run.exists() else []
    with open(ref, newline="") as f:
        a = list(csv.DictReader(f))
    with open(run, newline="") as f:
        b = list(csv.DictReader(f))
    if len(a) != len(b):
        return [f"metrics.csv has {len(b)} rows, the reference {len(a)}"]
    out, prev = [], {}
    for i, (ra, rb) in enumerate(zip(a, b)):
        if set(ra) != set(rb):
            return [f"metrics.csv columns differ: {sorted(set(ra) ^ set(rb))}"]
        is_eval = any(k.startswith("val/") and v for k, v in ra.items())
        for k, va in ra.items():
            vb = rb[k]
            if va != vb and not (vb == "" and not is_eval and va != "" and prev.get(k) == va):
                out.append(f"metrics.csv row {i} ({k}): {vb!r} != reference {va!r}")
        if not is_eval:
            prev = ra
    return out[:5]


def kill_and_resume(argv: list[str], run_dir: Path, rng: Any, kills: int, max_delay: float,
                    log_dir: Path) -> dict[str, int]:
    """Start ``fit ARGV`` in ``run_dir``, SIGKILL it ``kills`` times at random moments, resuming from
    ``last.ckpt`` each time (or starting over with ``--overwrite`` when no checkpoint was written yet), and let
    the last attempt finish. Returns counts: kills, resumes, restarts, rc."""
    out = {"kills": 0, "resumes": 0, "restarts": 0, "rc": -1}
    attempt = 0
    while True:
        last = run_dir / "checkpoints" / "last.ckpt"
        if attempt == 0:
            extra: list[str] = []
        elif last.exists():
            extra = ["--ckpt_path", str(last)]
            out["resumes"] += 1
        else:
            extra = ["--overwrite"]
            out["restarts"] += 1
        metrics = run_dir / "metrics.csv"
        size0 = metrics.stat().st_size if metrics.exists() else -1
        p = fork_cli([*argv, "--trainer.run_dir", str(run_dir), *extra], log_dir / f"{run_dir.name}.{attempt}.log")
        attempt += 1
        if out["kills"] < kills:
            # Kill at a random moment after this attempt has started training and saved once (metrics.csv is
            # flushed with every checkpoint), so the kills land in training, saves and evaluations, not start-up.
            end = time.monotonic() + 120
            while p.poll() is None and time.monotonic() < end:
                if (metrics.stat().st_size if metrics.exists() else -1) != size0:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, max_delay))
            if p.poll() is None:
                p.kill()
                p.wait()
                out["kills"] += 1
                continue
        out["rc"] = p.wait()
        if out["rc"] != 0:
            raise AssertionError(f"attempt {attempt} failed with {out['rc']}: {p.text()[-3000:]}")
        return out


# ------------------------------------------------------------------------------------------------ bad inputs
# (name, argv or None when the test builds it, text the one-line message must contain)
BAD_INPUTS: list[tuple[str, str]] = [
    ("fresh run into a non-empty run directory", "is not empty"),
    ("second live run into a locked directory", "in use by another live run"),
    ("bit-flipped checkpoint to fit --ckpt_path", "corrupted"),
    ("bit-flipped checkpoint to eval --ckpt", "corrupted"),
    ("truncated checkpoint to fit --ckpt_path", "truncated or not a checkpoint"),
    ("another method's checkpoint to fit --ckpt_path", "was written by method"),
    ("reward returning NaN", "non-finite score"),
    ("reward returning +Inf", "non-finite score"),
    ("reward returning shape (B, 1)", "returned shape"),
    ("non-finite gradient every iteration", "training aborted"),
    ("resume with a changed --method.optim.lr", "resume changes the config"),
    ("resume with a changed --trainer.seed", "resume changes the config"),
    ("resume with max_steps below the checkpoint", "is below the"),
    ("sample --n 0", "--n must be >= 1"),
    ("sample --n -3", "--n must be >= 1"),
    ("eval --n 0", "--n must be >= 1"),
    ("--trainer.eval_samples 0", "eval_samples must be >= 1"),
    ("unknown toy2d prompt", "unknown prompt"),
    ("negative lr", "learning rate must be a finite number > 0"),
    ("NaN lr", "NaN is not a valid value"),
    ("shapes prompt outside the grammar", "prompt outside the world's vocabulary"),
    ("sample --prompts empty.txt", "holds no prompts"),
    ("sd3 --world.path /nonexistent", "world.path"),
    ("--overwrite on a directory that is not a run directory", "not a run directory"),
    ("--allow_changes without --ckpt_path", "only applies when resuming"),
]
