"""``fewstep-rl compare``: the side-by-side config table, bad input, budgets, and a run killed mid-way and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fewstep_rl import registry
from fewstep_rl.cli import main

ROOT = Path(__file__).parents[1]
CLI = [str(Path(sys.executable).parent / "fewstep-rl")]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=env(), cwd=cwd)


def test_toy2d_compare_names_every_reward_driven_method_and_marks_differences(capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "compare" / "toy2d.yaml").read_text())
    names = {m if isinstance(m, str) else m["name"] for m in cfg["methods"]}
    driven = {n for n in registry.names("methods") if registry.load("methods", n).reward_driven}
    assert driven <= names
    assert main(["compare", str(ROOT / "configs" / "compare" / "toy2d.yaml"), "--print_config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.strip().startswith("key"))
    assert all(n in head for n in driven)
    # a preset value that differs between methods is marked ≠, and its cells say they come from presets (ᵖ)
    bs = next(line for line in lines if line.startswith("≠ method.batch_size"))
    assert "ᵖ" in bs
    # the entry override is marked ᵒ; the shared β is listed once among the shared keys, not as a difference
    assert "ᵒ" in next(line for line in lines if line.startswith("≠ method.stage1_iterations"))
    shared = next(line for line in lines if "shared by every method" in line)
    assert "method.beta=0.25" in shared and not any(line.startswith("≠ method.beta ") for line in lines)


@pytest.mark.parametrize("body,needle", [
    ("methods: [refl]\nbudget: {iterations: 5, seconds: 3}\n", "exactly one of"),
    ("methods: [refl]\nbugdet: {iterations: 5}\n", "did you mean"),
    ("methods: [refl]\nrewards: [{name: linear}]\njudges: [{name: linear}]\n", "never be seen by training"),
    ("methods: [refll]\n", "refl"),
    ("methods: []\n", "empty"),
])
def test_bad_compare_file_is_one_clear_line(tmp_path, capsys, body, needle):
    """Through the CLI's main (exit code 2, one line on stderr), in-process to keep the test fast."""
    f = tmp_path / "c.yaml"
    f.write_text("world: {name: toy2d}\n" + body)
    assert main(["compare", str(f), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.strip().count("\n") == 0


def test_budget_callback_stops_on_samples_and_seconds(tmp_path, monkeypatch):
    from fewstep_rl.compare import worker

    module = SimpleNamespace(batch_spec=lambda: (4, 8))
    trainer = SimpleNamespace(world_size=1, should_stop=False, is_global_zero=True)
    cb = worker.BudgetCallback("samples", 100, tmp_path, checkpoint_every=0, checkpoint_seconds=1e9)
    cb.on_train_start(trainer, module)
    stops = []
    for pos in range(10):
        cb.on_train_batch_start(trainer, module, {"pos": pos}, pos)
        cb.on_train_batch_end(trainer, module, None, {"pos": pos}, pos)
        stops.append(trainer.should_stop)
    assert stops.index(True) == 3  # 32 samples per iteration: 4 iterations reach 128 >= 100
    clock = iter(range(0, 1000, 5))  # each perf_counter call advances 5 s: every step takes 5 s
    monkeypatch.setattr(worker.time, "perf_counter", lambda: float(next(clock)))
    cb = worker.BudgetCallback("seconds", 12, tmp_path, checkpoint_every=0, checkpoint_seconds=1e9)
    trainer.should_stop = False
    cb.on_train_start(trainer, module)
    n = 0
    while not trainer.should_stop:
        cb.on_train_batch_start(trainer, module, {"pos": n}, n)
        cb.on_train_batch_end(trainer, module, None, {"pos": n}, n)
        n += 1
    assert n == 3 and cb.seconds == pytest.approx(15.0)
    assert cb.state_dict() == {"seconds": 15.0, "samples": 96, "iterations": 3}


@pytest.mark.slow  # three worker processes and two compare processes: ~1 min on an idle 2-core machine
def test_compare_killed_mid_way_resumes(tmp_path):
    """Run A finishes, B is killed after a resume checkpoint; the second run skips A and resumes B from it."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "world": {"name": "toy2d", "hidden": 32, "eval_samples": 64},
        "rewards": [{"name": "linear", "w": [1.0, 0.0]}],
        "beta": 0.25,
        "budget": {"iterations": 100, "checkpoint_every": 20},
        "eval": {"samples": 64, "grid_prompts": 1, "teacher_steps": 4},
        "trainer": {"eval_every": 0, "eval_samples": 64, "progress_bar": False, "log_every": 20},
        "methods": [{"name": "refl", "label": "a", "method": {"batch_size": 8}},
                    {"name": "refl", "label": "b", "method": {"batch_size": 256, "num_steps": 2, "draft_k": 2}}],
    }))
    out = tmp_path / "out"
    p = subprocess.Popen([*CLI, "compare", str(cfg), "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env(), start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "b" / "checkpoints" / "resume.ckpt").is_file():
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        assert not (out / "b" / "done.json").exists()
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the compare process and its worker, as a crash would
        p.wait()
    a_done = (out / "a" / "done.json").read_text()
    assert json.loads(a_done)["iterations"] == 100
    p2 = run("compare", str(cfg), "--out", str(out))
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    assert "[skip] a: finished" in p2.stdout and "[resume] b" in p2.stdout and "[start] a" not in p2.stdout
    assert (out / "a" / "done.json").read_text() == a_done  # not redone
    b = json.loads((out / "b" / "done.json").read_text())
    assert b["iterations"] == 100 and b["resumed_at"] >= 20 and b["resumed_at"] % 20 == 0
    assert "resuming from" in (out / "b" / "log").read_text()
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("a,") and rows[3].startswith("b,")  # header, teacher, a, b
    assert (out / "report.html").is_file() and "| b | refl | done |" in (out / "results.md").read_text()
