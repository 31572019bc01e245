"""Unit tests of the reliability pieces: checkpoint files, run directories, strict-resume diffs, guards."""

import io
import json
import math
import os

import pytest
import torch

from fewstep_rl.ckpt_io import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint, verify
from fewstep_rl.config import ConfigError, build
from fewstep_rl.resume import diff_configs, flatten
from fewstep_rl.rewards.base import RewardError, check_scores
from fewstep_rl.rundir import RunLock, check_run_dir, trim_metrics_after


def test_checkpoint_round_trip_carries_a_verified_hash(tmp_path):
    p = tmp_path / "c" / "x.ckpt"
    save_checkpoint({"w": torch.arange(6.0), "n": 3}, p)
    assert verify(p) is True
    ck = load_checkpoint(p)
    assert torch.equal(ck["w"], torch.arange(6.0)) and ck["n"] == 3
    assert torch.load(p, weights_only=False)["n"] == 3  # still a plain torch file
    assert [f.name for f in p.parent.iterdir()] == ["x.ckpt"]  # no temporary left


def test_a_flipped_bit_anywhere_in_a_tensor_is_caught(tmp_path):
    p = tmp_path / "x.ckpt"
    save_checkpoint({"w": torch.ones(64)}, p)
    data = bytearray(p.read_bytes())
    at = data.find(torch.ones(1).numpy().tobytes() * 4)
    assert at > 0
    data[at + 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(p)


def test_hash_mismatch_with_valid_crcs_is_caught(tmp_path):
    """Rewrite a member consistently (valid CRC) — only the content hash can tell."""
    import zipfile

    p, q = tmp_path / "x.ckpt", tmp_path / "y.ckpt"
    save_checkpoint({"w": torch.ones(4)}, p)
    with zipfile.ZipFile(p) as zin, zipfile.ZipFile(q, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data/0"):
                data = torch.full((4,), 2.0).numpy().tobytes()
            zout.writestr(info, data)
    with pytest.raises(CheckpointError, match="content hash does not match"):
        verify(q)


def test_truncated_and_foreign_files(tmp_path):
    p = tmp_path / "x.ckpt"
    save_checkpoint({"w": torch.ones(64)}, p)
    t = tmp_path / "t.ckpt"
    t.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        verify(t)
    e = tmp_path / "e.ckpt"
    e.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or not a checkpoint"):
        verify(e)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"w": 1}, legacy)
    assert verify(legacy) is False  # no hash: accepted on its CRCs
    with pytest.raises(CheckpointError, match="not found"):
        verify(tmp_path / "missing.ckpt")


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    import fewstep_rl.ckpt_io as cio

    p = tmp_path / "last.ckpt"
    save_checkpoint({"v": 1}, p)

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(cio.os, "fsync", boom)
    with pytest.raises(OSError):
        save_checkpoint({"v": 2}, p)
    monkeypatch.undo()
    assert load_checkpoint(p)["v"] == 1
    assert sorted(f.name for f in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / ".last.ckpt.tmp-999").write_bytes(b"half")
    assert [f.name for f in remove_stale_temporaries(tmp_path)] == [".last.ckpt.tmp-999"]


def test_check_run_dir_rules(tmp_path):
    check_run_dir(tmp_path / "new")  # absent: fine, and not created
    assert not (tmp_path / "new").exists()
    d = tmp_path / "d"
    d.mkdir()
    (d / ".lock").write_text("")
    check_run_dir(d)  # only a lock file: empty
    (d / "config.yaml").write_text("method: {name: dmd2}\n")
    with pytest.raises(ConfigError, match="is not empty"):
        check_run_dir(d)
    check_run_dir(d, overwrite=True)
    check_run_dir(d, ckpt_path=str(d / "checkpoints" / "last.ckpt"))  # resume in place
    check_run_dir(d, ckpt_path="/elsewhere/x.ckpt", ckpt_config={"method": {"name": "dmd2"}})
    with pytest.raises(ConfigError, match="is not empty"):
        check_run_dir(d, ckpt_path="/elsewhere/x.ckpt", ckpt_config={"method": {"name": "crd"}})
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(f)


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=f"in use by another live run \\(pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match="in use"):
        check_run_dir(tmp_path)
    a.release()
    RunLock(tmp_path).acquire().release()


def test_trim_keeps_rows_the_checkpoint_covers(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/r\n,0,,0.5\n0,0,1.0,\n0,1,2.0,\n0,2,3.0,\n,2,,0.7\n0,3,4.0,\n,4,,0.9\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"iteration": i, "r": i}) + "\n" for i in (0, 2, 4)))
    trim_metrics_after(tmp_path, 2)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss,val/r", ",0,,0.5", "0,0,1.0,", "0,1,2.0,", ",2,,0.7"]
    assert [json.loads(x)["iteration"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2]


def test_trim_before_a_final_evaluation_drops_its_row(tmp_path):
    """Resuming from a finished run's final checkpoint (saved before the final evaluation) redoes that evaluation:
    its row at step ``done`` goes, or a kill between the row and the exit would leave it twice."""
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,val/r\n0,3,4.0,\n,4,,0.9\n")
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"iteration": i, "r": i}) + "\n" for i in (2, 4)))
    trim_metrics_after(tmp_path, 4, redo_final=True)
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,step,train/loss,val/r", "0,3,4.0,"]
    assert [json.loads(x)["iteration"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()] == [2]


def test_config_diff_and_flatten():
    assert flatten({"a": {"b": 1}, "r": [{"name": "x", "w": [1.0, 0.0]}]}) == {"a.b": 1, "r.0.name": "x",
                                                                              "r.0.w": [1.0, 0.0]}
    old = {"method": {"optim": {"lr": 0.001}}, "trainer": {"max_steps": 10, "seed": 0, "run_dir": "a"}}
    new = {"method": {"optim": {"lr": 0.05}}, "trainer": {"max_steps": 99, "seed": 1, "run_dir": "b"}}
    assert diff_configs(old, new) == {"method.optim.lr": (0.001, 0.05), "trainer.seed": (0, 1)}


def test_config_rejects_nan_and_bad_learning_rates():
    import dataclasses

    @dataclasses.dataclass
    class C:
        lr: float = 1e-3
        lr_fake: float | None = None
        beta: float = 1.0

    assert build(C, {"lr": 0.1, "lr_fake": None}, "method").lr == 0.1
    for bad, msg in [({"lr": -0.1}, "learning rate"), ({"lr": 0}, "learning rate"), ({"lr_fake": float("inf")},
                     "learning rate"), ({"beta": float("nan")}, "NaN"), ({"lr": "nan"}, "NaN")]:
        with pytest.raises(ConfigError, match=msg):
            build(C, bad, "method")


def test_trainer_section_ranges():
    from fewstep_rl.run import TrainerConfig

    for key, val in [("eval_samples", 0), ("log_every", 0), ("ckpt_last_every", -1), ("ckpt_last_minutes", -1.0),
                     ("nonfinite_limit", -2), ("max_steps", 0), ("max_minutes", -1.0), ("max_minutes", float("inf"))]:
        with pytest.raises(ConfigError, match=key):
            build(TrainerConfig, {key: val}, "trainer")


def test_max_minutes_stops_with_the_final_evaluation_and_a_resumable_checkpoint(tmp_path):
    """``trainer.max_minutes``: a run far from ``max_steps`` stops on its wall-time budget, still evaluates and writes
    ``last.ckpt`` at the iteration it reached."""
    from fewstep_rl.run import assemble, resolve

    over = {"trainer.max_steps": 10**6, "trainer.max_minutes": 0.03, "trainer.progress_bar": False,
            "trainer.num_threads": 1, "trainer.eval_samples": 64, "trainer.run_dir": str(tmp_path / "r")}
    module, dm, trainer = assemble(resolve("dmd2", "toy2d", (), over), tmp_path / "r", [])
    trainer.fit(module, datamodule=dm)
    done = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt")["fewstep"]["stream_pos"]
    assert 0 < done < 10**6
    assert "reward/linear" in json.loads((tmp_path / "r" / "final_metrics.json").read_text())


def test_reward_boundary():
    ok = check_scores("r", torch.tensor([1.0, 2.0]), 2)
    assert ok.dtype == torch.float32
    with pytest.raises(RewardError, match=r"reward 'r' returned shape \(2, 1\) for 2 samples"):
        check_scores("r", torch.ones(2, 1), 2)
    with pytest.raises(RewardError, match=r"2 non-finite score\(s\) \(NaN, -Inf\)"):
        check_scores("r", torch.tensor([math.nan, -math.inf, 1.0]), 3)
    with pytest.raises(RewardError, match="returned a list"):
        check_scores("r", [1.0, 2.0], 2)


def test_strict_json():
    from fewstep_rl.guards import dumps, finite_json

    assert finite_json({"a": torch.tensor(float("nan")), "b": (1, float("inf"))}) == {"a": None, "b": [1, None]}
    assert json.loads(dumps({"x": float("-inf"), "y": 1.5})) == {"x": None, "y": 1.5}
    buf = io.StringIO()
    json.dump(finite_json({"z": float("nan")}), buf, allow_nan=False)
    assert buf.getvalue() == '{"z": null}'


def test_eval_row_is_replaced_not_duplicated(tmp_path):
    """A run killed between its final evaluation's row and its exit evaluates again on resume: one row per iteration."""
    import json

    from fewstep_rl.eval.callbacks import write_eval_row

    p = tmp_path / "eval.jsonl"
    write_eval_row(p, 0, {"a": 1.0})
    write_eval_row(p, 10, {"a": 2.0})
    p.write_text(p.read_text() + '{"iteration": 20, "a"')  # torn line of a killed write
    write_eval_row(p, 10, {"a": 2.0})
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    assert rows == [{"iteration": 0, "a": 1.0}, {"iteration": 10, "a": 2.0}]
