"""``fewstep-rl compare CONFIG.yaml [--jobs N] [--out DIR] [--print_config]``: methods side by side.

Resolves every run first (all errors before anything trains), prints the per-method configs side by side with the
values that differ marked, then runs each (method, seed) as its own worker process (:mod:`.worker`), ``--jobs`` at a
time with the CPU threads split between them (``trainer.num_threads = cpu_count // jobs`` unless the file sets it),
and finally writes ``results.csv``, ``results.md`` and ``report.html`` (:mod:`.report`) into the output directory.

Resumable: a run whose ``done.json`` records the same config is skipped; a run with ``checkpoints/resume.ckpt`` (its
worker was killed) resumes from it; anything else starts fresh. Changing a run's config restarts that run only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fewstep_rl.config import ConfigError

FLAGS = {"jobs": "value", "out": "value", "print_config": "bool", "help": "bool"}
HELP = __doc__


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a resolved run config, ignoring what does not change results (thread count)."""
    c = json.loads(json.dumps(config))
    c.get("trainer", {}).pop("num_threads", None)
    c.get("trainer", {}).pop("progress_bar", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:16]


def run_state(run_dir: Path, chash: str) -> str:
    """``done`` (finished with this config), ``resume`` (a resume checkpoint of this config) or ``fresh``."""
    done = run_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("config_hash") == chash:
        return "done"
    job = run_dir / "job.json"
    if (run_dir / "checkpoints" / "resume.ckpt").is_file() and job.is_file() and (
            json.loads(job.read_text()).get("config_hash") == chash):
        return "resume"
    return "fresh"


def _parse_args(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    from fewstep_rl.cli import UsageError, _parse

    pos = [a for a in argv if not a.startswith("--")]
    # positional: the first token that is not an option value
    path, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            rest.append(a)
            if "=" not in a and FLAGS.get(a[2:]) == "value" and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        elif path is None:
            path = a
        else:
            raise UsageError(f"compare takes one config file, got {pos}")
        i += 1
    opts, over = _parse(rest, FLAGS)
    if over:
        raise UsageError(f"compare takes no overrides ({sorted(over)}); put them in the config file")
    return path, opts


def cmd_compare(argv: list[str]) -> int:
    from fewstep_rl.cli import UsageError, _num
    from fewstep_rl.compare.config import load_compare, resolve_runs
    from fewstep_rl.compare.report import side_by_side

    path, opts = _parse_args(argv)
    if opts.get("help"):
        print(HELP)
        return 0
    if not path:
        raise UsageError("usage: fewstep-rl compare CONFIG.yaml [--jobs N] [--out DIR] [--print_config]")
    jobs = _num(opts, "jobs", int, 1)
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    cfg = load_compare(path)
    out = Path(opts.get("out") or Path("runs") / f"compare-{Path(path).stem}")
    specs = resolve_runs(cfg, out, jobs)
    table = side_by_side(specs)
    print(table)
    if opts.get("print_config"):
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.yaml").write_text(Path(path).read_text())
    (out / "config_diff.md").write_text(table + "\n")
    failed = run_all(cfg, specs, out, jobs)
    from fewstep_rl.compare.report import write_report

    paths = write_report(cfg, specs, out)
    print((out / "results.md").read_text())
    print(json.dumps({"out": str(out), **{k: str(v) for k, v in paths.items()}, "failed": failed}))
    if failed:
        print(f"error: run(s) {', '.join(failed)} failed; see {out}/<label>/log", file=sys.stderr)
        return 1
    return 0


def _job(cfg: Any, spec: Any, state: str) -> dict[str, Any]:
    import dataclasses

    config = spec.config()
    return {
        "label": spec.label, "config": config, "config_hash": config_hash(config),
        "budget": dataclasses.asdict(cfg.budget), "budget_kind": cfg.budget.kind, "eval": dataclasses.asdict(cfg.eval),
        "ckpt_path": str(Path(config["trainer"]["run_dir"]) / "checkpoints" / "resume.ckpt") if state == "resume"
        else None,
    }


def run_all(cfg: Any, specs: list, out: Path, jobs: int) -> list[str]:
    """Run every unfinished run, ``jobs`` at a time; returns the labels of failed runs."""
    queue = []
    for spec in specs:
        run_dir = out / spec.label
        chash = config_hash(spec.config())
        state = run_state(run_dir, chash)
        if state == "done":
            print(f"[skip] {spec.label}: finished ({run_dir / 'done.json'})", flush=True)
            continue
        if state == "fresh" and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        job = _job(cfg, spec, state)
        (run_dir / "job.json").write_text(json.dumps(job, indent=1))
        queue.append((spec, state, run_dir))
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    failed: list[str] = []

    def stop(signum: int, frame: Any) -> None:
        for p, _, _ in running.values():
            p.terminate()
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        while queue or running:
            while queue and len(running) < jobs:
                spec, state, run_dir = queue.pop(0)
                threads = spec.config()["trainer"].get("num_threads") or 1
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       "HF_HUB_OFFLINE": "1"}
                env.pop("FEWSTEP_RUN_DIR", None)
                log = open(run_dir / "log", "a")
                p = subprocess.Popen([sys.executable, "-m", "fewstep_rl.compare.worker", str(run_dir / "job.json")],
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
                log.close()
                running[spec.label] = (p, time.time(), run_dir)
                verb = "resume" if state == "resume" else "start"
                print(f"[{verb}] {spec.label} (pid {p.pid}, {threads} thread(s), log {run_dir / 'log'})", flush=True)
            time.sleep(0.5)
            for label, (p, t0, run_dir) in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del running[label]
                if rc == 0 and (run_dir / "done.json").is_file():
                    print(f"[done] {label} in {time.time() - t0:.0f} s", flush=True)
                else:
                    failed.append(label)
                    tail = (run_dir / "log").read_text().strip().splitlines()[-1:] if (run_dir / "log").is_file() else []
                    print(f"[failed] {label} (exit {rc}): {tail[0] if tail else ''}", flush=True)
    except KeyboardInterrupt:
        for p, _, _ in running.values():
            p.terminate()
        raise ConfigError("interrupted; run the same command again to resume") from None
    finally:
        signal.signal(signal.SIGTERM, old)
    return failed


def dump_configs(specs: list) -> str:
    """Every resolved config as YAML (one document per run)."""
    return "".join(f"# {s.label}\n---\n{yaml.safe_dump(s.config(), sort_keys=False)}" for s in specs)
