"""Reward-hacking monitor (``fewstep_rl.eval.monitor`` + ``MonitorCallback``): hand-checked image statistics, and the
alarm on a reward hacked on purpose in a real fit (with a control whose judge agrees with the training reward)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep_rl.eval.monitor import (
    AlarmState,
    colour_entropy,
    dark_fraction,
    edge_density,
    standardised_gain,
    within_prompt_diversity,
)

CLI = [str(Path(sys.executable).parent / "fewstep-rl")]


def test_image_statistics_hand_made():
    img = torch.ones(1, 3, 4, 4)
    img[..., :2] = 0.0  # left half black, right half white: one vertical edge between columns 1 and 2
    assert dark_fraction(img) == pytest.approx(0.5)
    assert edge_density(img) == pytest.approx(4 / 16)  # column 1 of each of the 4 rows
    assert colour_entropy(img) == pytest.approx(1.0)  # two colours, equal halves: 1 bit
    assert colour_entropy(torch.full((2, 3, 4, 4), 0.3)) == pytest.approx(0.0)
    red_green = torch.zeros(1, 3, 2, 2)
    red_green[0, 0, 0] = 1.0
    red_green[0, 1, 1] = 1.0  # half red, half green; all channel means 1/3 → none dark at level 0.1
    assert dark_fraction(red_green) == 0.0 and colour_entropy(red_green) == pytest.approx(1.0)


def test_within_prompt_diversity_hand_made():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 10.0], [10.0, 10.0]])
    # prompt a: one pair at distance 5 → 5/√2 after the per-coordinate normalisation; prompt b: identical → 0
    assert within_prompt_diversity(x, ["a", "a", "b", "b"]) == pytest.approx((5 / math.sqrt(2) + 0.0) / 2)
    assert math.isnan(within_prompt_diversity(x[:2], ["a", "b"]))


def test_monitor_prompts_give_every_prompt_two_samples():
    from fewstep_rl.eval.monitor import monitor_prompts, within_prompt_diversity

    many = [f"p{i}" for i in range(1000)]  # more prompts than samples (the shapes world)
    ps = monitor_prompts(many, 10, 4)
    assert ps == ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 2
    assert monitor_prompts(["a", "b"], 6, 2) == ["a", "a", "b", "b", "a", "a"]
    x = torch.arange(10, dtype=torch.float64)[:, None]
    assert within_prompt_diversity(x, ps) == within_prompt_diversity(x, ps)  # defined (not NaN)


def test_gain_and_alarm_state():
    assert standardised_gain(3.0, 1.0, 0.5) == pytest.approx(4.0)
    assert standardised_gain(3.0, 1.0, 0.0) == pytest.approx(2.0)  # no baseline spread: raw difference
    a = AlarmState(1.0, patience=2)
    assert [a.update(d) for d in (2.0, 0.5, 2.0, 3.0, 4.0, 0.0)] == [False, False, False, True, True, False]


def _fit(tmp_path, name, judge):
    run_dir = tmp_path / name
    p = subprocess.run(
        [*CLI, "fit", "--method", "refl", "--world", "toy2d", "--rewards", "[{name: linear, w: [1.0, 0.0]}]", "--judges", judge,
         "--method.beta", "0.01", "--method.optim.lr", "0.01", "--method.batch_size", "64", "--method.ema_decay", "0.0",
         "--monitor.alarm", "1.0", "--monitor.samples", "128", "--trainer.max_steps", "20",
         "--trainer.eval_every", "10", "--trainer.eval_samples", "64", "--trainer.progress_bar", "false",
         "--trainer.run_dir", str(run_dir)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "monitor.jsonl").read_text().splitlines()]
    return p, rows, run_dir


def test_monitor_alarm_on_a_hacked_reward(tmp_path):
    """β = 0.01 on r(x) = x_1: the samples run far to the right; the judge (the box around the teacher's support,
    |x_1| ≤ 3) falls to 0 while the training reward soars, so the alarm fires. The same run judged by an agreeing
    judge (the same linear reward, loaded by path) never alarms."""
    p, rows, run_dir = _fit(tmp_path, "hacked", "[{name: region, low: [-3.0, -1.0], high: [3.0, 1.0]}]")
    assert [r["iteration"] for r in rows] == [0, 10, 20]
    assert rows[-1]["train_total"] > rows[0]["train_total"] + 2.0
    assert rows[-1]["judge_total"] < rows[0]["judge_total"] - 0.5
    assert rows[-1]["alarm"] and rows[-1]["divergence"] > 1.0 and not rows[0]["alarm"]
    assert "reward-hacking alarm at iteration" in p.stderr
    best = json.loads((run_dir / "best.json").read_text())
    assert best["iteration"] == 0 and (run_dir / "checkpoints" / "best.ckpt").is_file()  # the judge's best: untrained
    # the judge never reaches the method: not in its config's rewards, not in its checkpoint
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert [r["name"] for r in ck["fewstep"]["config"]["rewards"]] == ["linear"]
    assert not any("region" in k for k in ck["state_dict"])
    p2, rows2, _ = _fit(tmp_path, "agree", "[{name: 'fewstep_rl.rewards.toy2d:LinearReward', w: [1.0, 0.0]}]")
    assert rows2[-1]["train_total"] > rows2[0]["train_total"] + 2.0
    assert not any(r["alarm"] for r in rows2) and abs(rows2[-1]["divergence"]) < 1e-6
    assert "reward-hacking alarm" not in p2.stderr
