"""Evaluation of generated samples: world metrics plus mean rewards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def score_samples(
    world: Any, rewards: Any, samples: Tensor, prompts: Sequence[str], beta: float | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """``reward/<name>`` means (and ``reward/total`` for several) plus the world's own metrics."""
    out: dict[str, float] = {}
    if rewards is not None and len(rewards):
        meta = [world.prompt_meta(p) for p in prompts]
        scores = rewards(samples, list(prompts), meta)
        for name, s in scores.items():
            out[f"reward/{name}"] = float(s.float().mean())
        if len(scores) > 1:
            out["reward/total"] = float(rewards.combine(scores).float().mean())
    out.update(world.evaluate(samples, list(prompts), rewards=rewards, beta=beta, generator=generator))
    return out
