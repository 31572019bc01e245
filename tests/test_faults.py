"""Fault injection through the real ``fewstep-rl`` entry point (forked children; see fewstep_rl.testing.faults).

Fast cases run in ``make test``; the ``slow`` ones (many random kills, SIGINT/SIGTERM, kill during a save, an
exception in the final evaluation, concurrent runs, DDP) in ``make test-faults`` (``-m faults``), which also
prints the figures (runs killed, resumed bit-exact, bad inputs tried, data lost). ``FEWSTEP_FAULT_RUNS`` sets the
number of randomly killed runs (default 12).
"""

import json
import os
import random
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest

from fewstep_rl.testing.faults import BAD_INPUTS, TOY, fork_cli, kill_and_resume, run_cli, same_final_state, wait_for

pytestmark = pytest.mark.faults

STEPS = 30
FIT = ["fit", "--method", "dmd2", *TOY, "--trainer.max_steps", str(STEPS), "--trainer.ckpt_last_every", "2",
       "--trainer.eval_every", "10"]
FAULTY = "fewstep_rl.testing.faulty:FaultyReward"
FIGURES = {"runs_killed": 0, "kills": 0, "resumed_bit_exact": 0, "bad_inputs_tried": 0, "data_lost": 0}
MESSAGES: dict[str, str] = {}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """An uninterrupted run: the final state every interrupted run must reproduce."""
    d = tmp_path_factory.mktemp("faults") / "ref"
    p = run_cli([*FIT, "--trainer.run_dir", str(d)], d.parent / "ref.log")
    assert p.rc == 0, p.text()[-3000:]
    return d


def one_line_error(p, expect: str, name: str) -> str:
    """The run failed with exit 2 and exactly one line on stderr containing ``expect``; records the message."""
    lines = p.stderr_lines()
    assert p.rc == 2, (name, p.rc, p.text()[-3000:])
    assert "Traceback" not in p.text(), (name, p.text()[-3000:])
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], (name, lines)
    assert expect in errors[0], (name, errors[0])
    FIGURES["bad_inputs_tried"] += 1
    MESSAGES[name] = errors[0]
    return errors[0]


def flip_byte(src: Path, dst: Path) -> None:
    """Copy a checkpoint with one bit flipped inside its first tensor's storage."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 8)
    h = info.header_offset  # the local header's own name/extra lengths (torch pads the extra field for alignment)
    offset = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[offset + 4] ^= 0x10
    dst.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ kill -9
def _kill_trials(ref, tmp_path, seeds, kills=2):
    for seed in seeds:
        rng = random.Random(seed)
        d = tmp_path / f"kill{seed}"
        counts = kill_and_resume(FIT, d, rng, kills, max_delay=1.5, log_dir=tmp_path)
        diffs = same_final_state(ref, d)
        FIGURES["runs_killed"] += counts["kills"] > 0
        FIGURES["kills"] += counts["kills"]
        FIGURES["data_lost"] += bool(diffs)
        assert not diffs, (seed, counts, diffs)
        FIGURES["resumed_bit_exact"] += 1
        assert not list(d.rglob(".*.tmp-*")), "a stale temporary checkpoint was left behind"


def test_kill9_then_resume_is_bit_exact(ref, tmp_path):
    _kill_trials(ref, tmp_path, seeds=[1, 2])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_at_random_points_over_many_runs(ref, tmp_path):
    _kill_trials(ref, tmp_path, seeds=range(100, 100 + int(os.environ.get("FEWSTEP_FAULT_RUNS", "12"))), kills=3)


def _kill_self_during_save(nth: int):
    """In the child: SIGKILL itself after the nth checkpoint's temporary file is written, before os.replace."""
    def patch():
        import fewstep_rl.ckpt_io as io

        real = io.os.replace
        calls = {"n": 0}

        def replace(src, dst):
            if str(dst).endswith(".ckpt"):
                calls["n"] += 1
                if calls["n"] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

        io.os.replace = replace
    return patch


@pytest.mark.slow
def test_kill_during_a_save_keeps_the_previous_checkpoint(ref, tmp_path):
    d, tmpdir = tmp_path / "save", tmp_path / "other_tmp"
    tmpdir.mkdir()
    p = run_cli([*FIT, "--trainer.run_dir", str(d)], tmp_path / "save.log", env={"TMPDIR": str(tmpdir)},
                before=_kill_self_during_save(4))
    assert p.rc == -signal.SIGKILL
    last = d / "checkpoints" / "last.ckpt"
    from fewstep_rl.ckpt_io import load_checkpoint, verify

    assert verify(last)  # intact, hashed: the third save (iteration 6)
    assert load_checkpoint(last)["fewstep"]["stream_pos"] == 6
    assert list(d.rglob(".last.ckpt.tmp-*")), "the killed write should have left its temporary file"
    assert not list(tmpdir.iterdir()), "nothing may be staged in $TMPDIR"
    p = run_cli([*FIT, "--trainer.run_dir", str(d), "--ckpt_path", str(last)], tmp_path / "save2.log")
    assert p.rc == 0, p.text()[-3000:]
    assert not list(d.rglob(".*.tmp-*"))
    assert same_final_state(ref, d) == []
    FIGURES["runs_killed"] += 1
    FIGURES["kills"] += 1
    FIGURES["resumed_bit_exact"] += 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_then_exits_and_resumes_bit_exact(ref, tmp_path, sig):
    d = tmp_path / "sig"
    p = fork_cli([*FIT, "--trainer.run_dir", str(d)], tmp_path / "sig.log")
    assert wait_for(d / "metrics.csv", p) or wait_for(d / "checkpoints" / "last.ckpt", p)
    time.sleep(0.3)
    p.kill(sig)
    assert p.wait() == 128 + sig, p.text()[-3000:]
    line = [ln for ln in p.stderr_lines() if "interrupted by" in ln]
    assert line and "resume with --ckpt_path" in line[0], p.text()[-2000:]
    MESSAGES[f"{signal.Signals(sig).name} during training"] = line[0]
    last = d / "checkpoints" / "last.ckpt"
    p = run_cli([*FIT, "--trainer.run_dir", str(d), "--ckpt_path", str(last)], tmp_path / "sig2.log")
    assert p.rc == 0, p.text()[-3000:]
    assert same_final_state(ref, d) == []
    FIGURES["runs_killed"] += 1
    FIGURES["kills"] += 1
    FIGURES["resumed_bit_exact"] += 1


@pytest.mark.slow
def test_exception_in_final_evaluation_keeps_the_trained_state(tmp_path):
    d = tmp_path / "final"
    rewards = f'[{{name: "{FAULTY}", mode: raise_eval, eval_batch: 64}}]'
    argv = [*FIT, "--trainer.eval_every", "0", "--rewards", rewards, "--trainer.run_dir", str(d)]
    p = run_cli(argv, tmp_path / "final.log")
    assert p.rc == 1
    assert "the final evaluation failed" in p.text() and "last.ckpt" in p.text()
    from fewstep_rl.ckpt_io import load_checkpoint

    assert load_checkpoint(d / "checkpoints" / "last.ckpt")["fewstep"]["stream_pos"] == STEPS
    ok = f'[{{name: "{FAULTY}", mode: ok, eval_batch: 64}}]'
    p = run_cli([*FIT, "--trainer.eval_every", "0", "--rewards", ok, "--trainer.run_dir", str(d), "--ckpt_path",
                 str(d / "checkpoints" / "last.ckpt"), "--allow_changes", "rewards"], tmp_path / "final2.log")
    assert p.rc == 0, p.text()[-3000:]
    assert json.loads((d / "final_metrics.json").read_text())["reward/faulty"] == pytest.approx(
        json.loads(p.text().strip().splitlines()[-1])["reward/faulty"])


@pytest.mark.slow
def test_two_concurrent_runs_one_wins(tmp_path):
    d = tmp_path / "both"
    a = fork_cli([*FIT, "--trainer.run_dir", str(d), "--trainer.seed", "1"], tmp_path / "a.log")
    b = fork_cli([*FIT, "--trainer.run_dir", str(d), "--trainer.seed", "2"], tmp_path / "b.log")
    rcs = sorted([a.wait(), b.wait()])
    assert rcs == [0, 2], (a.text()[-2000:], b.text()[-2000:])
    loser = a if a.rc == 2 else b
    msg = one_line_error(loser, "", "two runs into one directory at once")
    assert "in use by another live run" in msg or "is not empty" in msg
    winner_seed = 1 if a.rc == 0 else 2
    from fewstep_rl.ckpt_io import load_checkpoint

    assert load_checkpoint(d / "checkpoints" / "last.ckpt")["fewstep"]["config"]["trainer"]["seed"] == winner_seed


@pytest.mark.slow
def test_ddp_two_ranks_lock_and_sigterm(tmp_path):
    """2-rank DDP through the CLI: rank 0 holds the lock; SIGTERM to rank 0 saves on every rank and stops both."""
    import subprocess
    import sys

    d = tmp_path / "ddp"
    argv = [*FIT, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "400", "--trainer.run_dir", str(d)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "FEWSTEP_RUN_DIR")}
    env["OMP_NUM_THREADS"] = "1"
    cli = str(Path(sys.executable).parent / "fewstep-rl")  # a real process: the DDP launcher re-executes argv
    with open(tmp_path / "ddp.log", "w") as log:
        p = subprocess.Popen([cli, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            end = time.monotonic() + 300
            while not (d / "checkpoints" / "last.ckpt").exists() and p.poll() is None and time.monotonic() < end:
                time.sleep(0.1)
            assert p.poll() is None, (tmp_path / "ddp.log").read_text()[-3000:]
            second = run_cli(argv, tmp_path / "ddp2.log")
            one_line_error(second, "in use by another live run", "second run while a DDP run holds the directory")
            p.send_signal(signal.SIGTERM)
            assert p.wait(120) == 128 + signal.SIGTERM, (tmp_path / "ddp.log").read_text()[-3000:]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    from fewstep_rl.ckpt_io import load_checkpoint

    done = load_checkpoint(d / "checkpoints" / "last.ckpt")["fewstep"]["stream_pos"]
    assert 0 < done < 400
    assert "interrupted by SIGTERM" in (tmp_path / "ddp.log").read_text()


# ------------------------------------------------------------------------------------------------ bad inputs
def test_run_directory_is_protected(ref, tmp_path):
    d = tmp_path / "taken"
    shutil.copytree(ref, d)
    (d / "checkpoints" / "iter=000010.ckpt").write_bytes(b"stale")
    p = run_cli([*FIT, "--trainer.run_dir", str(d)], tmp_path / "ne.log")
    one_line_error(p, "is not empty", "fresh run into a non-empty run directory")
    assert (d / "checkpoints" / "iter=000010.ckpt").exists()
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    p = run_cli([*FIT, "--trainer.run_dir", str(other), "--overwrite"], tmp_path / "nr.log")
    one_line_error(p, "not a run directory", "--overwrite on a directory that is not a run directory")
    assert (other / "thesis.tex").read_text() == "precious"
    p = run_cli([*FIT, "--trainer.max_steps", "3", "--trainer.run_dir", str(d), "--overwrite"], tmp_path / "ow.log")
    assert p.rc == 0, p.text()[-2000:]
    assert not (d / "checkpoints" / "iter=000010.ckpt").exists()
    from fewstep_rl.rundir import RunLock

    lock = RunLock(d).acquire()
    try:
        p = run_cli([*FIT, "--trainer.run_dir", str(d), "--overwrite"], tmp_path / "lk.log")
        one_line_error(p, "in use by another live run", "second live run into a locked directory")
    finally:
        lock.release()


def test_bad_checkpoints_are_one_clear_line(ref, tmp_path):
    last = ref / "checkpoints" / "last.ckpt"
    flipped, trunc = tmp_path / "flipped.ckpt", tmp_path / "trunc.ckpt"
    flip_byte(last, flipped)
    trunc.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    run = [*FIT, "--trainer.max_steps", "40"]
    p = run_cli([*run, "--trainer.run_dir", str(tmp_path / "a"), "--ckpt_path", str(flipped)], tmp_path / "f.log")
    one_line_error(p, "corrupted", "bit-flipped checkpoint to fit --ckpt_path")
    assert not (tmp_path / "a").exists(), "nothing may be written before the checkpoint is validated"
    p = run_cli(["eval", "--ckpt", str(flipped), "--n", "8"], tmp_path / "fe.log")
    one_line_error(p, "corrupted", "bit-flipped checkpoint to eval --ckpt")
    p = run_cli([*run, "--trainer.run_dir", str(tmp_path / "b"), "--ckpt_path", str(trunc)], tmp_path / "t.log")
    one_line_error(p, "truncated or not a checkpoint", "truncated checkpoint to fit --ckpt_path")
    p = run_cli(["fit", "--method", "crd", *TOY, "--trainer.max_steps", "40", "--trainer.run_dir",
                 str(tmp_path / "c"), "--ckpt_path", str(last)], tmp_path / "m.log")
    one_line_error(p, "was written by method 'dmd2'", "another method's checkpoint to fit --ckpt_path")


@pytest.mark.parametrize("mode,expect,name", [
    ("nan", "1 non-finite score(s) (NaN)", "reward returning NaN"),
    ("inf", "1 non-finite score(s) (+Inf)", "reward returning +Inf"),
    ("shape", ", 1) for ", "reward returning shape (B, 1)"),
])
def test_bad_rewards_are_named_at_the_boundary(tmp_path, mode, expect, name):
    rewards = f'[{{name: "{FAULTY}", mode: {mode}, after: 2}}]'
    p = run_cli(["fit", "--method", "refl", *TOY, "--trainer.max_steps", "6", "--rewards", rewards,
                 "--trainer.eval_every", "0", "--trainer.run_dir", str(tmp_path / "r")], tmp_path / "r.log")
    msg = one_line_error(p, expect, name)
    assert "'faulty'" in msg


def test_nonfinite_gradients_are_skipped_counted_and_abort(tmp_path):
    every2 = f'[{{name: "{FAULTY}", mode: nan_grad, every: 2}}]'
    d = tmp_path / "skip"
    p = run_cli(["fit", "--method", "refl", *TOY, "--trainer.max_steps", "6", "--rewards", every2,
                 "--trainer.eval_every", "0", "--trainer.run_dir", str(d)], tmp_path / "skip.log")
    assert p.rc == 0, p.text()[-3000:]
    assert "update skipped" in p.text()
    import csv

    rows = [r for r in csv.DictReader(open(d / "metrics.csv")) if r.get("train/nonfinite_skipped")]
    assert [float(r["train/nonfinite_skipped"]) for r in rows] == [1.0, 2.0, 3.0]
    from fewstep_rl.ckpt_io import load_checkpoint

    sd = load_checkpoint(d / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(bool(v.isfinite().all()) for v in sd.values() if v.is_floating_point())
    always = f'[{{name: "{FAULTY}", mode: nan_grad, after: 3}}]'
    d = tmp_path / "abort"
    p = run_cli(["fit", "--method", "refl", *TOY, "--trainer.max_steps", "30", "--trainer.ckpt_last_every", "1",
                 "--trainer.nonfinite_limit", "3", "--rewards", always, "--trainer.eval_every", "0",
                 "--trainer.run_dir", str(d)],
                tmp_path / "abort.log")
    msg = one_line_error(p, "training aborted at iteration 6", "non-finite gradient every iteration")
    assert "last good checkpoint" in msg
    ck = load_checkpoint(d / "checkpoints" / "last.ckpt")
    assert ck["fewstep"]["stream_pos"] == 3  # no checkpoint while updates were being skipped
    assert all(bool(v.isfinite().all()) for v in ck["state_dict"].values() if v.is_floating_point())


def test_strict_resume(ref, tmp_path):
    last = ref / "checkpoints" / "last.ckpt"
    d = tmp_path / "res"
    base = [*FIT, "--trainer.max_steps", "34", "--trainer.run_dir", str(d), "--ckpt_path", str(last)]
    p = run_cli([*base, "--method.optim.lr", "0.05"], tmp_path / "lr.log")
    msg = one_line_error(p, "resume changes the config", "resume with a changed --method.optim.lr")
    assert "method.optim.lr: 0.001 -> 0.05" in msg and "--allow_changes method.optim.lr" in msg
    p = run_cli([*base, "--trainer.seed", "7"], tmp_path / "seed.log")
    one_line_error(p, "trainer.seed: 0 -> 7", "resume with a changed --trainer.seed")
    p = run_cli([*FIT, "--trainer.max_steps", "20", "--trainer.run_dir", str(d), "--ckpt_path", str(last)],
                tmp_path / "ms.log")
    one_line_error(p, "is below the 30 iterations", "resume with max_steps below the checkpoint")
    assert not d.exists()
    p = run_cli([*base, "--method.optim.lr", "0.05", "--allow_changes", "method.optim.lr"], tmp_path / "ok.log")
    assert p.rc == 0, p.text()[-3000:]
    from fewstep_rl.ckpt_io import load_checkpoint

    ck = load_checkpoint(d / "checkpoints" / "last.ckpt")
    assert ck["fewstep"]["config"]["method"]["optim"]["lr"] == 0.05
    assert all(g["initial_lr"] == 0.05 for o in ck["optimizer_states"] for g in o["param_groups"])
    rec = json.loads((d / "resume.jsonl").read_text().splitlines()[-1])
    assert rec["changes"] == {"method.optim.lr": {"from": 0.001, "to": 0.05}} and rec["iteration"] == STEPS
    assert "lr: 0.05" in (d / "config.yaml").read_text()


def test_cli_value_errors_are_one_line(ref, tmp_path):
    last = str(ref / "checkpoints" / "last.ckpt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        ("sample --n 0", ["sample", "--ckpt", last, "--n", "0", "--prompt", "", "--out", str(tmp_path / "x.npy")],
         "--n must be >= 1"),
        ("sample --n -3", ["sample", "--ckpt", last, "--n", "-3", "--prompt", "", "--out", str(tmp_path / "x.npy")],
         "--n must be >= 1"),
        ("eval --n 0", ["eval", "--ckpt", last, "--n", "0"], "--n must be >= 1"),
        ("--trainer.eval_samples 0", [*FIT, "--trainer.eval_samples", "0"], "eval_samples must be >= 1"),
        ("unknown toy2d prompt", ["sample", "--ckpt", last, "--prompt", "purple", "--out", str(tmp_path / "x.npy")],
         "unknown prompt 'purple'"),
        ("negative lr", [*FIT, "--method.optim.lr", "-0.1"], "learning rate must be a finite number > 0"),
        ("NaN lr", [*FIT, "--method.optim.lr", ".nan"], "NaN is not a valid value"),
        ("shapes prompt outside the grammar", ["sample", "--teacher", "--world", "shapes", "--prompt",
                                               "a purple hexagon", "--out", str(tmp_path / "s")],
         "prompt outside the world's vocabulary"),
        ("sample --prompts empty.txt", ["sample", "--ckpt", last, "--prompts", str(empty), "--out",
                                        str(tmp_path / "x.npy")], "holds no prompts"),
        ("sd3 --world.path /nonexistent", ["fit", "--method", "dmd2", "--world", "sd3", "--world.path",
                                           "/nonexistent", "--trainer.run_dir", str(tmp_path / "sd3")], "world.path"),
        ("--allow_changes without --ckpt_path", [*FIT, "--allow_changes", "method.optim.lr"], "only applies when resuming"),
    ]
    for name, argv, expect in cases:
        p = run_cli(argv, tmp_path / "v.log")
        one_line_error(p, expect, name)
    assert not (tmp_path / "sd3").exists(), "a run directory was created before the world was validated"


def test_printed_json_is_valid_with_null_for_nonfinite():
    from fewstep_rl.guards import dumps

    s = dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": 2})
    assert json.loads(s) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}


def test_zz_figures(capsys):
    """Print the suite's figures (runs killed, resumed bit-exact, bad inputs tried, data lost) and messages."""
    out = os.environ.get("FEWSTEP_FAULT_REPORT")
    report = {**FIGURES, "bad_inputs_listed": len(BAD_INPUTS), "messages": MESSAGES}
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    with capsys.disabled():
        print("\nfault suite:", json.dumps(FIGURES))
    assert FIGURES["data_lost"] == 0
