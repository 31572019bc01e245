"""Protected run directories: refuse to clobber, one live run per directory, resume appends.

* A fresh run refuses a non-empty directory unless ``--overwrite`` (which then clears it, but only when it looks
  like a run directory, i.e. holds a ``config.yaml``; anything else is never deleted).
* A lock file ``<run_dir>/.lock`` (``fcntl.flock``, released by the kernel when the process dies, even on
  ``kill -9``) refuses a second live run in the same directory. Only rank 0 takes it; the DDP ranks it launches
  share its directory.
* A resume (``--ckpt_path``) into a non-empty directory is allowed when that directory holds the checkpoint or
  was written by the same run; it drops the rows of ``metrics.csv`` and ``eval.jsonl`` logged after the checkpoint
  (they are logged again, identically, by the resumed run) and appends from there, so a killed-and-resumed run
  ends with the same files as an uninterrupted one.
* Nothing is written until the caller has validated config, world and checkpoint (:func:`check_run_dir` only
  reads; :func:`open_run_dir` writes).

Departure from Lightning: :func:`csv_logger` replaces ``CSVLogger``'s writer, which deletes an existing
``metrics.csv`` when its directory is not empty and rewrites the file in place when a new column appears.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from fewstep_rl.ckpt_io import atomic_write_text, remove_stale_temporaries
from fewstep_rl.config import ConfigError

LOCK = ".lock"
RESUME_LOG = "resume.jsonl"


def is_launched_rank() -> bool:
    """True in every process but global rank 0: a rank started by Lightning's launcher, by torchrun (``RANK``; a
    node > 0 has ``LOCAL_RANK=0`` but ``GROUP_RANK>0``) or by srun (``SLURM_PROCID``). Only global rank 0 writes
    the run directory — a per-node local rank 0 would write it once per node on a shared filesystem."""
    keys = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return any(int(os.environ.get(k, "0") or "0") != 0 for k in keys)


def _entries(run_dir: Path) -> list[str]:
    if not run_dir.exists():
        return []
    if not run_dir.is_dir():
        raise ConfigError(f"--trainer.run_dir {run_dir} is a file, not a directory; give a directory path")
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)


def _same_run(run_dir: Path, ckpt_path: str | None, ckpt_config: dict | None) -> bool:
    """Whether ``run_dir`` belongs to the run of the checkpoint being resumed."""
    if ckpt_path is None:
        return False
    with contextlib.suppress(OSError, ValueError):
        if Path(ckpt_path).resolve().is_relative_to(run_dir.resolve()):
            return True
    cfg = run_dir / "config.yaml"
    if ckpt_config is not None and cfg.is_file():
        import yaml

        with contextlib.suppress(Exception):
            old = yaml.safe_load(cfg.read_text()) or {}
            return old.get("method", {}).get("name") == ckpt_config.get("method", {}).get("name")
    return False


def check_run_dir(run_dir: Path, ckpt_path: str | None = None, overwrite: bool = False,
                  ckpt_config: dict | None = None, probe_lock: bool = True) -> None:
    """Refuse a directory held by a live run, or a non-empty ``run_dir`` for a fresh run (raises
    :class:`ConfigError`; writes nothing)."""
    if probe_lock and (run_dir / LOCK).is_file():
        RunLock(run_dir).acquire(create=False).release()
    entries = _entries(run_dir)
    if not entries or overwrite:
        if overwrite and entries and not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--overwrite: {run_dir} is not empty and holds no config.yaml, so it is not a run "
                              f"directory and is left alone; give an empty or new --trainer.run_dir")
        return
    if _same_run(run_dir, ckpt_path, ckpt_config):
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    what = "resume into it with --ckpt_path of one of its checkpoints" if (run_dir / "config.yaml").is_file() \
        else "choose an empty or new directory"
    raise ConfigError(f"run directory {run_dir} is not empty ({shown}); give a new --trainer.run_dir, {what}, "
                      f"or add --overwrite to replace that run")


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` held for the life of the process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self, create: bool = True) -> RunLock:
        """Take the lock (``create=False``: only probe an existing lock file, writing nothing)."""
        import fcntl

        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by another live run ({holder}); wait "
                              f"for it to finish or give another --trainer.run_dir") from None
        if create:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
            self.fd = None


def _clear(run_dir: Path) -> None:
    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def open_run_dir(run_dir: Path, config: dict, versions: dict, ckpt_path: str | None = None,
                 done: int | None = None, overwrite: bool = False, changes: dict | None = None,
                 ckpt_config: dict | None = None) -> RunLock:
    """Lock ``run_dir`` and write the run files (rank 0 only, after every validation has passed)."""
    import yaml

    lock = RunLock(run_dir).acquire()
    try:
        check_run_dir(run_dir, ckpt_path, overwrite, ckpt_config, probe_lock=False)  # again, now under the lock
        if overwrite and ckpt_path is None:
            _clear(run_dir)
        remove_stale_temporaries(run_dir)
        if ckpt_path is not None and done is not None:
            max_steps = (config.get("trainer") or {}).get("max_steps")
            trim_metrics_after(run_dir, done, redo_final=max_steps is not None and done >= int(max_steps))
            with open(run_dir / RESUME_LOG, "a") as f:
                f.write(json.dumps({"ckpt_path": str(ckpt_path), "iteration": done,
                                    "changes": {k: {"from": a, "to": b} for k, (a, b) in (changes or {}).items()}},
                                   default=str) + "\n")
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        atomic_write_text(run_dir / "versions.json", json.dumps(versions, indent=2))
    except BaseException:
        lock.release()
        raise
    return lock


def trim_metrics_after(run_dir: Path, done: int, redo_final: bool = False) -> None:
    """Drop rows logged after a checkpoint of ``done`` iterations (the resumed run logs them again).

    ``redo_final``: the checkpoint is the finished run's final one, saved *before* the final evaluation, so a resume
    from it evaluates again: evaluation rows of step ``done`` are dropped too (a kill after the final evaluation had
    logged its row but before the process exited left that row, and the resumed run's final evaluation repeated it).

    ``metrics.csv`` rows carry Lightning's ``step``: training rows of iteration ``i`` (0-based) have step ``i``,
    evaluation rows (``val/*``) after ``k`` iterations step ``k``; ``eval.jsonl`` rows carry ``iteration`` = ``k``.
    A checkpoint of ``done`` iterations covers training rows ``step < done`` and evaluation rows ``step <= done``.
    """
    m = run_dir / "metrics.csv"
    if m.is_file():
        with open(m, newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if _keep_row(r, done, redo_final)]
        if fields:
            _write_csv(m, fields, rows)
    e = run_dir / "eval.jsonl"
    if e.is_file():
        keep = []
        for line in e.read_text().splitlines():
            with contextlib.suppress(ValueError):
                it = int(json.loads(line).get("iteration", 0))
                if it < done or (it == done and not redo_final):
                    keep.append(line)
        atomic_write_text(e, "".join(x + "\n" for x in keep))


def _keep_row(row: dict, done: int, redo_final: bool = False) -> bool:
    step = _step(row.get("step"))
    if step is None:
        return True
    is_eval = any(k and k.startswith("val/") and v not in (None, "") for k, v in row.items())
    return (step < done or (step == done and not redo_final)) if is_eval else step < done


def _step(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- CSV logger
def _logger_cls() -> type:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class AppendingWriter(ExperimentWriter):
        """Keeps an existing ``metrics.csv`` (its header gives the known columns); a new column rewrites the file
        atomically; every :meth:`save` flushes to disk (called before each checkpoint)."""

        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    header = next(csv.reader(f), [])
                self.metrics_keys = sorted(set(header))

        def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
            _write_csv(Path(self.metrics_file_path), list(fieldnames), rows)

        def save(self) -> None:
            if not self.metrics:
                return
            new_keys = self._record_new_keys()
            exists = os.path.isfile(self.metrics_file_path)
            if new_keys and exists:
                self._rewrite_with_new_header(self.metrics_keys)
            with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.metrics_keys)
                if not exists:
                    w.writeheader()
                w.writerows(self.metrics)
                f.flush()
                os.fsync(f.fileno())
            self.metrics = []

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> Any:
            if self._experiment is None:
                os.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger


def csv_logger(run_dir: Path) -> Any:
    """Lightning CSV logger writing ``<run_dir>/metrics.csv`` that appends on resume (see module docstring)."""
    return _logger_cls()(str(run_dir), name="", version="")
