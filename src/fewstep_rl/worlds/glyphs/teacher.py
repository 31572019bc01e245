"""Train the ``glyphs`` world's teacher with the shared pixel-space recipe (:mod:`fewstep_rl.worlds.pixel_teacher`).

Sizes (pilot in the ``glyphs`` section of the README): 16×48 RGB strips, an ``SD3Transformer2DModel`` with patch 4
(4 × 12 = 48 tokens; patch 2's 192 tokens cost 3.7× the time per step on the shared CPUs), 6 joint blocks, 4 heads
× 32 (width 128); a 3-layer, 128-wide CLIP text encoder over a character-level tokenizer (:func:`fewstep_rl.backbones.tiny.char_tokenizer`); AdamW lr 1e-3, 10% prompt dropout,
EMA 0.999 (the ``shapes`` recipe). Training data are fresh renders of the training words (the held-out 10% of
:func:`words.split_words` are never shown); evaluation scores the OCR gold judge (exact-match rate as ``strict``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.backbones import tiny
from fewstep_rl.worlds import pixel_teacher
from fewstep_rl.worlds.glyphs import render, words

TEACHER_CFG = dict(
    sample_size=16, patch_size=4, in_channels=3, out_channels=3, num_layers=6, attention_head_dim=32,
    num_attention_heads=4, caption_projection_dim=128, joint_attention_dim=128, pooled_projection_dim=128,
    pos_embed_max_size=12,
)
TEXT_CFG = dict(hidden=128, layers=3, heads=4, projection_dim=128, intermediate=256, max_positions=8)
MAX_TOKENS = 8  # BOS + 5 characters + EOS, padded
GUIDANCE = 4.0
SHIPPED_STEPS = 12250  # training steps of the teacher in assets/teacher (the build's default)


def gold(images: Tensor, prompts: list[str]) -> tuple[float, float]:
    """(mean OCR accuracy, exact-match rate) of the gold judge."""
    from fewstep_rl.worlds.glyphs.judge import judge

    acc, exact = judge(images, prompts)
    return float(acc.mean()), float(exact.float().mean())


RECIPE = pixel_teacher.TeacherRecipe(
    name="glyphs teacher", height=render.HEIGHT, width=render.WIDTH, transformer=TEACHER_CFG, text=TEXT_CFG,
    max_tokens=MAX_TOKENS, tokenizer=lambda: tiny.char_tokenizer(words.ALPHABET, max_length=MAX_TOKENS),
    render=lambda prompts, seed: render.render_batch(prompts, seed=seed), split=lambda: words.split_words(seed=0),
    judge=gold, guidance=GUIDANCE, meta={"height": render.HEIGHT, "width": render.WIDTH},
)


def train_teacher(out_dir: str | Path, seed: int = 0, steps: int = SHIPPED_STEPS, **kwargs: Any) -> dict[str, float]:
    """Train (or resume) the teacher in ``out_dir`` (keywords of :func:`pixel_teacher.train_teacher`)."""
    return pixel_teacher.train_teacher(RECIPE, out_dir, seed=seed, steps=steps, **kwargs)


def export(out_dir: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the EMA teacher as a diffusers-format directory (transformer/, text_encoder/, tokenizer/)."""
    pixel_teacher.export(RECIPE, out_dir, target, dtype)
