"""The default run (`make demo`): configs/demo.yaml resolves to a proxy-trained 4-step shapes run, trains through the
real CLI, and its checkpoint goes through the paired gold comparison the Makefile prints at the end."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fewstep_rl.run import resolve

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
BIN = Path(sys.executable).parent


def _run(*cmd, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_demo_config_trains_a_4_step_shapes_generator_on_the_proxy_not_the_judge():
    r = resolve(None, None, (str(DEMO),))
    assert (r.method_name, r.world_name) == ("di_star", "shapes")
    assert [name for name, *_ in r.rewards] == ["proxy"]  # gold is the judge only
    assert r.rewards[0][2].variant == "calibrated"
    assert r.method.num_steps == 4 and r.method.beta == 0.001 and r.method.optim.lr == 1e-3
    assert r.trainer.max_steps == 600


def test_make_demo_fits_the_demo_config_then_prints_the_paired_comparison():
    p = _run("make", "-n", "demo", "DEMO_DIR=runs/x")  # -n: print the recipe, run nothing
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    fit = [i for i, ln in enumerate(lines) if "fewstep-rl fit --config configs/demo.yaml" in ln]
    pair = [i for i, ln in enumerate(lines)
            if "fewstep-rl eval --paired runs/x/checkpoints/last.ckpt --teacher --rewards gold --n 2048" in ln]
    assert len(fit) == 1 and len(pair) == 1 and fit[0] < pair[0], p.stdout
    assert "--trainer.run_dir runs/x" in lines[fit[0]]


def test_demo_config_runs_two_iterations_and_compares_to_the_teacher(tmp_path):
    run = tmp_path / "demo"
    p = _run(str(BIN / "fewstep-rl"), "fit", "--config", str(DEMO), "--trainer.max_steps", "2",
             "--trainer.eval_samples", "8", "--trainer.num_threads", "1", "--trainer.progress_bar", "false",
             "--trainer.run_dir", str(run))
    assert p.returncode == 0, p.stderr[-2000:]
    final = json.loads((run / "final_metrics.json").read_text())
    assert 0.0 <= final["gold"] <= 1.0 and "reward/proxy" in final
    ck = run / "checkpoints" / "last.ckpt"
    q = _run(str(BIN / "fewstep-rl"), "eval", "--paired", str(ck), "--teacher", "--rewards", "gold", "--n", "8",
             "--labels", "teacher 4-step,demo")
    assert q.returncode == 0, q.stderr[-2000:]
    rows = json.loads(q.stdout.strip().splitlines()[-1])["rows"]
    assert [r["label"] for r in rows] == ["teacher 4-step", "demo"]
    assert abs(rows[1]["diff_ref"] - (rows[1]["mean"] - rows[0]["mean"])) < 1e-9  # paired difference of the means
