"""Procedural ground-truth renderer of the ``shapes`` world.

A scene is drawn on a plain black ``size × size`` canvas (16 by default, 32 also supported). Every object fills an
``s × s`` box, ``s = default_object_size(size)`` (5 px at 16, 10 px at 32), in one flat palette colour:

* ``square``: the whole box;
* ``circle``: the pixels whose centre lies in the inscribed disc (at 5 px: the box without its four corners);
* ``triangle``: an isosceles triangle pointing up, base = the bottom row, apex = the top row's centre pixel(s)
  (at 5 px the rows hold 1, 1, 3, 3, 5 pixels).

:func:`shape_mask` is shared with the gold verifier, which classifies a blob by matching it against these masks.
Positions are uniform subject to: object boxes are at least ``gap`` (1) px apart (so no two objects touch, even
diagonally); for a relation, the subject's box lies entirely on the requested side of the reference's box (centre
offset ≥ ``s + gap`` along the relation's axis) and the offset across the axis is at most half the offset along it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from fewstep_rl.worlds.shapes.grammar import BACKGROUND, COLORS, SHAPES, PromptSpec, parse

_BATCH = 256  # candidate positions drawn per rejection round
_MAX_ROUNDS = 200


class Placed(NamedTuple):
    """One drawn object: its colour, shape and ``s × s`` box with top-left corner ``(y, x)``."""

    color: str
    shape: str
    y: int
    x: int
    s: int


def default_object_size(size: int) -> int:
    """Object box side for a canvas of ``size`` px: ``round(5 · size / 16)`` (5 at 16 px, 10 at 32 px)."""
    return max(3, round(5 * size / 16))


def shape_mask(shape: str, h: int, w: int) -> np.ndarray:
    """Boolean raster of ``shape`` filling an ``h × w`` box (pixel-centre sampling).

    Args:
        shape: ``"circle"``, ``"square"`` or ``"triangle"``.
        h: box height in pixels.
        w: box width in pixels.

    Returns:
        ``(h, w)`` bool array.
    """
    yc = (np.arange(h) + 0.5)[:, None]
    xc = (np.arange(w) + 0.5)[None, :]
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    if shape == "circle":
        return ((xc - w / 2) / (w / 2)) ** 2 + ((yc - h / 2) / (h / 2)) ** 2 <= 1.0 + 1e-9
    if shape == "triangle":
        half = np.maximum((w / 2) * yc / h, 0.5)  # half-width at the row centre; ≥ the apex pixel(s)
        return np.abs(xc - w / 2) <= half + 1e-9
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _apart(y: np.ndarray, x: np.ndarray, oy: int, ox: int, min_sep: int) -> np.ndarray:
    return (np.abs(y - oy) >= min_sep) | (np.abs(x - ox) >= min_sep)


def _place_relation(spec: PromptSpec, rng: np.random.Generator, size: int, s: int, gap: int) -> list[Placed]:
    rel = spec.relation
    a, b = spec.objects[rel.subject], spec.objects[rel.reference]
    hi = size - s + 1
    for _ in range(_MAX_ROUNDS):
        ya, xa, yb, xb = (rng.integers(0, hi, _BATCH) for _ in range(4))
        # offset of the reference from the subject, along and across the relation's axis
        along = {"left of": xb - xa, "right of": xa - xb, "above": yb - ya, "below": ya - yb}[rel.relation]
        across = np.abs(ya - yb) if rel.relation in ("left of", "right of") else np.abs(xa - xb)
        ok = np.flatnonzero((along >= s + gap) & (2 * across <= along))
        if ok.size:
            i = ok[0]
            placed = {
                rel.subject: Placed(a.color, a.shape, int(ya[i]), int(xa[i]), s),
                rel.reference: Placed(b.color, b.shape, int(yb[i]), int(xb[i]), s),
            }
            return [placed[0], placed[1]]
    raise RuntimeError(f"could not place {spec} on a {size} px canvas with {s} px objects")


def _place_group(spec: PromptSpec, rng: np.random.Generator, size: int, s: int, gap: int) -> list[Placed]:
    o = spec.objects[0]
    hi = size - s + 1
    for _ in range(_MAX_ROUNDS):  # restart the whole scene when an object finds no room
        placed: list[Placed] = []
        for _k in range(o.count):
            y, x = rng.integers(0, hi, _BATCH), rng.integers(0, hi, _BATCH)
            ok = np.ones(_BATCH, dtype=bool)
            for p in placed:
                ok &= _apart(y, x, p.y, p.x, s + gap)
            idx = np.flatnonzero(ok)
            if not idx.size:
                break
            placed.append(Placed(o.color, o.shape, int(y[idx[0]]), int(x[idx[0]]), s))
        if len(placed) == o.count:
            return placed
    raise RuntimeError(f"could not place {spec} on a {size} px canvas with {s} px objects")


def place(
    spec: PromptSpec | str, rng: np.random.Generator, size: int = 16, obj_size: int | None = None, gap: int = 1
) -> list[Placed]:
    """Random object boxes for a prompt (see the module docstring for the constraints).

    Args:
        spec: a prompt or its spec.
        rng: the only source of randomness.
        size: canvas side in pixels.
        obj_size: object box side; ``None`` for :func:`default_object_size`.
        gap: minimum background gap between object boxes, in pixels.

    Returns:
        One :class:`Placed` per object, groups in prompt order.
    """
    spec = parse(spec) if isinstance(spec, str) else spec
    s = default_object_size(size) if obj_size is None else int(obj_size)
    if s > size:
        raise ValueError(f"object size {s} exceeds the canvas size {size}")
    if spec.relation is not None:
        return _place_relation(spec, rng, size, s, gap)
    return _place_group(spec, rng, size, s, gap)


def draw(placed: Sequence[Placed], size: int = 16) -> np.ndarray:
    """Rasterise placed objects on the plain background.

    Args:
        placed: objects from :func:`place`.
        size: canvas side in pixels.

    Returns:
        ``(3, size, size)`` float32 image in [0, 1].
    """
    img = np.empty((3, size, size), dtype=np.float32)
    img[:] = np.asarray(BACKGROUND, dtype=np.float32)[:, None, None]
    for p in placed:
        mask = shape_mask(p.shape, p.s, p.s)
        region = img[:, p.y : p.y + p.s, p.x : p.x + p.s]
        region[:, mask] = np.asarray(COLORS[p.color], dtype=np.float32)[:, None]
    return img


def render(spec: PromptSpec | str, rng: np.random.Generator, size: int = 16, obj_size: int | None = None) -> np.ndarray:
    """One ground-truth image of a prompt.

    Args:
        spec: a prompt or its spec.
        rng: the only source of randomness (object positions).
        size: canvas side in pixels (16 or 32 in this world; any size that fits the objects works).
        obj_size: object box side; ``None`` for :func:`default_object_size`.

    Returns:
        ``(3, size, size)`` float32 image in [0, 1].
    """
    return draw(place(spec, rng, size, obj_size), size)


def render_batch(
    prompts: Sequence[str | PromptSpec],
    seed: int | np.random.Generator = 0,
    size: int = 16,
    obj_size: int | None = None,
) -> torch.Tensor:
    """Ground-truth images for a batch of prompts.

    Args:
        prompts: prompts or specs.
        seed: an integer seed or a ``numpy.random.Generator`` (consumed in prompt order).
        size: canvas side in pixels.
        obj_size: object box side; ``None`` for :func:`default_object_size`.

    Returns:
        ``(B, 3, size, size)`` float32 tensor in [0, 1].
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if not len(prompts):
        return torch.zeros(0, 3, size, size)
    return torch.from_numpy(np.stack([render(p, rng, size, obj_size) for p in prompts]))
