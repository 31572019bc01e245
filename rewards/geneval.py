"""``geneval``: GenEval-style compositional reward (Ghosh et al. 2023, arXiv 2310.11513) from a local transformers
detector directory (OWLv2 / OWL-ViT, open vocabulary; or DETR, COCO labels), plus GenEval's rules.

Per-prompt metadata (GenEval's ``evaluation_metadata.jsonl`` format, passed as ``meta``)::

    {"tag": "position", "include": [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]}],
     "exclude": [{"class": "cat", "count": 2}]}

Rules (GenEval's ``evaluate_image``): detections of a class above ``threshold`` (``counting_threshold`` for the
``counting`` tag), highest score first, at most ``max_objects``; an include requirement needs ≥ ``count`` of its
class, the first ``count`` of them in ``color`` (when given) and each of them in ``position`` relative to every
object matched by the referenced requirement; an exclude requirement fails when ≥ ``count`` objects are found.
``strict`` = every requirement holds (GenEval's binary correctness). The reward is the **partial-credit score**
used by RTDMD / Flow-GRPO for training (methods.md §2.5): the mean over sub-requirements of the count term
``max(0, 1 − |n − m| / n)``, the colour term (same formula on correctly coloured instances), the position term
(0/1) and one 0/1 term per exclude requirement. The relation test is GenEval's ``relative_position``: box-centre
offset shrunk by 0.1 × the summed box sides per axis, normalised by the raw offset; "left of"/"right of" need an
x component below −0.5 / above 0.5, "above"/"below" a y component below −0.5 / above 0.5.

Departures: GenEval detects with mmdetection Mask2Former and names colours with CLIP ViT-L/14 on masked crops; here
any transformers detector from a local directory does the detection (boxes, no masks), and a colour is the
nearest of GenEval's ten colour names (fixed sRGB anchors) to the median colour of the box's central half. The
shapes world's verifier (``worlds/shapes/verify.py``) implements the same relation test and count formula on
exact detections; :func:`relative_position` is checked against it in the tests (the two are not yet one module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.rewards._deps import require
from fewstep_rl.rewards.base import Reward
from fewstep_rl.worlds.shapes.verify import relations_from_offset

RELATIONS = ("left of", "right of", "above", "below")
COLOR_ANCHORS = {  # GenEval's colour names, sRGB anchors in [0, 1]
    "red": (0.85, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.95, 0.9, 0.1), "green": (0.1, 0.6, 0.15),
    "blue": (0.1, 0.25, 0.85), "purple": (0.5, 0.15, 0.6), "pink": (1.0, 0.6, 0.75), "brown": (0.45, 0.28, 0.1),
    "black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95),
}


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence, box ``(x0, y0, x1, y1)`` in pixels, colour name (or None)."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


def relative_position(a: tuple[float, ...], b: tuple[float, ...]) -> set[str]:
    """GenEval's relations of box ``a`` w.r.t. box ``b`` (boxes ``(x0, y0, x1, y1)``, y down)."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([(a[2] - a[0]) + (b[2] - b[0]), (a[3] - a[1]) + (b[3] - b[1])])
    return relations_from_offset(ca - cb, dims)


def _credit(n: int, m: int) -> float:
    return max(0.0, 1.0 - abs(n - m) / n) if n > 0 else float(m == 0)


def check_metadata(meta: dict) -> None:
    """Raise ``ValueError`` unless ``meta`` is GenEval metadata (``include`` list of ``{class, count, ...}``)."""
    inc = meta.get("include")
    if not isinstance(inc, list) or not inc:
        raise ValueError("geneval needs GenEval metadata per prompt: {'include': [{'class': ..., 'count': ...}], ...}")
    for i, r in enumerate([*inc, *meta.get("exclude", [])]):
        if not isinstance(r, dict) or not isinstance(r.get("class"), str) or not isinstance(r.get("count"), int):
            raise ValueError(f"geneval requirement {i} must have a 'class' string and an integer 'count', got {r!r}")
        pos = r.get("position")
        if pos is not None and not (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                                    and isinstance(pos[1], int) and 0 <= pos[1] < len(inc)):
            raise ValueError(f"geneval requirement {i}: 'position' must be [relation in {RELATIONS}, include index]")


def evaluate(detections: Sequence[Detection], meta: dict) -> tuple[float, bool, dict]:
    """GenEval rules on detections → (partial-credit score, strict correctness, per-term details)."""
    check_metadata(meta)
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(d.label, []).append(d)
    terms: list[float] = []
    strict, details = True, []
    # found objects per include requirement first, so a position may refer to any requirement (GenEval lists the
    # reference first; either order is accepted here)
    found_groups = [by_class.get(r["class"], [])[: r["count"]] for r in meta["include"]]
    for req, found in zip(meta["include"], found_groups):
        n, found_all = req["count"], by_class.get(req["class"], [])
        ok = len(found) >= n
        terms.append(_credit(n, len(found_all)))
        row: dict[str, Any] = {"class": req["class"], "required": n, "found": len(found_all)}
        if "color" in req:
            right = sum(d.color == req["color"] for d in found)
            terms.append(_credit(n, right))
            row["color_ok"] = right
            ok = ok and right >= n
        if "position" in req:
            # judged on the objects found (colour aside), so a wrong colour does not also zero the position term;
            # strict correctness is unchanged (a failed colour already fails it)
            rel, target = req["position"]
            ref = found_groups[target]
            ref_ok = len(ref) >= meta["include"][target]["count"]
            pos_ok = len(found) >= n and ref_ok and all(rel in relative_position(a.box, b.box) for a in found for b in ref)
            terms.append(float(pos_ok))
            row["position_ok"] = pos_ok
            ok = ok and pos_ok
        strict = strict and ok
        details.append(row)
    for req in meta.get("exclude", []):
        ok = len(by_class.get(req["class"], [])) < req["count"]
        terms.append(float(ok))
        strict = strict and ok
        details.append({"exclude": req["class"], "below": req["count"], "ok": ok})
    return sum(terms) / len(terms), strict, {"terms": terms, "requirements": details}


def box_color(image: Tensor, box: tuple[float, float, float, float]) -> str:
    """Nearest GenEval colour name to the median colour of the box's central half (image ``(3, H, W)`` in [0, 1])."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    H, W = image.shape[-2:]
    xa, xb = int(max(0, x0 + w / 4)), int(min(W, max(x0 + w / 4 + 1, x1 - w / 4)))
    ya, yb = int(max(0, y0 + h / 4)), int(min(H, max(y0 + h / 4 + 1, y1 - h / 4)))
    crop = image[:, ya:yb, xa:xb].reshape(3, -1)
    if crop.shape[1] == 0:
        return "black"
    med = crop.median(dim=1).values
    anchors = torch.tensor(list(COLOR_ANCHORS.values()), dtype=med.dtype, device=med.device)
    return list(COLOR_ANCHORS)[int((anchors - med).norm(dim=1).argmin())]


@dataclasses.dataclass
class GenEvalConfig:
    """Knobs of :class:`GenEvalReward`."""

    path: str = knob("", "local transformers detector directory (OWLv2 / OWL-ViT with tokenizer files, or DETR)")
    threshold: float = knob(0.3, "detection confidence threshold (GenEval: 0.3)")
    counting_threshold: float = knob(0.9, "threshold for prompts tagged 'counting' (GenEval: 0.9)")
    max_objects: int = knob(16, "detections kept per class (GenEval: 16)")
    image_size: int | None = knob(None, "detector input size (default: the model config's image_size, DETR 800)")
    query_template: str = knob("a photo of a {}", "OWL text query for a class name")


class GenEvalReward(Reward):
    """GenEval partial-credit score of an image against its metadata (black box, in [0, 1])."""

    name = "geneval"
    differentiable = False
    Config = GenEvalConfig

    def __init__(self, cfg: GenEvalConfig | None = None) -> None:
        super().__init__(cfg)
        transformers = require("transformers", "geneval", self.name)
        path = Path(self.cfg.path) if self.cfg.path else None
        if path is None or not path.is_dir():
            raise ValueError(f"reward 'geneval': 'path' must be a local detector directory, got {self.cfg.path!r}")
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward 'geneval': cannot read a detector config in {str(path)!r}: {e}") from None
        self.kind = config.model_type
        classes = {"owlv2": "Owlv2ForObjectDetection", "owlvit": "OwlViTForObjectDetection",
                   "detr": "DetrForObjectDetection"}
        if self.kind not in classes:
            raise ValueError(f"reward 'geneval': detector type {self.kind!r} is not supported (use {sorted(classes)})")
        self.model = getattr(transformers, classes[self.kind]).from_pretrained(str(path), local_files_only=True)
        self.model.eval().requires_grad_(False)
        if self.kind == "detr":
            self.tokenizer = None
            self.size = self.cfg.image_size or 800
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        else:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.size = self.cfg.image_size or int(config.vision_config.image_size)
            self.mean, self.std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def _pixels(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def detect(self, images: Tensor, classes: Sequence[Sequence[str]], thresholds: Sequence[float]) -> list[list[Detection]]:
        """Detections per image (``classes[i]``: the class names asked about in image ``i``)."""
        param = next(self.model.parameters())
        x = self._pixels(images.to(param.device, param.dtype))
        H, W = images.shape[-2:]
        out: list[list[Detection]] = []
        if self.kind == "detr":
            res = self.model(pixel_values=x)
            probs = res.logits.softmax(-1)[..., :-1]  # drop "no object"
            scores, labels = probs.max(-1)
            boxes = res.pred_boxes
            names = [[self.model.config.id2label.get(int(k), str(int(k))) for k in row] for row in labels]
        else:
            names, scores_l, boxes_l = [], [], []
            for i, cls in enumerate(classes):
                q = [self.cfg.query_template.format(c) for c in cls]
                tok = self.tokenizer(q, padding="max_length", truncation=True, return_tensors="pt",
                                     max_length=int(self.model.config.text_config.max_position_embeddings))
                res = self.model(input_ids=tok["input_ids"].to(param.device),
                                 attention_mask=tok["attention_mask"].to(param.device), pixel_values=x[i : i + 1])
                s, k = res.logits[0].sigmoid().max(-1)  # best query per box
                names.append([cls[int(j)] for j in k])
                scores_l.append(s)
                boxes_l.append(res.pred_boxes[0])
            scores, boxes = torch.stack(scores_l), torch.stack(boxes_l)
        for i in range(len(classes)):
            dets = []
            for name, s, b in zip(names[i], scores[i].tolist(), boxes[i].float().cpu().tolist()):
                if s < thresholds[i] or name not in classes[i]:
                    continue
                cx, cy, bw, bh = b
                box = ((cx - bw / 2) * W, (cy - bh / 2) * H, (cx + bw / 2) * W, (cy + bh / 2) * H)
                dets.append(Detection(name, s, box, box_color(images[i].float(), box)))
            dets.sort(key=lambda d: -d.score)
            per: dict[str, int] = {}
            kept = []
            for d in dets:
                per[d.label] = per.get(d.label, 0) + 1
                if per[d.label] <= self.cfg.max_objects:
                    kept.append(d)
            out.append(kept)
        return out

    def score(self, samples: Tensor, prompts: Sequence[str], meta: Sequence[dict]) -> Tensor:
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"reward 'geneval' expects images (B, 3, H, W) in [0, 1], got {tuple(samples.shape)}")
        for m in meta:
            check_metadata(m)
        classes = [sorted({r["class"] for r in [*m["include"], *m.get("exclude", [])]}) for m in meta]
        thr = [self.cfg.counting_threshold if m.get("tag") == "counting" else self.cfg.threshold for m in meta]
        dets = self.detect(samples.clamp(0, 1), classes, thr)
        return torch.tensor([evaluate(d, m)[0] for d, m in zip(dets, meta)], dtype=torch.float32, device=samples.device)
