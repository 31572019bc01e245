"""The reward-server wire format: typed JSON over HTTP, never pickle.

Request (``POST /score``, ``Content-Type: application/json``)::

    {"version": 1,
     "images": {"encoding": "png", "data": ["<base64 PNG>", ...]}            # 8-bit RGB, lossless
            |  {"encoding": "f16", "shape": [B, 3, H, W], "data": "<base64>"}  # little-endian float16 in [0, 1]
     "prompts": ["...", ...], "meta": [{...}, ...]}                           # meta optional, JSON objects

Response 200: ``{"version": 1, "scores": {name: [float, ...]}, "combined": [float, ...]}`` (``combined`` =
the server's weighted sum). Errors: ``{"error": "<one line>"}`` with 400 (malformed request), 413 (body larger
than the server's limit), 500 (a reward raised), 503 (shutting down), 504 (scoring exceeded the per-request
timeout). ``GET /health`` → ``{"status": "ok", "rewards": [...], "weights": [...], "version": 1}``.

JSON cannot carry NaN/Infinity portably: the server encodes non-finite scores as ``null``; the client treats a
``null`` (or any non-number) as a server fault and raises instead of training on it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
from typing import Any

import numpy as np

VERSION = 1
ENCODINGS = ("png", "f16")


class ProtocolError(ValueError):
    """A request or response that does not follow the protocol (the server answers 400)."""


@dataclasses.dataclass
class ScoreRequest:
    """A decoded request: images ``(B, 3, H, W)`` float32 in [0, 1], one prompt and one meta dict per image."""

    images: np.ndarray
    prompts: list[str]
    meta: list[dict]


def encode_images(images: np.ndarray, encoding: str) -> dict[str, Any]:
    """``(B, 3, H, W)`` float array in [0, 1] → the ``images`` field (PNG: rounded to 8 bits; f16: raw)."""
    if encoding not in ENCODINGS:
        raise ProtocolError(f"image encoding must be one of {ENCODINGS}, got {encoding!r}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ProtocolError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if encoding == "f16":
        arr = np.ascontiguousarray(images, dtype="<f2")
        return {"encoding": "f16", "shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}
    from PIL import Image

    u8 = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)
    data = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
        data.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"encoding": "png", "data": data}


def _b64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise ProtocolError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"{what} is not valid base64: {e}") from None


def decode_images(field: Any, max_pixels: int) -> np.ndarray:
    """The ``images`` field → ``(B, 3, H, W)`` float32; ``max_pixels`` bounds B·H·W before anything is decoded."""
    if not isinstance(field, dict) or field.get("encoding") not in ENCODINGS:
        raise ProtocolError(f"'images' must be an object with encoding in {ENCODINGS}")
    if field["encoding"] == "f16":
        shape = field.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)
                and shape[1] == 3):
            raise ProtocolError(f"f16 images need 'shape': [B, 3, H, W] of positive ints, got {shape!r}")
        if shape[0] * shape[2] * shape[3] > max_pixels:
            raise ProtocolError(f"request has {shape[0] * shape[2] * shape[3]} pixels, the server takes {max_pixels}")
        raw = _b64(field.get("data"), "images.data")
        if len(raw) != 2 * math.prod(shape):
            raise ProtocolError(f"f16 data has {len(raw)} bytes, shape {shape} needs {2 * math.prod(shape)}")
        return np.frombuffer(raw, dtype="<f2").reshape(shape).astype(np.float32)
    from PIL import Image

    data = field.get("data")
    if not isinstance(data, list) or not data:
        raise ProtocolError("png images need 'data': a non-empty list of base64 PNG strings")
    out, pixels = [], 0
    for i, s in enumerate(data):
        try:
            img = Image.open(io.BytesIO(_b64(s, f"images.data[{i}]")))
            if img.format != "PNG":
                raise ProtocolError(f"images.data[{i}] is {img.format}, not PNG")
            pixels += img.size[0] * img.size[1]
            if pixels > max_pixels:
                raise ProtocolError(f"request has more than {max_pixels} pixels")
            out.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad image
            raise ProtocolError(f"images.data[{i}] is not a readable PNG: {type(e).__name__}") from None
    if len({a.shape for a in out}) != 1:
        raise ProtocolError(f"all images of a request must have one size, got {sorted({a.shape for a in out})}")
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def encode_request(images: np.ndarray, prompts: list[str], meta: list[dict], encoding: str) -> bytes:
    return json.dumps({"version": VERSION, "images": encode_images(images, encoding), "prompts": list(prompts),
                       "meta": list(meta)}, allow_nan=False).encode()


def decode_request(body: bytes, max_pixels: int) -> ScoreRequest:
    """Parse and validate a request body (raises :class:`ProtocolError` with a one-line reason)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("body must be a JSON object")
    if obj.get("version") != VERSION:
        raise ProtocolError(f"protocol version must be {VERSION}, got {obj.get('version')!r}")
    unknown = set(obj) - {"version", "images", "prompts", "meta"}
    if unknown:
        raise ProtocolError(f"unknown keys {sorted(unknown)}; allowed: version, images, prompts, meta")
    images = decode_images(obj.get("images"), max_pixels)
    prompts = obj.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(images):
        raise ProtocolError(f"'prompts' must be a list of {len(images)} strings (one per image)")
    meta = obj.get("meta", [{} for _ in prompts])
    if not isinstance(meta, list) or len(meta) != len(images) or not all(isinstance(m, dict) for m in meta):
        raise ProtocolError(f"'meta' must be a list of {len(images)} objects (one per image)")
    return ScoreRequest(images, prompts, meta)


def encode_scores(scores: dict[str, list[float]], combined: list[float]) -> bytes:
    def clean(xs: list[float]) -> list[float | None]:
        return [float(x) if math.isfinite(x) else None for x in xs]

    return json.dumps({"version": VERSION, "scores": {k: clean(v) for k, v in scores.items()},
                       "combined": clean(combined)}).encode()


def decode_scores(body: bytes, n: int, key: str | None) -> list[float]:
    """A response body → ``n`` finite floats (``scores[key]``, or ``combined`` when ``key`` is None)."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"response is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("response must be a JSON object")
    if key is None:
        values = obj.get("combined")
    else:
        scores = obj.get("scores")
        if not isinstance(scores, dict) or key not in scores:
            have = sorted(scores) if isinstance(scores, dict) else []
            raise ProtocolError(f"response has no scores for {key!r} (it has {have})")
        values = scores[key]
    return check_values(values, n)


def check_values(values: Any, n: int) -> list[float]:
    """``n`` finite numbers, else :class:`ProtocolError` naming the first bad one."""
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ProtocolError(f"expected {n} scores, got {values!r:.200}")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ProtocolError(f"score {i} is {v!r}, not a number (the server returned NaN/inf or garbage)") from None
        if isinstance(v, bool) or not math.isfinite(f):
            raise ProtocolError(f"score {i} is {v!r}, not a finite number")
        out.append(f)
    return out
