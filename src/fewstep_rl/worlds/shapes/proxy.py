"""The ``shapes`` world's proxy reward model: a small differentiable image–prompt agreement scorer ("CLIP score").

:class:`ProxyNet` reads a ``(B, 3, 16, 16)`` image in [0, 1] and a tokenised prompt and returns one logit per pair;
``sigmoid(logit)`` estimates the gold verifier's partial-credit score (:mod:`.verify`). It is trained by
:func:`train_proxy` on freshly rendered data with binary cross-entropy against the exact gold score of every
(image, prompt) pair, so it is a good but imperfect learned stand-in for the verifier: optimising it hard shows
reward hacking (gold-vs-proxy gaps).

Architecture (``ProxyConfig``, about 232k parameters):

* prompt encoder: word tokens of the grammar's fixed vocabulary (:func:`vocabulary`, :func:`tokenize`; aliases are
  canonicalised and ``"A right of B"`` / ``"A below B"`` rewritten as the same scene ``"B left of A"`` /
  ``"B above A"``; unknown words map to ``<unk>``) → embedding + learned position + role (before / in / after the
  relation words) → a 2-layer pre-norm transformer → mean over the tokens;
* image encoder: ``[2x − 1, y-coord, x-coord]`` → GroupNorm'd 3×3 convs at 16×16 (two), 8×8 and 4×4 (strided),
  SiLU, each modulated by FiLM from the prompt vector, so the network can pick out the requested colours and shapes;
* head: the 4×4 map through a 1×1 conv, flattened (keeps where things are), plus global max pools of the 16×16 and
  4×4 features ("is there such an object anywhere"), concatenated with the prompt vector → MLP → logit.

Training data (:func:`make_batch`): per example a prompt from the grammar and an image that is its render (matched),
the render of a hard negative (:func:`perturb`: one attribute changed — colour, shape, count, relation flipped,
objects swapped), of a random other prompt, a render at an odd object size, a generator-like render with jittered
object sizes and outlines (:func:`render_jittered`), or a blank / noise image; then, often, degradations that mimic
imperfect generator samples (:func:`degrade`: smooth warps, Gaussian noise, blur, colour jitter, pixel dropout,
blends of two renders, erased patches, stray blobs and speckles, dilated / eroded edges, dimmed objects, palette
snapping). In training every image is also paired with a hard-negative prompt, so each batch holds pairs that
differ only in the text. The label is always the verifier's score of the final image, so targets are exact.

Known limit: the proxy is much better at colours, counts and positions than at telling a generator's blobby circle
from a square, which is where the gold verifier is strict — a natural source of proxy-vs-gold gaps.

The shipped weights (``assets/proxy.safetensors``, fp16, plus ``assets/proxy.json`` with the architecture, the
training settings and held-out metrics) are rebuilt by :func:`train_proxy` followed by the calibration on the
teacher's own samples in :mod:`.calibrate` (``fewstep-rl world shapes build`` runs both); the render-only weights
of :func:`train_proxy` alone are kept in ``assets/proxy-renders/``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep_rl.worlds.shapes import grammar, render, verify

ASSETS = Path(__file__).resolve().parent / "assets"
"""Folder of the shipped proxy weights (``proxy.safetensors``) and config (``proxy.json``)."""

DEFAULT_WEIGHTS = ASSETS / "proxy.safetensors"
FORMAT = "fewstep-rl/shapes-proxy/v2"
MAX_TOKENS = 12
PAD, UNK, CLS = 0, 1, 2


def vocabulary() -> list[str]:
    """The proxy's token vocabulary: ``<pad>``, ``<unk>``, ``<cls>``, then every word of the grammar (fixed order)."""
    words = ["<pad>", "<unk>", "<cls>", "a", "one", "two", "three", *grammar.COLORS]
    for s in grammar.SHAPES:
        words += [s, s + "s"]
    words += ["left", "right", "of", "above", "below", "to", "the"]
    return words


_VOCAB = {w: i for i, w in enumerate(vocabulary())}


_RELATION_WORDS = ("left", "right", "of", "above", "below", "to", "the")


def _words(prompt: str) -> list[str]:
    try:
        spec = grammar.parse(prompt)
        if spec.relation is not None and spec.relation.relation in ("right of", "below"):
            text = grammar.mirror(prompt)  # "A right of B" → "B left of A": the same scene, one wording
        else:
            text = grammar.format_prompt(spec)
    except ValueError:
        text = " ".join(str(prompt).lower().replace(".", " ").split())
    return text.split()


def tokenize(prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> Tensor:
    """Deterministic word-level tokenisation.

    Prompts of the grammar are first rewritten in canonical spelling (``"one red circle"`` → ``"a red circle"``,
    ``"to the left of"`` → ``"left of"``); other text is lower-cased and split on whitespace, with unknown words
    mapped to ``<unk>``. Every row starts with ``<cls>`` and is padded with ``<pad>`` (0) or truncated.

    Args:
        prompts: ``B`` prompt strings.
        max_tokens: row length, ``<cls>`` included.

    Returns:
        ``(B, max_tokens)`` int64 token ids.
    """
    out = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [CLS, *(_VOCAB.get(w, UNK) for w in _words(p))][:max_tokens]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


@dataclasses.dataclass
class ProxyConfig:
    """Architecture of :class:`ProxyNet` (stored in ``proxy.json``)."""

    vocab_size: int = len(_VOCAB)
    max_tokens: int = MAX_TOKENS
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 128
    channels: tuple[int, int, int, int] = (32, 32, 64, 64)
    head_channels: int = 16
    hidden: int = 128
    image_size: int = 16
    norm_groups: int = 8


class _Block(nn.Module):
    """Pre-norm transformer block with a key padding mask."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.norm2(x))


class ProxyNet(nn.Module):
    """Image–prompt agreement scorer for the ``shapes`` world (module docstring for the architecture).

    Args:
        cfg: the architecture; ``None`` for the defaults.
    """

    def __init__(self, cfg: ProxyConfig | None = None) -> None:
        super().__init__()
        cfg = cfg if cfg is not None else ProxyConfig()
        self.cfg = cfg
        d = cfg.text_dim
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Parameter(torch.zeros(cfg.max_tokens, d))
        self.seg = nn.Embedding(3, d)  # 0: before the relation (subject), 1: relation words, 2: after (reference)
        self.register_buffer("rel_ids", torch.tensor([_VOCAB[w] for w in _RELATION_WORDS]), persistent=False)
        self.blocks = nn.ModuleList(_Block(d, cfg.text_heads, cfg.text_ff) for _ in range(cfg.text_layers))
        self.text_norm = nn.LayerNorm(d)
        ch = cfg.channels
        ins = (5, *ch[:-1])
        strides = (1, 1, 2, 2)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, stride=s, padding=1) for i, o, s in zip(ins, ch, strides))
        self.norms = nn.ModuleList(nn.GroupNorm(cfg.norm_groups, c) if cfg.norm_groups else nn.Identity() for c in ch)
        self.film = nn.Linear(d, 2 * sum(ch))
        self.reduce = nn.Conv2d(ch[-1], cfg.head_channels, 1)
        side = cfg.image_size // 4
        self.fc = nn.Linear(cfg.head_channels * side * side + ch[1] + ch[3], cfg.hidden)
        self.head = nn.Sequential(nn.Linear(cfg.hidden + d, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, 1))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        n = cfg.image_size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
        self.register_buffer("coords", torch.stack([yy, xx])[None], persistent=False)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` token ids → ``(B, text_dim)`` prompt vectors (mean of the non-padding token outputs)."""
        keep = tokens != PAD
        is_rel = torch.isin(tokens, self.rel_ids)
        after = (is_rel.long().cumsum(1) > 0) & ~is_rel & keep
        x = self.tok(tokens) + self.pos[: tokens.shape[1]] + self.seg(is_rel.long() + 2 * after.long())
        for blk in self.blocks:
            x = blk(x, keep)
        x = self.text_norm(x)
        return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)

    def forward(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Logits ``(B,)`` for images ``(B, 3, S, S)`` in [0, 1] (``S = cfg.image_size``) and tokens ``(B, T)``."""
        t = self.encode_text(tokens)
        gammas_betas = self.film(t).split([c for c in self.cfg.channels for _ in (0, 1)], dim=1)
        h = torch.cat([images * 2 - 1, self.coords.to(images.dtype).expand(images.shape[0], -1, -1, -1)], dim=1)
        pooled = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            g, b = gammas_betas[2 * i], gammas_betas[2 * i + 1]
            h = F.silu(norm(conv(h)) * (1 + g[:, :, None, None]) + b[:, :, None, None])
            if i in (1, 3):  # global max pools: "is there such an object anywhere" (at 16×16 and at 4×4)
                pooled.append(h.amax((2, 3)))
        h = F.silu(self.fc(torch.cat([F.silu(self.reduce(h)).flatten(1), *pooled], 1)))
        return self.head(torch.cat([h, t], dim=1)).squeeze(1)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``sigmoid(logit)`` in (0, 1) for images in [0, 1] and prompt strings (differentiable in the images)."""
        return torch.sigmoid(self(images, tokenize(prompts, self.cfg.max_tokens).to(images.device)))


def num_params(net: nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# training data


def perturb(prompt: str, rng: np.random.Generator) -> str:
    """A hard negative of ``prompt``: one attribute changed (colour, shape, count, relation flipped or objects swapped).

    Shape changes are drawn twice as often as the others (generators get shapes wrong most often).

    Args:
        prompt: a prompt of the grammar.
        rng: the only source of randomness.

    Returns:
        A different canonical prompt of the grammar.
    """
    spec = grammar.parse(prompt)
    objs = list(spec.objects)
    for _ in range(100):
        i = int(rng.integers(len(objs)))
        o = objs[i]
        if spec.relation is None:
            kind = str(rng.choice(["color", "shape", "count"], p=[0.25, 0.5, 0.25]))
        else:
            kind = str(rng.choice(["color", "shape", "relation", "swap"], p=[0.2, 0.4, 0.2, 0.2]))
        new, rel = list(objs), spec.relation
        if kind == "color":
            new[i] = o._replace(color=str(rng.choice([c for c in grammar.COLORS if c != o.color])))
        elif kind == "shape":
            new[i] = o._replace(shape=str(rng.choice([s for s in grammar.SHAPES if s != o.shape])))
        elif kind == "count":
            new[i] = o._replace(count=int(rng.choice([n for n in range(1, grammar.MAX_COUNT + 1) if n != o.count])))
        elif kind == "relation":
            others = [r for r in grammar.RELATIONS if r != spec.relation.relation]
            flipped = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
            pick = flipped[spec.relation.relation] if rng.random() < 0.6 else str(rng.choice(others))
            rel = spec.relation._replace(relation=pick)
        else:
            new = [objs[1], objs[0]]
        try:
            out = grammar.format_prompt(grammar.PromptSpec(tuple(new), rel))
        except ValueError:  # e.g. a relational prompt whose two objects became equal
            continue
        if out != grammar.format_prompt(spec):
            return out
    raise RuntimeError(f"could not perturb {prompt!r}")


def _gauss_blur(x: Tensor, sigma: Tensor) -> Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 5)
    b, c, h, w = x.shape
    xs = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    kx = k.repeat_interleave(c, 0)
    xs = F.conv2d(xs, kx[:, None, None, :], groups=b * c)
    xs = F.conv2d(xs, kx[:, None, :, None], groups=b * c)
    return xs.reshape(b, c, h, w)


def _blob_layer(n: int, size: int, g: torch.Generator) -> Tensor:
    """Images with 1–3 stray blobs each (random palette or off-palette colours, random small boxes or shapes)."""
    out = torch.zeros(n, 3, size, size)
    palette = torch.tensor(list(grammar.COLORS.values()))
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            bh, bw = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
            y, x = (
                int(torch.randint(0, size - bh + 1, (1,), generator=g)),
                int(torch.randint(0, size - bw + 1, (1,), generator=g)),
            )
            if torch.rand(1, generator=g) < 0.6:
                col = palette[int(torch.randint(len(palette), (1,), generator=g))]
            else:
                col = torch.rand(3, generator=g)
            if torch.rand(1, generator=g) < 0.5:
                shape = grammar.SHAPES[int(torch.randint(3, (1,), generator=g))]
                m = torch.from_numpy(render.shape_mask(shape, bh, bw))
            else:
                m = torch.ones(bh, bw, dtype=torch.bool)
            region = out[i, :, y : y + bh, x : x + bw]
            region[:, m] = col[:, None]
    return out


def _shift_or(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def render_jittered(prompt: str, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A render with imperfect, generator-like objects: flat palette colours but jittered sizes and outlines.

    The objects are placed as by :func:`render.place` with a random object size (4–7 px); each one's mask is its
    template at a box of ±1 px per side, sometimes merged with another template, and its outline is roughened
    (pixels just outside switched on, pixels just inside switched off, each with a random rate up to 35%).
    Whether the verifier still recognises the shapes, counts and relations varies, which is the point.

    Args:
        prompt: the scene's prompt.
        rng: the only source of randomness.
        size: canvas side in pixels.

    Returns:
        ``(3, size, size)`` float32 image in [0, 1].
    """
    s = int(rng.choice([4, 5, 5, 6, 6, 7]))
    try:
        placed = render.place(prompt, rng, size, obj_size=s)
    except RuntimeError:
        s = 5
        placed = render.place(prompt, rng, size, obj_size=s)
    img = np.zeros((3, size, size), dtype=np.float32)
    q_out, q_in = rng.uniform(0, 0.35), rng.uniform(0, 0.35)
    for p in placed:
        h, w = (int(np.clip(s + rng.integers(-1, 2), 3, 8)) for _ in range(2))
        m = render.shape_mask(p.shape, h, w)
        if rng.random() < 0.2:
            other = render.shape_mask(str(rng.choice(grammar.SHAPES)), h, w)
            m = (m | other) if rng.random() < 0.5 else (m & other)
        big = np.zeros((h + 2, w + 2), dtype=bool)
        big[1:-1, 1:-1] = m
        outer = _shift_or(big) & ~big
        inner = big & _shift_or(~big)
        big = (big & ~(inner & (rng.random(big.shape) < q_in))) | (outer & (rng.random(big.shape) < q_out))
        y0, x0 = p.y + (s - h) // 2 - 1, p.x + (s - w) // 2 - 1
        ys, xs = np.nonzero(big)
        ys, xs = ys + y0, xs + x0
        ok = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
        img[:, ys[ok], xs[ok]] = np.asarray(grammar.COLORS[p.color], dtype=np.float32)[:, None]
    return img


def degrade(x: Tensor, g: torch.Generator, others: Tensor, strength: float = 1.0) -> Tensor:
    """Apply a random chain of degradations that mimic imperfect generator samples.

    Every image gets each degradation independently with some probability: blend with another render, stray blobs,
    erased patch, dilated / eroded edges, dimmed objects, colour jitter, blur, pixel dropout, Gaussian noise.

    Args:
        x: ``(B, 3, H, W)`` clean images in [0, 1].
        g: the only source of randomness.
        others: ``(B, 3, H, W)`` other renders to blend in.
        strength: scales how often each degradation is applied.

    Returns:
        Degraded images, clipped to [0, 1].
    """
    b, _, h, w = x.shape

    def pick(p: float) -> Tensor:
        return (torch.rand(b, generator=g) < p * strength).view(b, 1, 1, 1)

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=g)

    x = x.clone()
    flow = F.interpolate(torch.randn(b, 2, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    flow = flow * u(0.3, 1.5).view(b, 1, 1, 1) * (2 / w)  # a smooth displacement of ~1 px
    base = torch.stack(
        torch.meshgrid(
            torch.linspace(-1 + 1 / h, 1 - 1 / h, h), torch.linspace(-1 + 1 / w, 1 - 1 / w, w), indexing="ij"
        )[::-1],
        -1,
    )
    grid = base[None] + flow.permute(0, 2, 3, 1)
    warped = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    x = torch.where(pick(0.3), warped, x)  # jagged, distorted shapes (nearest sampling keeps flat colours)
    a = u(0.25, 0.85).view(b, 1, 1, 1)
    x = torch.where(pick(0.12), a * x + (1 - a) * others, x)  # blend / average of two renders
    blobs = _blob_layer(b, h, g)
    x = torch.where(pick(0.15) & (blobs.sum(1, keepdim=True) > 0), blobs, x)  # stray blobs
    eh, ew = torch.randint(1, 6, (2,), generator=g).tolist()
    ey, ex = int(torch.randint(0, h - eh + 1, (1,), generator=g)), int(torch.randint(0, w - ew + 1, (1,), generator=g))
    erase = torch.zeros(b, 1, h, w, dtype=torch.bool)
    erase[:, :, ey : ey + eh, ex : ex + ew] = True
    x = torch.where(pick(0.15) & erase, torch.zeros(()), x)  # partially erased objects
    on = x.amax(1, keepdim=True) > 0.05
    dil = F.max_pool2d(x, 3, 1, 1)
    ring = (
        ~on & (dil.amax(1, keepdim=True) > 0.05) & (torch.rand(b, 1, h, w, generator=g) < u(0.1, 0.6).view(b, 1, 1, 1))
    )
    x = torch.where(pick(0.2) & ring, dil * u(0.4, 1.0).view(b, 1, 1, 1), x)  # grow edges
    inner = on & (F.max_pool2d((~on).float(), 3, 1, 1) > 0)
    ero = inner & (torch.rand(b, 1, h, w, generator=g) < u(0.1, 0.6).view(b, 1, 1, 1))
    x = torch.where(pick(0.2) & ero, x * u(0.0, 0.6).view(b, 1, 1, 1), x)  # eat edges
    x = torch.where(pick(0.2), x * u(0.35, 1.0).view(b, 1, 1, 1), x)  # dim everything
    gain, off = u(0.6, 1.25, 3, 1, 1), u(-0.2, 0.2, 3, 1, 1)
    x = torch.where(pick(0.25), x * gain + off * (torch.rand(b, 1, 1, 1, generator=g) < 0.5), x)  # colour jitter
    x = torch.where(pick(0.3), _gauss_blur(x, u(0.35, 1.1)), x)  # blur
    drop = torch.rand(b, 1, h, w, generator=g) < u(0.02, 0.45).view(b, 1, 1, 1)
    fill = torch.where(
        torch.rand(b, 1, 1, 1, generator=g) < 0.5, torch.zeros(b, 3, h, w), torch.rand(b, 3, h, w, generator=g)
    )
    x = torch.where(pick(0.12) & drop, fill, x)  # pixel dropout
    std = u(0.01, 0.3).view(b, 1, 1, 1)
    x = torch.where(pick(0.4), x + std * torch.randn(x.shape, generator=g), x)  # Gaussian noise
    palette = torch.tensor([grammar.BACKGROUND, *grammar.COLORS.values()])  # (5, 3)
    speck = torch.rand(b, 1, h, w, generator=g) < u(0.01, 0.12).view(b, 1, 1, 1)
    colours = palette[torch.randint(1, len(palette), (b, h, w), generator=g)].permute(0, 3, 1, 2)
    x = torch.where(pick(0.12) & speck, colours, x)  # speckles of palette colours
    field = F.interpolate(torch.randn(b, 1, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    kth = (u(0.04, 0.2) * h * w).long().view(b, 1)
    blob = field > field.flatten(1).sort(dim=1, descending=True).values.gather(1, kth).view(b, 1, 1, 1)
    colour = palette[torch.randint(1, len(palette), (b,), generator=g)].view(b, 3, 1, 1)
    x = torch.where(pick(0.12) & blob, colour, x)  # an irregular smear of one colour
    nearest = palette[torch.cdist(x.permute(0, 2, 3, 1).reshape(b, -1, 3), palette[None]).argmin(-1)]
    snap = torch.rand(b, 1, h, w, generator=g) < u(0.3, 1.0).view(b, 1, 1, 1)
    x = torch.where(pick(0.2) & snap, nearest.view(b, h, w, 3).permute(0, 3, 1, 2), x)  # saturate to the palette
    return x.clamp(0, 1)


_LR = {"left of": "right of", "right of": "left of"}


def mirror_lr(prompt: str) -> str:
    """The prompt of the horizontally flipped scene: ``"left of"`` ↔ ``"right of"`` (anything else unchanged).

    Every shape of the grammar is left–right symmetric and the verifier's relation test is mirror-symmetric, so
    ``verify(image.flip(-1), mirror_lr(p)) == verify(image, p)`` exactly; :func:`make_batch` uses this to double a
    batch without re-running the verifier.
    """
    spec = grammar.parse(prompt)
    if spec.relation is None or spec.relation.relation not in _LR:
        return grammar.format_prompt(spec)
    return grammar.format_prompt(
        grammar.PromptSpec(spec.objects, spec.relation._replace(relation=_LR[spec.relation.relation]))
    )


KIND_P = (0.25, 0.2, 0.1, 0.05, 0.05, 0.35)
"""Image sources of :func:`make_batch`: own render, hard negative's render, other prompt's render, odd object
size, blank / noise, jittered render (:func:`render_jittered`)."""


def make_batch(
    n: int,
    seed: int,
    prompts: Sequence[str] | None = None,
    p_degrade: float = 0.7,
    mirror: bool = False,
    pair: bool = False,
) -> tuple[Tensor, list[str], Tensor]:
    """One training (or evaluation) batch of (image, prompt, gold score) triples.

    Image sources per example: the prompt's own render (40%), a hard negative's render (30%, :func:`perturb`),
    a random other prompt's render (15%), a render at an odd object size (4 or 6 px, 10%), a blank or pure-noise
    image (5%). A fraction ``p_degrade`` then goes through :func:`degrade`. Labels are the verifier's scores of the
    final images against the prompts.

    Args:
        n: batch size.
        seed: seed of the batch (numpy and torch generators are derived from it).
        prompts: prompt pool; ``None`` for the whole grammar (single-group prompts drawn 40% of the time).
        p_degrade: fraction of images degraded.
        mirror: append the horizontally flipped images with :func:`mirror_lr` prompts (same exact labels).
        pair: append every image once more with a hard-negative prompt (:func:`perturb` of its prompt), so the
            batch holds pairs that differ only in one attribute of the text (the verifier detects blobs once).

    Returns:
        ``(images (m, 3, 16, 16), prompts, gold scores (m,))``; ``m = n``, doubled by ``pair`` and by ``mirror``.
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    if prompts is None:
        singles, rels = grammar.single_prompts(), grammar.relational_prompts()
        chosen = [
            singles[rng.integers(len(singles))] if rng.random() < 0.4 else rels[rng.integers(len(rels))]
            for _ in range(n)
        ]
    else:
        chosen = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    pool = grammar.all_prompts()
    kind = rng.choice(6, size=n, p=KIND_P)
    imgs = torch.zeros(n, 3, 16, 16)
    for i, (p, k) in enumerate(zip(chosen, kind)):
        if k == 0:
            imgs[i] = torch.from_numpy(render.render(p, rng))
        elif k == 1:
            imgs[i] = torch.from_numpy(render.render(perturb(p, rng), rng))
        elif k == 2:
            imgs[i] = torch.from_numpy(render.render(pool[rng.integers(len(pool))], rng))
        elif k == 3:
            q = p if rng.random() < 0.6 else perturb(p, rng)
            try:
                imgs[i] = torch.from_numpy(render.render(q, rng, obj_size=int(rng.choice([4, 6]))))
            except RuntimeError:
                imgs[i] = torch.from_numpy(render.render(q, rng))
        elif k == 5:
            imgs[i] = torch.from_numpy(render_jittered(p if rng.random() < 0.7 else perturb(p, rng), rng))
        elif rng.random() < 0.5:
            imgs[i] = torch.rand(3, 16, 16, generator=g) * float(rng.random())
    others = render.render_batch([pool[j] for j in rng.integers(len(pool), size=n)], rng)
    deg = degrade(imgs, g, others)
    mask = torch.from_numpy(rng.random(n) < np.where(kind == 5, p_degrade / 2, p_degrade)).view(n, 1, 1, 1)
    imgs = torch.where(mask, deg, imgs)
    blobs = [verify.detect(im) for im in imgs.numpy()]
    if pair:
        imgs, chosen, blobs = torch.cat([imgs, imgs]), chosen + [perturb(p, rng) for p in chosen], blobs + blobs
    gold = torch.tensor([verify.score_blobs(b, p).score for b, p in zip(blobs, chosen)], dtype=torch.float32)
    if mirror:
        return torch.cat([imgs, imgs.flip(-1)]), chosen + [mirror_lr(p) for p in chosen], torch.cat([gold, gold])
    return imgs, chosen, gold


# ---------------------------------------------------------------------------------------------------------------------
# metrics


def rankdata(x: Tensor | np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank (like ``scipy.stats.rankdata``)."""
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays (``nan`` if either is constant)."""
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).ravel()
    b = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks; ``nan`` if either is constant)."""
    return pearson(rankdata(x), rankdata(y))


@torch.no_grad()
def evaluate_proxy(net: ProxyNet, n: int = 2048, seed: int = 1_000_003, batch: int = 512) -> dict[str, float]:
    """Agreement of the proxy with the gold verifier on a held-out mix of (degraded) renders.

    Args:
        net: the proxy.
        n: number of (image, prompt) pairs.
        seed: seed of the evaluation data (keep it disjoint from the training seeds).
        batch: evaluation batch size.

    Returns:
        ``{"spearman", "pearson", "mae", "gold_mean", "proxy_mean"}``.
    """
    was = net.training
    net.eval()
    golds, preds = [], []
    for k in range(0, n, batch):
        x, prompts, gold = make_batch(min(batch, n - k), seed=seed + k)
        p = net.score(x.to(next(net.parameters()).dtype), prompts).float()
        golds.append(gold)
        preds.append(p)
    net.train(was)
    gold, pred = torch.cat(golds), torch.cat(preds)
    return {
        "spearman": round(spearman(pred, gold), 4),
        "pearson": round(pearson(pred, gold), 4),
        "mae": round(float((pred - gold).abs().mean()), 4),
        "gold_mean": round(float(gold.mean()), 4),
        "proxy_mean": round(float(pred.mean()), 4),
    }


# ---------------------------------------------------------------------------------------------------------------------
# training, saving, loading


def train_proxy(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 1600,
    batch: int = 128,
    lr: float = 2e-3,
    eval_n: int = 2048,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the proxy from scratch on fresh renders and write ``proxy.safetensors`` + ``proxy.json`` to ``out_dir``.

    AdamW (weight decay 1e-4) with 100 warm-up steps and cosine decay, BCE against the gold score, gradient clipping
    at 1. Every step sees a fresh batch: ``batch // 2`` newly rendered, degraded and verified images, each with its
    prompt and with a hard-negative prompt (:func:`make_batch` with ``pair=True``, seeds derived from ``seed`` and the
    step); a background thread prepares the next batch while the current one trains. The defaults take about 4
    minutes on 1–2 CPU cores.

    Args:
        out_dir: output folder (created).
        seed: seed of the initialisation and of the data.
        steps: optimisation steps.
        batch: batch size.
        lr: peak learning rate.
        eval_n: size of the held-out evaluation (:func:`evaluate_proxy`); 0 skips it.
        num_threads: ``torch.set_num_threads`` during training (restored afterwards); ``None`` leaves it.
        progress: show a tqdm progress bar.

    Returns:
        The metrics written to ``proxy.json`` (held-out ``spearman``, ``pearson``, ``mae``, ..., ``train_seconds``,
        ``final_loss``).
    """
    from tqdm import tqdm

    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        t0 = time.time()
        cfg = ProxyConfig()
        with torch.random.fork_rng(devices=[]):  # seeded default initialisation, global RNG state untouched
            torch.manual_seed(seed)
            net = ProxyNet(cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4, betas=(0.9, 0.99))
        warm = min(100, max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
        )
        ema_loss = None
        bar = tqdm(range(steps), desc="shapes proxy", disable=not progress)
        with ThreadPoolExecutor(max_workers=1) as pool:  # renders + verifies the next batch while this one trains

            def data(step: int) -> Future:
                return pool.submit(make_batch, batch // 2, seed * 1_000_003 + 7_919 * step + 17, pair=True)

            nxt = data(0)
            for step in bar:
                x, prompts, gold = nxt.result()
                if step + 1 < steps:
                    nxt = data(step + 1)
                loss = F.binary_cross_entropy_with_logits(net(x, tokenize(prompts)), gold)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{ema_loss:.4f}")
        bar.close()
        train_seconds = time.time() - t0
        metrics: dict[str, Any] = {}
        if eval_n > 0:
            metrics.update(evaluate_proxy(net, n=eval_n))
        metrics["train_seconds"] = round(train_seconds, 1)
        metrics["final_loss"] = round(float(ema_loss), 4) if ema_loss is not None else None
        save_proxy(net, out_dir, {"seed": seed, "steps": steps, "batch": batch, "lr": lr}, metrics)
        return metrics
    finally:
        torch.set_num_threads(old_threads)


def save_proxy(net: ProxyNet, out_dir: str | Path, training: dict | None = None, metrics: dict | None = None) -> Path:
    """Write ``proxy.safetensors`` (fp16) and ``proxy.json`` (architecture, vocabulary, training, metrics).

    Args:
        net: the proxy.
        out_dir: output folder (created).
        training: training settings to record.
        metrics: metrics to record.

    Returns:
        The path of ``proxy.safetensors``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "proxy.safetensors"), metadata={"format": FORMAT})
    (out / "proxy.safetensors").chmod(0o644)
    info = {
        "format": FORMAT,
        "arch": dataclasses.asdict(net.cfg),
        "vocab": vocabulary(),
        "num_params": num_params(net),
        "training": training or {},
        "metrics": metrics or {},
    }
    (out / "proxy.json").write_text(json.dumps(info, indent=2) + "\n")
    return out / "proxy.safetensors"


def load_proxy(path: str | Path | None = None, device: str | torch.device = "cpu") -> ProxyNet:
    """Load a trained proxy (float32, eval mode, parameters frozen).

    Args:
        path: ``proxy.safetensors`` or a folder holding it; the architecture is read from ``proxy.json`` next to it.
            ``None`` for the weights shipped with the package.
        device: where to put the network.

    Returns:
        The :class:`ProxyNet`.

    Raises:
        FileNotFoundError: if the weights or ``proxy.json`` are missing (the message names the file).
        ValueError: if the files do not describe a matching proxy (wrong format, vocabulary or tensors).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = DEFAULT_WEIGHTS if path is None else Path(path)
    if weights.is_dir():
        weights = weights / "proxy.safetensors"
    config = weights.with_suffix(".json")
    hint = " (rebuild it with `fewstep-rl world shapes build`)" if path is None else ""
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"shapes proxy: file {str(f)!r} not found{hint}")
    try:
        info = json.loads(config.read_text())
        if info.get("format") != FORMAT:
            raise KeyError(f"format {info.get('format')!r}, expected {FORMAT!r}")
        arch = dict(info["arch"])
        arch["channels"] = tuple(arch["channels"])
        cfg = ProxyConfig(**arch)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"shapes proxy: {str(config)!r} is not a proxy config ({type(e).__name__}: {e})") from None
    if info.get("vocab") != vocabulary():
        raise ValueError(f"shapes proxy: the vocabulary in {str(config)!r} does not match this version's grammar")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"shapes proxy: cannot read {str(weights)!r} as safetensors ({e})") from None
    net = ProxyNet(cfg)
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(
            f"shapes proxy: weights in {str(weights)!r} do not match the architecture in proxy.json: {e}"
        ) from None
    return net.to(device).eval().requires_grad_(False)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="train the shapes proxy reward")
    ap.add_argument("--out", default=str(ASSETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    print(json.dumps(train_proxy(a.out, a.seed, a.steps, a.batch, num_threads=a.threads), indent=2))
