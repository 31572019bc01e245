"""The command line through the real entry point (``python -m fewstep_rl.cli`` == the ``fewstep-rl`` script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

CLI = [str(Path(sys.executable).parent / "fewstep-rl")]
FAST = ["--world.hidden", "32", "--method.batch_size", "16", "--trainer.eval_samples", "128",
        "--trainer.progress_bar", "false"]


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_unknown_method_key_names_key_and_closest():
    p = run("fit", "--method", "dmd2", "--world", "toy2d", "--method.num_step", "3")
    assert p.returncode == 2
    assert "method.num_step" in p.stderr and "method.num_steps" in p.stderr
    assert "Traceback" not in p.stderr


def test_renamed_key_names_its_new_name():
    p = run("fit", "--method", "rtdmd", "--world", "toy2d", "--method.ttur", "2")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "'method.ttur' was renamed 'method.fake_updates_per_gen'" in p.stderr
    p = run("fit", "--method", "tdm_r1", "--world", "toy2d", "--method.lr_fake_score", "1e-3")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "'method.lr_fake_score' was renamed 'method.optim.roles.fake_score.lr'" in p.stderr


def test_optim_overrides_and_type_checked_literal_are_one_line():
    """Nested dotted overrides reach method.optim; a Literal knob's bad value (didr's dmd_weighting, checked by
    config.build alone) and a role the method lacks are one line, exit 2."""
    p = run("fit", "--method", "tdm_r1", "--world", "toy2d", "--method.optim.lr", "1e-3",
            "--method.optim.roles.fake_score.lr", "2e-4", "--print_config")
    assert p.returncode == 0, p.stderr
    optim = yaml.safe_load(p.stdout)["method"]["optim"]
    assert optim["lr"] == 1e-3 and optim["roles"]["fake_score"]["lr"] == 2e-4
    assert optim["roles"]["surrogate"]["adam_betas"] == [0.9, 0.999] and optim["grad_clip"] == 10.0  # the rest kept
    for args, needle in [
        (["--method", "didr", "--method.dmd_weighting", "none"], "'method.dmd_weighting': 'none' is not allowed"),
        (["--method", "dmd2", "--method.optim.roles.surrogate.lr", "1e-3"], "roles: generator, fake_score"),
    ]:
        p = run("fit", *args, "--world", "toy2d", "--print_config")
        assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and needle in p.stderr, p.stderr


def test_no_such_key():
    p = run("fit", "--method", "dmd2", "--method.no_such_key", "1")
    assert p.returncode == 2 and "method.no_such_key" in p.stderr and "did you mean" in p.stderr


def test_unknown_method_lists_installed():
    p = run("fit", "--method", "dmd3")
    assert p.returncode == 2
    assert "dmd3" in p.stderr and "dmd2" in p.stderr and "installed methods" in p.stderr


def test_wrong_type_and_unknown_section():
    p = run("fit", "--method", "dmd2", "--trainer.max_steps", "many")
    assert p.returncode == 2 and "trainer.max_steps" in p.stderr and "integer" in p.stderr
    p = run("fit", "--method", "dmd2", "--trainr.max_steps", "3")
    assert p.returncode == 2 and "trainer" in p.stderr


def test_bad_world_config_is_clear():
    p = run("fit", "--method", "dmd2", "--world", "toy2d", "--world.weights", "[1.0]")
    assert p.returncode == 2 and "world" in p.stderr and "Traceback" not in p.stderr


def test_missing_checkpoint_is_one_clear_line(tmp_path):
    for cmd in (["sample", "--n", "4", "--prompt", "left", "--out", str(tmp_path / "x.npy")], ["eval", "--n", "4"]):
        p = run(*cmd, "--ckpt", str(tmp_path / "missing.ckpt"))
        assert p.returncode == 2
        assert p.stderr.strip().count("\n") == 0 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_method_help_lists_typed_arguments():
    p = run("fit", "--method", "dmd2", "--world", "toy2d", "--help")
    assert p.returncode == 0
    assert "--method.fake_updates_per_gen int" in p.stdout and "--world.means" in p.stdout
    assert "--method.optim.lr float  (default: 0.001)" in p.stdout  # nested knobs, with the method's defaults
    assert "--method.optim.adam_betas list[float]  (default: [0.0, 0.99])" in p.stdout
    assert "--method.optim.roles.<role>.lr float | None" in p.stdout
    assert "--trainer.max_steps" in p.stdout


def test_list():
    assert "dmd2" in run("list", "methods").stdout
    out = run("list", "rewards").stdout
    assert all(n in out for n in ("linear", "region", "jpeg"))
    assert "toy2d" in run("list", "worlds").stdout
    assert run("list", "nothing").returncode == 2


def test_print_config_round_trips(tmp_path):
    p = run("fit", "--method", "dmd2", "--world", "toy2d", "--method.optim.lr", "0.002", "--print_config")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert cfg["method"]["name"] == "dmd2" and cfg["method"]["optim"]["lr"] == 0.002 and cfg["world"]["name"] == "toy2d"
    assert cfg["rewards"][0]["name"] == "linear"
    f = tmp_path / "c.yaml"
    f.write_text(p.stdout)
    q = run("fit", "--method", "dmd2", "--config", str(f), "--print_config")
    assert yaml.safe_load(q.stdout) == cfg


def test_fit_sample_eval_end_to_end(tmp_path):
    rd = tmp_path / "run"
    p = run("fit", "--method", "dmd2", "--world", "toy2d", "--trainer.max_steps", "12", "--trainer.run_dir",
            str(rd), *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    final = json.loads(p.stdout.strip().splitlines()[-1])
    assert "energy_teacher" in final and "reward/linear" in final
    for f in ("config.yaml", "versions.json", "metrics.csv", "final_metrics.json", "checkpoints/last.ckpt"):
        assert (rd / f).exists(), f
    ck = str(rd / "checkpoints" / "last.ckpt")
    out = tmp_path / "s.npy"
    p = run("sample", "--ckpt", ck, "--n", "10", "--prompt", "left", "--steps", "4", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert np.load(out).shape == (10, 2)
    p = run("eval", "--ckpt", ck, "--n", "64", "--rewards", "linear,region")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"reward/linear", "reward/region", "energy_teacher"} <= set(res)
    p = run("eval", "--teacher", "--world", "toy2d", "--n", "64", "--steps", "4", "--rewards", "linear")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "energy_teacher" in json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bad", [["--n", "x"], ["--steps"]])
def test_sample_bad_args_are_clear(bad, tmp_path):
    p = run("sample", "--teacher", "--prompt", "left", "--out", str(tmp_path / "a.npy"), *bad)
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_default_world_is_shapes_with_the_dmd2_preset():
    p = run("fit", "--method", "dmd2", "--print_config")
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert cfg["world"]["name"] == "shapes"
    assert cfg["method"]["batch_size"] == 16 and cfg["method"]["backward_simulation"] is False  # configs/dmd2/shapes.yaml


def test_shapes_fit_prints_no_framework_noise(tmp_path):
    """The default world loads transformers/diffusers components and freezes roles in eval mode: neither a
    "Loading weights" bar nor Lightning's eval-mode notice (nothing a user can act on) reaches the console."""
    p = run("fit", "--method", "di_star", "--config", "configs/demo.yaml", "--trainer.max_steps", "2",
            "--method.batch_size", "4", "--trainer.eval_every", "0", "--trainer.eval_samples", "8",
            "--trainer.run_dir", str(tmp_path / "run"), cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-3000:]
    for noise in ("Loading weights", "eval mode", "Warning", "warn("):
        assert noise not in p.stderr, (noise, p.stderr[-2000:])
