"""Paired evaluation: every model on the same prompts and the same noise, paired differences ± standard error.

Every source (a checkpoint's sampling role, or the frozen teacher) generates ``n`` samples for the world's
evaluation prompts (cycled). Sample ``i`` starts from the same initial noise under every source, at every step
count: the prompts are cut into fixed chunks and chunk ``c`` draws from a generator seeded ``stable_hash(seed, c)``
(initial noise first, then — for stochastic chains — the step noise), so a source's number of steps or its sampler
does not shift the noise of later chunks. A reward then scores every sample, and for two sources A and B the
per-sample differences ``d_i = r_i(A) − r_i(B)`` give the paired estimate

    mean(d) ± se(d),   se(d) = sd(d) / √n,   sd with Bessel's correction (n − 1),

which is much tighter than the unpaired ``√(se(A)² + se(B)²)`` whenever the prompt and the noise explain a large part
of a sample's score (``Var d = Var A + Var B − 2 Cov(A, B)``).

NFE sweep: the same comparison over step counts (students at 1, 2, 4, 8 steps, the teacher at 4, 8, 25, 50), rows
keyed ``label@steps``, every row paired against the first (the reference) and the previous row.

This is what ``docs/results/paired_gold.py`` did by hand for issue 4 (now a thin wrapper over this module).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.sampling.noise import stable_hash

STUDENT_NFE = (1, 2, 4, 8)
TEACHER_NFE = (4, 8, 25, 50)
CHUNK = 256

# generate(prompts, generator, steps) -> decoded samples
GenerateFn = Callable[[Sequence[str], torch.Generator, "int | None"], Tensor]


def mean_se(x: Tensor) -> tuple[float, float]:
    """``(mean, sd/√n)`` of a 1-D sample (sd with the n − 1 denominator; se = 0 for a single value)."""
    x = x.detach().double().flatten()
    n = x.numel()
    if n == 0:
        raise ValueError("mean_se of an empty sample")
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return float(x.mean()), se


def paired_difference(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Paired difference ``mean(a − b) ± se(a − b)`` of per-sample scores of the same samples' noise and prompts."""
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_se(a.double() - b.double())


def paired_rows(scores: dict[str, dict[str, Tensor]]) -> list[dict[str, Any]]:
    """One row per source (in insertion order) and reward.

    ``scores[label][reward]`` holds per-sample scores (every label the same samples' prompts and noise). Each row has
    ``label``, ``reward``, ``mean``, ``se`` and, against the first label (``ref``) and the previous one (``prev``),
    ``diff_ref``/``se_ref`` and ``diff_prev``/``se_prev`` (absent for the first row; ``prev`` absent when it is
    the reference).
    """
    labels = list(scores)
    rows: list[dict[str, Any]] = []
    if not labels:
        return rows
    for reward in scores[labels[0]]:
        for i, label in enumerate(labels):
            s = scores[label][reward]
            m, se = mean_se(s)
            row: dict[str, Any] = {"label": label, "reward": reward, "n": int(s.numel()), "mean": m, "se": se}
            if i > 0:
                row["ref"] = labels[0]
                row["diff_ref"], row["se_ref"] = paired_difference(s, scores[labels[0]][reward])
            if i > 1:
                row["prev"] = labels[i - 1]
                row["diff_prev"], row["se_prev"] = paired_difference(s, scores[labels[i - 1]][reward])
            rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`paired_rows`."""
    lines = ["| source | reward | mean ± se | − reference ± se | − previous ± se |", "|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r['diff_ref']:+.4f} ± {r['se_ref']:.4f}" if "diff_ref" in r else ""
        prev = f"{r['diff_prev']:+.4f} ± {r['se_prev']:.4f}" if "diff_prev" in r else ""
        lines.append(f"| {r['label']} | {r['reward']} | {r['mean']:.4f} ± {r['se']:.4f} | {ref} | {prev} |")
    return "\n".join(lines)


def chunk_generator(seed: int, chunk: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The pinned generator of prompt chunk ``chunk`` (identical for every source and step count)."""
    return torch.Generator(device=device).manual_seed(stable_hash(seed, "paired", chunk))


@torch.no_grad()
def paired_samples(gen: GenerateFn, prompts: Sequence[str], seed: int, steps: int | None = None,
                   device: str | torch.device = "cpu", chunk: int = CHUNK) -> Tensor:
    """Samples of one source for ``prompts``, chunk ``c`` drawn from :func:`chunk_generator` ``(seed, c)``."""
    outs = []
    for c, start in enumerate(range(0, len(prompts), chunk)):
        outs.append(gen(list(prompts[start : start + chunk]), chunk_generator(seed, c, device), steps))
    return torch.cat(outs)


@torch.no_grad()
def score_per_sample(rewards: Any, world: Any, samples: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample scores ``{reward name: (n,)}`` of a :class:`~fewstep_rl.rewards.MultiReward`."""
    meta = [world.prompt_meta(p) for p in prompts]
    return {k: v.detach().double().cpu() for k, v in rewards(samples, list(prompts), meta).items()}


def run_paired(
    sources: Sequence[tuple[str, GenerateFn, Sequence[int | None]]], world: Any, rewards: Any, prompts: Sequence[str],
    seed: int = 0, device: str | torch.device = "cpu",
) -> dict[str, dict[str, Tensor]]:
    """Per-sample scores of every ``(label, generate, step counts)`` source at each of its step counts.

    Keys are ``label`` when a source has one step count (``None``: its own default), else ``label@steps``.
    """
    out: dict[str, dict[str, Tensor]] = {}
    for label, gen, steps_list in sources:
        for steps in steps_list:
            key = label if len(steps_list) == 1 else f"{label}@{steps}"
            samples = paired_samples(gen, prompts, seed, steps, device)
            out[key] = score_per_sample(rewards, world, samples, prompts)
    return out
