"""Paired evaluation (``fewstep_rl.eval.paired``, ``fewstep-rl eval --paired``): hand-checked standard errors, the
pinned noise, and the command on a real toy2d checkpoint."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep_rl.eval.paired import mean_se, paired_difference, paired_rows, paired_samples

CLI = [str(Path(sys.executable).parent / "fewstep-rl")]


def run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env)


def test_standard_errors_hand_made_case():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.0, 2.0, 2.0, 5.0])
    # a: mean 2.5, sd² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, se = sqrt(5/3) / 2
    m, se = mean_se(a)
    assert m == pytest.approx(2.5) and se == pytest.approx(math.sqrt(5 / 3) / 2)
    # d = a − b = [1, 0, 1, −1]: mean 0.25, sd² = (0.5625 + 0.0625 + 0.5625 + 1.5625) / 3 = 2.75/3, se = sd / 2
    d, sed = paired_difference(a, b)
    assert d == pytest.approx(0.25) and sed == pytest.approx(math.sqrt(2.75 / 3) / 2)
    rows = paired_rows({"A": {"r": a}, "B": {"r": b}, "C": {"r": a + 1.0}})
    assert [r["label"] for r in rows] == ["A", "B", "C"]
    assert rows[1]["diff_ref"] == pytest.approx(-0.25) and rows[1]["se_ref"] == pytest.approx(sed)
    # C − A is a constant shift: difference exactly 1 with zero standard error (the paired advantage)
    assert rows[2]["diff_ref"] == pytest.approx(1.0) and rows[2]["se_ref"] == pytest.approx(0.0, abs=1e-12)
    assert rows[2]["prev"] == "B" and rows[2]["diff_prev"] == pytest.approx(1.25)
    assert "diff_ref" not in rows[0]


def test_noise_is_pinned_per_chunk_whatever_the_steps():
    """Chunk c draws its noise from its own seed: a source that draws more step noise does not shift later chunks."""

    def gen(prompts, g, steps):
        x0 = torch.randn(len(prompts), 2, generator=g)
        for _ in range(steps):  # a stochastic sampler: step noise after the initial noise
            torch.randn(len(prompts), 2, generator=g)
        return x0

    prompts = ["p"] * 10
    a = paired_samples(gen, prompts, seed=3, steps=1, chunk=4)
    b = paired_samples(gen, prompts, seed=3, steps=7, chunk=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, paired_samples(gen, prompts, seed=4, steps=1, chunk=4))


def test_paired_cli_on_a_toy2d_checkpoint(tmp_path):
    fit = run("fit", "--method", "dmd2", "--world", "toy2d", "--world.hidden", "16", "--method.batch_size", "16",
              "--trainer.max_steps", "2", "--trainer.eval_samples", "64", "--trainer.progress_bar", "false",
              "--trainer.run_dir", str(tmp_path / "run"))
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    p = run("eval", "--paired", ckpt, ckpt, "--teacher", "--n", "96", "--rewards", "linear,region",
            "--labels", "teacher,a,b")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    rows = {(r["label"], r["reward"]): r for r in out["rows"]}
    assert set(rows) == {(lab, r) for lab in ("teacher", "a", "b") for r in ("linear", "region")}
    # the same checkpoint twice on the same noise: identical samples, a paired difference of exactly 0 ± 0
    assert rows[("b", "linear")]["diff_prev"] == 0.0 and rows[("b", "linear")]["se_prev"] == 0.0
    assert rows[("a", "linear")]["se_ref"] > 0  # vs the teacher: different samples
    assert "| teacher | linear |" in p.stderr
    sweep = run("eval", "--paired", ckpt, "--teacher", "--nfe", "--n", "32", "--rewards", "linear",
                "--student_nfe", "1,2", "--teacher_nfe", "4,8")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    labels = [r["label"] for r in json.loads(sweep.stdout.strip().splitlines()[-1])["rows"]]
    assert labels == ["teacher@4", "teacher@8", f"{ckpt}@1", f"{ckpt}@2"]


def test_paired_cli_bad_input_is_one_line():
    p = run("eval", "--paired")
    assert p.returncode == 2 and "--teacher" in p.stderr and "Traceback" not in p.stderr
    p = run("eval", "--paired", "--teacher", "--world", "toy2d", "--nfe", "--teacher_nfe", "0,4")
    assert p.returncode == 2 and "teacher_nfe" in p.stderr and p.stderr.strip().count("\n") == 0
