"""Pieces shared by the embedded pixel-space worlds (``shapes``, ``glyphs``): the shipped teacher directory, the
train/held-out breakdown of evaluation scores, and sample images. Functions, not a base class: each world composes
the ones it needs.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor


def teacher_dir(world: str, path: str | None, assets: Path) -> tuple[Path, dict]:
    """``(directory, teacher.json contents)`` of a world's teacher: ``path`` or the one shipped under ``assets``.

    Raises:
        ValueError: the directory has no ``transformer/`` folder (one line, with the rebuild command when it is the
            shipped one).
    """
    d = Path(path) if path else assets / "teacher"
    if not (d / "transformer").is_dir():
        hint = f" (rebuild the shipped one with `fewstep-rl world {world} build`)" if not path else ""
        raise ValueError(f"{world} teacher directory {str(d)!r} has no transformer/ folder{hint}")
    info = d / "teacher.json"
    return d, (json.loads(info.read_text()) if info.is_file() else {})


def by_split(scores: Mapping[str, Tensor], prompts: Sequence[str], held: Collection[str]) -> dict[str, float]:
    """Mean of each per-sample score overall (``name``) and over training / held-out prompts (``name_train``,
    ``name_heldout``; a split with no sample is left out)."""
    mask = torch.tensor([p in held for p in prompts], dtype=torch.bool)
    out = {k: float(v.float().mean()) for k, v in scores.items()}
    for split, m in (("train", ~mask), ("heldout", mask)):
        if m.any():
            out.update({f"{k}_{split}": float(v.float().cpu()[m].mean()) for k, v in scores.items()})
    return out


def save_samples(samples: Tensor, prompts: Sequence[str], out: Path) -> None:
    """A folder of PNGs (``00000.png`` …, upscaled 4× nearest) and ``prompts.json``."""
    from fewstep_rl.eval.images import save_pngs

    save_pngs(samples, prompts, Path(out))


def log_samples(samples: Tensor, prompts: Sequence[str], run_dir: Path, step: int) -> None:
    """A captioned grid of the first 32 evaluation samples: ``samples/iter_NNNNNN.png``."""
    from fewstep_rl.eval.images import save_grid

    save_grid(samples[:32], list(prompts[:32]), Path(run_dir) / "samples" / f"iter_{step:06d}.png")
