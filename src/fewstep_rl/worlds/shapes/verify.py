"""Gold verifier of the ``shapes`` world: exact, non-differentiable, GenEval-like partial credit (methods.md §2.5).

Detection. Every pixel (clipped to [0, 1]) takes the label of the nearest reference colour among the background and
the palette (Euclidean RGB distance), or ``"other"`` when even the nearest is farther than ``other_dist`` (0.5;
palette colours are ≥ 1 apart, so Gaussian pixel noise of std 0.05 never flips a label). Blobs are the
8-connected components of equally labelled non-background pixels; blobs smaller than ``min_area`` pixels
(3 at 16 px, scaled with the image area) are ignored as specks. A blob's shape is the template of
:func:`~fewstep_rl.worlds.shapes.render.shape_mask` (circle / square / up-pointing triangle, rasterised into the
blob's bounding box) with the highest IoU against the blob, if that IoU is ≥ ``min_iou`` (0.6), the box sides lie
in ``[0.6 s, 1.6 s]`` for the nominal object size ``s`` (5 px at 16 px) and the box aspect ratio is ≤ 1.5;
otherwise the blob has no shape (``None``). On rendered shapes the templates match exactly (IoU 1); the nearest
wrong template scores ≤ 0.84 (circle vs square at 5 px).

Partial credit. With ``f(n, m) = max(0, 1 − |n − m| / n)`` (GenEval's count formula) and ``n`` requested,
``m`` found, the sub-requirements of a prompt are

* one **count** term per object group ``(n, colour, shape)``: ``m`` = blobs of that colour *and* shape;
* one **colour** term per distinct requested colour ``c``: ``n`` = the requested objects of colour ``c`` (summed
  over groups), ``m`` = blobs of colour ``c`` (any shape);
* one **shape** term per distinct requested shape, likewise (blobs of that shape, any colour);
* for relational prompts one **position** term: 1 if both groups have at least one exact (colour and shape) match
  and every (subject match, reference match) pair stands in the requested relation, else 0. The relation test is
  GenEval's: offset of the box centres, shrunk on each axis by 0.1 × (sum of the two boxes' sides) and clipped at
  0, divided by the raw offset's length; "left of" needs an x component < −0.5, "right of" > 0.5, "above" a y
  component < −0.5, "below" > 0.5 (y grows downwards).

``mean`` is the plain average of these terms (3 for ``"two red circles"``: count, colour, shape; 7 for a
relational prompt with two colours and two shapes: 2 count + 2 colour + 2 shape + position; 6 when the two objects
share their colour or their shape). Unrelated objects, blobs whose colour is no requested colour *and* whose shape
is no requested shape (``U`` of them, ``N`` requested objects in total), are penalised a little, multiplicatively:

    score = mean · (1 − 0.25 · min(1, U / N))

so a blank image scores 0 and a correct image with one stray unrelated object keeps 0.75–0.92 of its score.
``strict`` is True iff every term is 1 and ``U = 0`` (GenEval's binary correctness, logged, not a reward).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewstep_rl.worlds.shapes.grammar import BACKGROUND, COLORS, SHAPES, PromptSpec, parse
from fewstep_rl.worlds.shapes.render import default_object_size, shape_mask

OTHER = "other"
"""Colour label of blobs far from every palette colour."""

POSITION_THRESHOLD = 0.1
UNRELATED_PENALTY = 0.25

_NAMES = list(COLORS)
_REFS = np.asarray([BACKGROUND, *COLORS.values()], dtype=np.float32)  # label 0 = background, 1.. = palette
_OTHER_LABEL = len(_REFS)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


@dataclass(frozen=True)
class Blob:
    """A detected object.

    Attributes:
        color: palette colour name or ``"other"``.
        shape: ``"circle"``, ``"square"``, ``"triangle"`` or ``None`` (no template fits).
        bbox: ``(y0, x0, y1, x1)``, end-exclusive.
        area: number of pixels.
        iou: IoU with the best-fitting template (0 when the box size rules the blob out).
    """

    color: str
    shape: str | None
    bbox: tuple[int, int, int, int]
    area: int
    iou: float

    @property
    def center(self) -> tuple[float, float]:
        """Box centre ``(y, x)``."""
        y0, x0, y1, x1 = self.bbox
        return (y0 + y1) / 2, (x0 + x1) / 2

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"color": self.color, "shape": self.shape, "bbox": list(self.bbox), "area": self.area, "iou": self.iou}


@dataclass
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        score: partial-credit score in [0, 1] (the reward).
        strict: whether every requirement is met exactly (and no unrelated object is present).
        details: JSON-able per-criterion breakdown (``count``, ``color``, ``shape``, ``position``, ``criteria``,
            ``unrelated``, ``penalty``, ``mean``, ``blobs``).
    """

    score: float
    strict: bool
    details: dict[str, Any] = field(default_factory=dict)


def _as_numpy(image: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    return np.clip(image, 0.0, 1.0)


def label_pixels(image: np.ndarray | Tensor, other_dist: float = 0.5) -> np.ndarray:
    """Nearest-reference-colour label of every pixel.

    Args:
        image: ``(3, H, W)`` in [0, 1].
        other_dist: pixels farther than this from every reference colour are labelled "other".

    Returns:
        ``(H, W)`` int array: 0 background, ``1 + i`` palette colour ``i`` (``list(COLORS)`` order),
        ``len(COLORS) + 1`` other.
    """
    img = _as_numpy(image)
    d = np.linalg.norm(img[None] - _REFS[:, :, None, None], axis=1)  # (K+1, H, W)
    lab = d.argmin(0)
    lab[d.min(0) > other_dist] = _OTHER_LABEL
    return lab


def _components(lab: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    h, w = lab.shape
    grid = lab.tolist()
    seen = [[False] * w for _ in range(h)]
    out = []
    for y0 in range(h):
        for x0 in range(w):
            lv = grid[y0][x0]
            if lv == 0 or seen[y0][x0]:
                continue
            seen[y0][x0] = True
            stack, pix = [(y0, x0)], []
            while stack:
                y, x = stack.pop()
                pix.append((y, x))
                for dy, dx in _NEIGHBOURS:
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and not seen[yy][xx] and grid[yy][xx] == lv:
                        seen[yy][xx] = True
                        stack.append((yy, xx))
            out.append((lv, pix))
    return out


def _classify(mask: np.ndarray, s: int, min_iou: float) -> tuple[str | None, float]:
    h, w = mask.shape
    lo, hi = max(2, math.floor(0.6 * s)), math.ceil(1.6 * s)
    if not (lo <= h <= hi and lo <= w <= hi) or max(h, w) > 1.5 * min(h, w):
        return None, 0.0
    best, best_iou = None, -1.0
    for shape in SHAPES:
        t = shape_mask(shape, h, w)
        iou = float((t & mask).sum() / (t | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return (best if best_iou >= min_iou else None), round(best_iou, 4)


def detect(
    image: np.ndarray | Tensor,
    min_area: int | None = None,
    obj_size: int | None = None,
    other_dist: float = 0.5,
    min_iou: float = 0.6,
) -> list[Blob]:
    """Segment an image into coloured, shape-classified blobs.

    Args:
        image: ``(3, H, W)`` in [0, 1] (values outside are clipped).
        min_area: smallest blob kept, in pixels; ``None`` for ``round(3 · H·W / 256)`` (3 at 16 px).
        obj_size: nominal object size for the shape-size gate; ``None`` for the renderer's default for ``H``.
        other_dist: see :func:`label_pixels`.
        min_iou: smallest template IoU that still names a shape.

    Returns:
        The blobs, in raster order of their first pixel.
    """
    lab = label_pixels(image, other_dist)
    h, w = lab.shape
    min_area = max(1, round(3 * h * w / 256)) if min_area is None else min_area
    s = default_object_size(h) if obj_size is None else obj_size
    blobs = []
    for lv, pix in _components(lab):
        if len(pix) < min_area:
            continue
        ys, xs = np.array(pix).T
        y0, x0, y1, x1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        mask[ys - y0, xs - x0] = True
        shape, iou = _classify(mask, s, min_iou)
        color = OTHER if lv == _OTHER_LABEL else _NAMES[lv - 1]
        blobs.append(Blob(color, shape, (y0, x0, y1, x1), len(pix), iou))
    return blobs


def relations_from_offset(offset_xy: np.ndarray, dims_xy: np.ndarray) -> set[str]:
    """GenEval's relations of object ``a`` w.r.t. object ``b`` from the centre offset ``a − b`` (x right, y down) and
    the summed box sizes (width, height): the offset shrunk by ``POSITION_THRESHOLD`` of the sizes, normalised; a
    component beyond ±0.5 names the relation. Shared by this verifier and the GenEval reward's detector boxes."""
    offset = np.asarray(offset_xy, dtype=np.float64)
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * np.asarray(dims_xy, dtype=np.float64), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def relations_between(a: Blob, b: Blob) -> set[str]:
    """GenEval's relative position of blob ``a`` with respect to blob ``b`` (see the module docstring)."""
    (ya, xa), (yb, xb) = a.center, b.center
    dims = [(a.bbox[3] - a.bbox[1]) + (b.bbox[3] - b.bbox[1]), (a.bbox[2] - a.bbox[0]) + (b.bbox[2] - b.bbox[0])]
    return relations_from_offset(np.array([xa - xb, ya - yb]), np.array(dims))


def _credit(n: int, m: int) -> float:
    return max(0.0, 1.0 - abs(n - m) / n)


def score_blobs(blobs: Sequence[Blob], prompt: str | PromptSpec) -> VerifyResult:
    """Partial-credit score of detected blobs against a prompt (formula in the module docstring).

    Args:
        blobs: output of :func:`detect`.
        prompt: a prompt or its spec.

    Returns:
        The :class:`VerifyResult`.
    """
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    count_terms, color_terms, shape_terms = [], [], []
    matches = []
    for o in spec.objects:
        found = [b for b in blobs if b.color == o.color and b.shape == o.shape]
        matches.append(found)
        count_terms.append(
            {
                "color": o.color,
                "shape": o.shape,
                "required": o.count,
                "found": len(found),
                "score": _credit(o.count, len(found)),
            }
        )
    req_colors: dict[str, int] = {}
    req_shapes: dict[str, int] = {}
    for o in spec.objects:
        req_colors[o.color] = req_colors.get(o.color, 0) + o.count
        req_shapes[o.shape] = req_shapes.get(o.shape, 0) + o.count
    for c, n in req_colors.items():
        m = sum(b.color == c for b in blobs)
        color_terms.append({"color": c, "required": n, "found": m, "score": _credit(n, m)})
    for sh, n in req_shapes.items():
        m = sum(b.shape == sh for b in blobs)
        shape_terms.append({"shape": sh, "required": n, "found": m, "score": _credit(n, m)})
    terms = [t["score"] for t in (*count_terms, *color_terms, *shape_terms)]
    position = None
    if spec.relation is not None:
        r = spec.relation
        subj, ref = matches[r.subject], matches[r.reference]
        ok = bool(subj and ref) and all(r.relation in relations_between(a, b) for a in subj for b in ref)
        position = {
            "relation": r.relation,
            "subject": f"{spec.objects[r.subject].color} {spec.objects[r.subject].shape}",
            "reference": f"{spec.objects[r.reference].color} {spec.objects[r.reference].shape}",
            "pairs": len(subj) * len(ref),
            "score": float(ok),
        }
        terms.append(position["score"])
    unrelated = sum(b.color not in req_colors and b.shape not in req_shapes for b in blobs)
    penalty = 1.0 - UNRELATED_PENALTY * min(1.0, unrelated / spec.num_objects)
    mean = sum(terms) / len(terms)
    strict = all(t == 1.0 for t in terms) and unrelated == 0

    def avg(ts: list[dict]) -> float:
        return sum(t["score"] for t in ts) / len(ts)

    details = {
        "count": count_terms,
        "color": color_terms,
        "shape": shape_terms,
        "position": position,
        "criteria": {
            "count": avg(count_terms),
            "color": avg(color_terms),
            "shape": avg(shape_terms),
            "position": None if position is None else position["score"],
        },
        "unrelated": unrelated,
        "penalty": penalty,
        "mean": mean,
        "num_terms": len(terms),
        "blobs": [b.as_dict() for b in blobs],
    }
    return VerifyResult(score=mean * penalty, strict=strict, details=details)


def verify(image: np.ndarray | Tensor, prompt: str | PromptSpec, **detect_kwargs: Any) -> VerifyResult:
    """Score one image against its prompt.

    Args:
        image: ``(3, H, W)`` in [0, 1] (numpy array or tensor).
        prompt: a prompt or its spec.
        **detect_kwargs: forwarded to :func:`detect` (thresholds).

    Returns:
        The :class:`VerifyResult`.
    """
    return score_blobs(detect(image, **detect_kwargs), prompt)


def score_batch(
    images: Tensor | np.ndarray, prompts: Sequence[str | PromptSpec], **detect_kwargs: Any
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Score a batch of images (no gradients flow: the verifier is a black box).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1].
        prompts: ``B`` prompts or specs.
        **detect_kwargs: forwarded to :func:`detect`.

    Returns:
        ``(scores, strict, details)``: float32 ``(B,)``, bool ``(B,)`` (both on the images' device for tensor
        input, else CPU) and the ``B`` per-image detail dicts.
    """
    device = images.device if isinstance(images, Tensor) else torch.device("cpu")
    arr = images.detach().to("cpu", torch.float32).numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4 or len(arr) != len(prompts):
        raise ValueError(f"expected (B, 3, H, W) images for {len(prompts)} prompts, got shape {tuple(arr.shape)}")
    results = [verify(img, p, **detect_kwargs) for img, p in zip(arr, prompts)]
    scores = torch.tensor([r.score for r in results], dtype=torch.float32, device=device)
    strict = torch.tensor([r.strict for r in results], dtype=torch.bool, device=device)
    return scores, strict, [r.details for r in results]
