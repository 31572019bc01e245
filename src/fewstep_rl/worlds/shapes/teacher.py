"""Train the ``shapes`` world's teacher with the shared pixel-space recipe (:mod:`fewstep_rl.worlds.pixel_teacher`).

Sizes (issue 3's measured pilot): 16×16 RGB images, an ``SD3Transformer2DModel`` with 6 joint blocks, 4 heads × 32
(width 128), patch 2 (64 tokens); a 3-layer, 128-wide CLIP text encoder over a word-level tokenizer; AdamW lr 1e-3,
batch 64, 10% prompt dropout, EMA 0.999. Training data are fresh renders of the training prompts (the held-out
relational prompts of :func:`grammar.split_prompts` are never shown); evaluation scores the gold verifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.backbones import tiny
from fewstep_rl.worlds import pixel_teacher
from fewstep_rl.worlds.shapes import grammar, render, verify

TEACHER_CFG = dict(
    sample_size=16, patch_size=2, in_channels=3, out_channels=3, num_layers=6, attention_head_dim=32,
    num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=128, pooled_projection_dim=128,
    pos_embed_max_size=8,
)
TEXT_CFG = dict(hidden=128, layers=3, heads=4, projection_dim=128, intermediate=256, max_positions=16)
MAX_TOKENS = 16


def vocabulary() -> list[str]:
    """Every word of the grammar (plural nouns included), in a fixed order."""
    words = ["a", "one", "two", "three", *grammar.COLORS]
    for s in grammar.SHAPES:
        words += [s, s + "s"]
    words += ["left", "right", "of", "above", "below", "to", "the"]
    return words


def gold(images: Tensor, prompts: list[str]) -> tuple[float, float]:
    """(mean partial credit, strict accuracy) of the gold verifier."""
    scores, strict, _ = verify.score_batch(images, prompts)
    return float(scores.mean()), float(strict.float().mean())


RECIPE = pixel_teacher.TeacherRecipe(
    name="shapes teacher", height=16, width=16, transformer=TEACHER_CFG, text=TEXT_CFG, max_tokens=MAX_TOKENS,
    tokenizer=lambda: tiny.word_tokenizer(vocabulary(), max_length=MAX_TOKENS),
    render=lambda prompts, seed: render.render_batch(prompts, seed=seed),
    split=lambda: grammar.split_prompts(seed=0), judge=gold, guidance=4.0, meta={"size": 16},
)


def build_models(seed: int = 0) -> tuple[Any, Any, Any]:
    """(tokenizer, text encoder, transformer), freshly initialised."""
    return pixel_teacher.build_models(RECIPE, seed)


def sample_teacher(tr: Any, enc: Any, tok: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> Tensor:
    """Euler samples (images in [0, 1]) with CFG against the empty prompt."""
    return pixel_teacher.sample_teacher(RECIPE, tr, enc, tok, prompts, steps, guidance, seed)


def train_teacher(out_dir: str | Path, seed: int = 0, steps: int = 10000, **kwargs: Any) -> dict[str, float]:
    """Train (or resume) the teacher in ``out_dir`` (keywords of :func:`pixel_teacher.train_teacher`)."""
    return pixel_teacher.train_teacher(RECIPE, out_dir, seed=seed, steps=steps, **kwargs)


def export(out_dir: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the EMA teacher as a diffusers-format directory (transformer/, text_encoder/, tokenizer/)."""
    pixel_teacher.export(RECIPE, out_dir, target, dtype)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="train the shapes teacher (resumable)")
    ap.add_argument("--out", default="runs/shapes-teacher")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(train_teacher(a.out, a.seed, a.steps, max_minutes=a.minutes)))
