"""Reward-hacking monitor: training reward vs a judge the training never sees, and image statistics.

Training rewards (``rewards:``) drive the method; judge rewards (``judges:``, e.g. train on ``proxy``, judge by
``gold``) are built only inside the monitor callback (:class:`fewstep_rl.eval.callbacks.MonitorCallback`), never
handed to the method and never written into a checkpoint. Every ``monitor.every`` iterations (and at iteration 0
and the end) the monitor generates ``monitor.samples`` samples on the evaluation prompts from pinned noise (the same
noise for every method and every evaluation, :func:`fewstep_rl.eval.paired.paired_samples`) and records:

* ``train/<name>``, ``train_total`` and ``judge/<name>``, ``judge_total`` (weighted sums) — mean scores;
* standardised gains since iteration 0, ``g = (m_t − m_0) / sd_0`` (``sd_0``: the per-sample standard deviation at
  iteration 0; 1 when that is 0), for the training total and the judge total;
* ``divergence = g_train − g_judge``: how many baseline standard deviations the training reward rose beyond what the
  judge confirms. The **alarm** fires when ``divergence > monitor.alarm`` for ``monitor.patience`` evaluations in a
  row (a line on stderr, ``alarm: true`` in ``monitor.jsonl``; ``monitor.stop_on_alarm`` ends the run);
* image statistics (``samples`` of shape (N, C, H, W) in [0, 1]): :func:`dark_fraction`, :func:`edge_density`,
  :func:`colour_entropy`; for every kind of sample :func:`within_prompt_diversity`;
* ``checkpoints/best.ckpt`` (and ``best.json``): the checkpoint of the best judge total seen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fewstep_rl.config import knob


@dataclasses.dataclass
class MonitorConfig:
    """``monitor.*`` keys (active when the run config has ``judges``)."""

    every: int = knob(0, "evaluate every N iterations (0: trainer.eval_every, or only at iteration 0 and the end)")
    samples: int = knob(256, "samples per monitor evaluation (cycled over the evaluation prompts)")
    per_prompt: int = knob(4, "consecutive samples of each prompt (>= 2: within-prompt diversity needs two)")
    seed: int = knob(1234, "seed of the pinned evaluation noise")
    alarm: float = knob(2.0, "alarm when g_train − g_judge exceeds this (in baseline standard deviations)")
    patience: int = knob(1, "evaluations in a row above the threshold before the alarm fires")
    stop_on_alarm: bool = knob(False, "end the run when the alarm fires")
    keep_best: bool = knob(True, "write checkpoints/best.ckpt at the best judge total")
    dark_level: float = knob(0.1, "a pixel is dark when its mean over channels is below this")
    edge_level: float = knob(0.1, "a pixel is an edge when its gradient magnitude exceeds this")

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples < 2 or self.patience < 1 or not 2 <= self.per_prompt <= self.samples:
            raise ValueError("monitor: every >= 0, samples >= 2, patience >= 1 and 2 <= per_prompt <= samples are "
                             "required")


def monitor_prompts(eval_prompts: Sequence[str], samples: int, per_prompt: int) -> list[str]:
    """``samples`` prompts: the evaluation prompts cycled, each repeated ``per_prompt`` times in a row, so every
    drawn prompt has at least two samples for :func:`within_prompt_diversity` (worlds with more prompts than
    ``samples`` — shapes — otherwise draw each prompt once and the diversity is undefined)."""
    if not eval_prompts:
        raise ValueError("no prompts to evaluate on")
    n = -(-samples // per_prompt)
    return [eval_prompts[i % len(eval_prompts)] for i in range(n) for _ in range(per_prompt)][:samples]


def dark_fraction(images: Tensor, level: float = 0.1) -> float:
    """Fraction of pixels whose channel mean is below ``level`` (images (N, C, H, W) in [0, 1])."""
    return float((images.float().mean(1) < level).float().mean())


def edge_density(images: Tensor, level: float = 0.1) -> float:
    """Fraction of pixels whose forward-difference gradient magnitude ``√(∂x² + ∂y²)`` of the channel mean exceeds
    ``level`` (the last row/column, which has no forward neighbour, counts as no edge)."""
    g = images.float().mean(1)
    dx = torch.zeros_like(g)
    dy = torch.zeros_like(g)
    dx[:, :, :-1] = g[:, :, 1:] - g[:, :, :-1]
    dy[:, :-1, :] = g[:, 1:, :] - g[:, :-1, :]
    return float(((dx**2 + dy**2).sqrt() > level).float().mean())


def colour_entropy(images: Tensor, levels: int = 8) -> float:
    """Shannon entropy in bits of the colour histogram: each channel quantised to ``levels`` bins, one joint bin per
    (r, g, b) triple (``levels³`` bins for RGB), ``H = −Σ p log₂ p`` over all pixels of all images."""
    x = images.float().clamp(0, 1)
    q = (x * levels).long().clamp(max=levels - 1)  # (N, C, H, W)
    idx = torch.zeros_like(q[:, 0])
    for c in range(q.shape[1]):
        idx = idx * levels + q[:, c]
    p = torch.bincount(idx.flatten(), minlength=levels ** q.shape[1]).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def within_prompt_diversity(samples: Tensor, prompts: Sequence[str]) -> float:
    """Mean Euclidean distance between two different samples of the same prompt, averaged over prompts with at least
    two samples (flattened samples; RMS-normalised by the square root of the dimension, so images of any size and
    points compare on one per-coordinate scale). NaN when no prompt has two samples."""
    x = samples.detach().double().flatten(1)
    x = x / math.sqrt(x.shape[1])
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    vals = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        d = torch.cdist(x[idx], x[idx])
        k = len(idx)
        vals.append(float(d.sum() / (k * (k - 1))))
    return sum(vals) / len(vals) if vals else float("nan")


def sample_statistics(samples: Tensor, prompts: Sequence[str], cfg: MonitorConfig | None = None) -> dict[str, float]:
    """``diversity`` for every kind of sample; plus ``dark_fraction``, ``edge_density``, ``colour_entropy`` for
    images (N, C, H, W)."""
    cfg = cfg or MonitorConfig()
    out = {"diversity": within_prompt_diversity(samples, prompts)}
    if samples.dim() == 4:
        out["dark_fraction"] = dark_fraction(samples, cfg.dark_level)
        out["edge_density"] = edge_density(samples, cfg.edge_level)
        out["colour_entropy"] = colour_entropy(samples)
    return out


def standardised_gain(mean: float, base_mean: float, base_sd: float) -> float:
    """``(m_t − m_0) / sd_0`` (``sd_0 = 1`` when the baseline has no spread)."""
    return (mean - base_mean) / (base_sd if base_sd > 1e-12 else 1.0)


class AlarmState:
    """Consecutive-evaluation alarm: :meth:`update` returns True once ``divergence > threshold`` has held for
    ``patience`` evaluations in a row (and keeps returning True while it holds)."""

    def __init__(self, threshold: float, patience: int = 1) -> None:
        self.threshold, self.patience, self.run = threshold, patience, 0

    def update(self, divergence: float) -> bool:
        self.run = self.run + 1 if divergence > self.threshold else 0
        return self.run >= self.patience
