"""Loading a local diffusers-format model directory, component by component, with one clear error per problem.

Shared by every diffusers backbone family: ``load_model`` (a ``from_pretrained`` with the folder, config and weights
checked and every loader failure turned into one :class:`~fewstep_rl.backbones.base.BackboneLoadError` naming the
file), ``load_tokenizer``, ``present`` (an optional encoder/tokenizer pair) and ``read_shift`` (the scheduler's
``shift``). Always ``local_files_only``: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewstep_rl.backbones.base import BackboneLoadError

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
TRANSFORMERS_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")


def dtype_of(m: nn.Module) -> torch.dtype:
    """dtype of a module's first parameter."""
    return next(m.parameters()).dtype


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def present(root: Path, encoder: str, tokenizer: str, family: str) -> bool:
    """Whether an optional encoder/tokenizer pair is there; one without the other is an error."""
    a, b = (root / encoder).exists(), (root / tokenizer).exists()
    if a != b:
        have, lack = (encoder, tokenizer) if a else (tokenizer, encoder)
        raise BackboneLoadError(f"{family} world {root}: {root / have} exists but {root / lack} is missing")
    return a


def read_shift(root: Path) -> float | None:
    """``shift`` of ``scheduler/scheduler_config.json`` (``None`` without one)."""
    f = root / "scheduler" / "scheduler_config.json"
    if not f.exists():
        return None
    try:
        shift = json.loads(f.read_text()).get("shift")
    except (OSError, ValueError) as e:
        raise BackboneLoadError(f"cannot read {f}: {e}") from None
    return float(shift) if shift is not None else None


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first sentence`` of an exception (loader messages go on with generic advice)."""
    msg = " ".join(str(e).split()).split(". ")[0]
    return f"{type(e).__name__}: {msg[:limit]}{'…' if len(msg) > limit else ''}"


def load_model(cls: Any, root: Path, sub: str, dtype: torch.dtype, diffusers: bool, family: str) -> Any:
    """``cls.from_pretrained(root/sub)`` with checks; every failure becomes a :class:`BackboneLoadError`."""
    d = root / sub
    if not d.is_dir():
        raise BackboneLoadError(f"{family} world {root}: required folder {d} is missing")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise BackboneLoadError(f"{family} world {root}: {cfg} is missing")
    weights = sorted(f for pat in (DIFFUSERS_WEIGHTS if diffusers else TRANSFORMERS_WEIGHTS) for f in d.glob(pat))
    if not weights:
        expected = " or ".join(DIFFUSERS_WEIGHTS if diffusers else TRANSFORMERS_WEIGHTS)
        raise BackboneLoadError(f"{family} world {root}: no weights file in {d} (expected {expected})")
    what = f"{cls.__name__} from {cfg} and {weights[0]}"
    dkw = {"torch_dtype": dtype} if diffusers else {"dtype": dtype}
    try:
        model, info = cls.from_pretrained(d, local_files_only=True, output_loading_info=True, **dkw)
    except Exception as e:  # noqa: BLE001 - any loader failure is reported the same way
        raise BackboneLoadError(f"{family} world {root}: cannot load {what} (does the config fit the weights?): "
                                f"{first_line(e)}") from e
    bad = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad or info.get("error_msgs"):
        detail = "; ".join(f"{k.replace('_', ' ')}: {v[:4]}{' …' if len(v) > 4 else ''}" for k, v in bad.items())
        detail = detail or str(info.get("error_msgs"))
        raise BackboneLoadError(f"{family} world {root}: {cfg} does not fit the weights {weights[0]} ({detail})")
    return model.eval()


def load_tokenizer(root: Path, sub: str, family: str) -> Any:
    """``AutoTokenizer.from_pretrained(root/sub)``; a failure becomes a :class:`BackboneLoadError`."""
    from transformers import AutoTokenizer

    d = root / sub
    if not d.is_dir():
        raise BackboneLoadError(f"{family} world {root}: required folder {d} is missing")
    try:
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise BackboneLoadError(f"{family} world {root}: cannot load the tokenizer in {d}: {first_line(e)}") from e
