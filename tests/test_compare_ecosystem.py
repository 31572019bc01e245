"""Ecosystem pieces of issue 15: TensorBoard / W&B (offline) loggers, the progress bar's total, plugin presets."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

CLI = [str(Path(sys.executable).parent / "fewstep-rl")]
FAST = ["--method", "dmd2", "--world", "toy2d", "--world.hidden", "16", "--method.batch_size", "16",
        "--trainer.eval_samples", "64"]


def run(*args, extra_env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=env)


def test_tensorboard_and_wandb_offline_loggers_beside_csv(tmp_path):
    for kind in ("tensorboard", "wandb"):
        d = tmp_path / kind
        p = run("fit", *FAST, "--trainer.max_steps", "4", "--trainer.log_every", "1", "--trainer.progress_bar",
                "false", "--trainer.logger", kind, "--trainer.run_dir", str(d), extra_env={"WANDB_DIR": str(d)})
        assert p.returncode == 0, p.stderr[-3000:]
        assert (d / "metrics.csv").is_file()  # CSV is kept beside the chosen logger
        if kind == "tensorboard":
            events = list((d / "tensorboard").glob("events.out.tfevents.*"))
            assert events and events[0].stat().st_size > 100
        else:
            runs = list((d / "wandb").glob("offline-run-*"))
            assert runs and list(runs[0].glob("*.wandb")), list((d / "wandb").iterdir())
    p = run("fit", *FAST, "--trainer.logger", "mlflow", "--print_config")
    assert p.returncode == 2 and "trainer.logger" in p.stderr and "'tensorboard'" in p.stderr


def test_progress_bar_has_total_stage_and_metrics(tmp_path):
    p = run("fit", "--method", "rtdmd", "--world", "toy2d", "--world.hidden", "16", "--method.batch_size", "4",
            "--method.group_size", "4", "--method.stage1_iterations", "3", "--trainer.max_steps", "6",
            "--trainer.log_every", "1", "--trainer.eval_samples", "64", "--trainer.run_dir", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "train stage 1:" in out and "train stage 2:" in out
    assert "6/6 [" in out and "3/6 [" in out  # iterations done / the run's total
    assert "loss=" in out
    assert "v_num" not in out


def test_plugin_package_ships_presets(tmp_path):
    """A plugin method registered by entry point gets its preset from the plugin's own package."""
    site = tmp_path / "site"
    pkg = site / "myplug"
    (pkg / "presets").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from fewstep_rl.methods.dmd2 import DMD2

        class PlugDMD(DMD2):
            """DMD2 under another name (a plugin's method)."""
            name = "plugdmd"
    '''))
    (pkg / "presets" / "__init__.py").write_text("")
    (pkg / "presets" / "toy2d.yaml").write_text("method: {lr: 0.0042, num_steps: 3}\ntrainer: {max_steps: 77}\n")
    dist = site / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fewstep_rl.methods]\nplugdmd = myplug:PlugDMD\n\n[fewstep_rl.presets]\nplugdmd = myplug.presets\n")
    env = {"PYTHONPATH": str(site)}
    p = run("fit", "--method", "plugdmd", "--world", "toy2d", "--print_config", extra_env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = yaml.safe_load(p.stdout)
    assert cfg["method"]["lr"] == 0.0042 and cfg["method"]["num_steps"] == 3 and cfg["trainer"]["max_steps"] == 77
    h = run("fit", "--method", "plugdmd", "--world", "toy2d", "--help", extra_env=env)
    assert "presets/toy2d.yaml" in h.stdout
    # no preset for that world: dataclass defaults, said so in --help
    h = run("fit", "--method", "plugdmd", "--world", "shapes", "--help", extra_env=env)
    assert "(none; dataclass defaults)" in h.stdout
