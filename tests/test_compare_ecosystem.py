"""Ecosystem pieces of issue 15: TensorBoard / W&B (offline) loggers, the progress bar's total, plugin presets.

Through the CLI's ``main`` in-process (the installed script is a one-line wrapper around it), to keep them fast."""

import importlib
import sys
import textwrap

import yaml

from fewstep_rl.cli import main

FAST = ["--method", "dmd2", "--world", "toy2d", "--world.hidden", "16", "--method.batch_size", "16",
        "--trainer.eval_samples", "64"]


def test_tensorboard_and_wandb_offline_loggers_beside_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    for kind in ("tensorboard", "wandb"):
        d = tmp_path / kind
        assert main(["fit", *FAST, "--trainer.max_steps", "3", "--trainer.log_every", "1", "--trainer.progress_bar",
                     "false", "--trainer.logger", kind, "--trainer.run_dir", str(d)]) == 0
        assert (d / "metrics.csv").is_file()  # CSV is kept beside the chosen logger
        if kind == "tensorboard":
            events = list((d / "tensorboard").glob("events.out.tfevents.*"))
            assert events and events[0].stat().st_size > 100
        else:
            runs = list((d / "wandb").glob("offline-run-*"))
            assert runs and list(runs[0].glob("*.wandb")), list((d / "wandb").iterdir())
    capsys.readouterr()
    assert main(["fit", *FAST, "--trainer.logger", "mlflow", "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "trainer.logger" in err and "'tensorboard'" in err


def test_progress_bar_has_total_stage_and_metrics(tmp_path, capsys):
    assert main(["fit", "--method", "rtdmd", "--world", "toy2d", "--world.hidden", "16", "--method.batch_size", "4",
                 "--method.group_size", "4", "--method.stage1_iterations", "3", "--trainer.max_steps", "6",
                 "--trainer.log_every", "1", "--trainer.eval_samples", "64", "--trainer.run_dir",
                 str(tmp_path / "r")]) == 0
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert "train stage 1:" in out and "train stage 2:" in out
    assert "6/6 [" in out and "3/6 [" in out  # iterations done / the run's total
    assert "loss=" in out and "v_num" not in out


def test_plugin_package_ships_presets(tmp_path, monkeypatch, capsys):
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
    (pkg / "presets" / "toy2d.yaml").write_text("method: {optim: {lr: 0.0042}, num_steps: 3}\ntrainer: {max_steps: 77}\n")
    dist = site / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fewstep_rl.methods]\nplugdmd = myplug:PlugDMD\n\n[fewstep_rl.presets]\nplugdmd = myplug.presets\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        assert main(["fit", "--method", "plugdmd", "--world", "toy2d", "--print_config"]) == 0
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["method"]["optim"]["lr"] == 0.0042 and cfg["method"]["num_steps"] == 3 and cfg["trainer"]["max_steps"] == 77
        assert main(["fit", "--method", "plugdmd", "--world", "toy2d", "--help"]) == 0
        assert "presets/toy2d.yaml" in capsys.readouterr().out
        # no preset for that world: dataclass defaults, said so in --help
        assert main(["fit", "--method", "plugdmd", "--world", "shapes", "--help"]) == 0
        assert "(none; dataclass defaults)" in capsys.readouterr().out
    finally:
        for m in [m for m in sys.modules if m == "myplug" or m.startswith("myplug.")]:
            del sys.modules[m]
