"""Train an embedded world's teacher: a tiny SD3 MMDiT + a tiny CLIP text encoder, in pixel space (shared recipe).

Used by the ``shapes`` and ``glyphs`` worlds; each supplies a :class:`TeacherRecipe` (image size, model sizes, its
tokenizer, its procedural renderer, its prompt split and its gold judge). The recipe (issue 3's measured pilot for
``shapes``): RGB images in [-1, 1] (``x0 = 2·img − 1``), an ``SD3Transformer2DModel`` with patch 2; a small CLIP
text encoder trained jointly (its penultimate layer is the SD3 sequence embedding, its projection the pooled
embedding — ``backbones/sd3_text.py``); rectified-flow matching ``‖v(x_σ, σ, c) − (ε − x0)‖²`` with σ drawn
logit-normal(0, 1); ``p_uncond`` (10%) of prompts replaced by ``""`` (classifier-free guidance); AdamW with a
200-step warm-up; an EMA of the weights (decay 0.999) is what ships. Training data are fresh procedural renders of
the training prompts (held-out prompts are never shown).

The loop is resumable (``train_state.pt`` every ``ckpt_every`` steps) and logs to ``train_log.csv``; periodic
evaluation samples the EMA teacher with Euler + CFG and scores the world's gold judge on training and held-out
prompts (``eval.jsonl``). :func:`export` writes the diffusers-format directory the ``sd3`` backbone loads (fp16).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.backbones import tiny
from fewstep_rl.backbones.sd3_text import clip_embeds


@dataclass(frozen=True)
class TeacherRecipe:
    """What a world supplies to train its pixel-space teacher.

    Attributes:
        name: progress-bar label (``"shapes teacher"``).
        height, width: image size in pixels.
        transformer: ``SD3Transformer2DModel`` keyword arguments (``in_channels = out_channels = 3``, patch 2).
        text: :func:`fewstep_rl.backbones.tiny.clip_text_encoder` keyword arguments (without ``vocab_size``/``seed``).
        max_tokens: prompt length in tokens (BOS and EOS included).
        tokenizer: builds the (untrained) tokenizer.
        render: ``(prompts, seed) -> (B, 3, H, W)`` ground-truth images in [0, 1].
        split: ``() -> (training prompts, held-out prompts)``.
        judge: ``(images, prompts) -> (mean score, mean strict)``, the world's gold judge.
        guidance: CFG scale of periodic evaluation and of the exported ``teacher.json``.
        eval_steps: Euler step counts evaluated.
        meta: extra keys written to ``teacher.json``.
    """

    name: str
    height: int
    width: int
    transformer: dict
    text: dict
    max_tokens: int
    tokenizer: Callable[[], Any]
    render: Callable[[list[str], int], Tensor]
    split: Callable[[], tuple[list[str], list[str]]]
    judge: Callable[[Tensor, list[str]], tuple[float, float]]
    guidance: float = 4.0
    eval_steps: tuple[int, ...] = (25, 4)
    meta: dict = field(default_factory=dict)


def build_models(recipe: TeacherRecipe, seed: int = 0) -> tuple[Any, Any, Any]:
    """(tokenizer, text encoder, transformer), freshly initialised."""
    tok = recipe.tokenizer()
    enc = tiny.clip_text_encoder(vocab_size=len(tok), seed=seed, **recipe.text)
    tr = tiny.sd3_transformer(seed=seed + 1, **recipe.transformer)
    return tok, enc, tr


def velocity(recipe: TeacherRecipe, tr: Any, enc: Any, tok: Any, x: Tensor, sigma: Tensor, prompts: list[str]) -> Tensor:
    """The teacher's velocity ``v(x, σ, prompt)`` (the SD3 timestep is ``1000·σ``)."""
    seq, pooled = clip_embeds(tok, enc, prompts, recipe.max_tokens)
    return tr(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=seq, pooled_projections=pooled,
              return_dict=False)[0]


@torch.no_grad()
def sample_teacher(
    recipe: TeacherRecipe, tr: Any, enc: Any, tok: Any, prompts: Sequence[str], steps: int, guidance: float, seed: int,
) -> Tensor:
    """Euler samples (images in [0, 1]) on the uniform σ grid, with CFG against the empty prompt."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    x = torch.randn(n, 3, recipe.height, recipe.width, generator=g)
    sig = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        s = sig[i].expand(n)
        both = velocity(recipe, tr, enc, tok, torch.cat([x, x]), torch.cat([s, s]), list(prompts) + [""] * n)
        vc, vu = both.chunk(2)
        x = x + (sig[i + 1] - sig[i]) * (vu + guidance * (vc - vu))
    return ((x + 1) / 2).clamp(0, 1)


def train_teacher(
    recipe: TeacherRecipe, out_dir: str | Path, seed: int = 0, steps: int = 10000, batch: int = 64, lr: float = 1e-3,
    ema_decay: float = 0.999, p_uncond: float = 0.1, eval_every: int = 1000, eval_n: int = 192, ckpt_every: int = 250,
    max_minutes: float | None = None, progress: bool = True,
) -> dict[str, float]:
    """Train (or resume) the teacher in ``out_dir``; returns the last evaluation."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held = recipe.split()
    tok, enc, tr = build_models(recipe, seed)
    _, ema_enc, ema_tr = build_models(recipe, seed)
    params = list(tr.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    state_file = out / "train_state.pt"
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        tr.load_state_dict(st["tr"]), enc.load_state_dict(st["enc"]), opt.load_state_dict(st["opt"])
        ema_tr.load_state_dict(st["ema_tr"]), ema_enc.load_state_dict(st["ema_enc"])
        step = st["step"]
    else:
        ema_tr.load_state_dict(tr.state_dict()), ema_enc.load_state_dict(enc.state_dict())
    tr.train(), enc.train(), ema_tr.eval(), ema_enc.eval()
    ema_params = list(ema_tr.parameters()) + list(ema_enc.parameters())
    log = open(out / "train_log.csv", "a", newline="")
    writer = csv.writer(log)
    t0 = time.time()
    last: dict[str, float] = {}
    bar = tqdm(total=steps, initial=step, desc=recipe.name, disable=not progress)
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(train_prompts), (batch,), generator=g).tolist()
        prompts = [train_prompts[i] for i in idx]
        x0 = recipe.render(prompts, seed * 7_919 + step) * 2 - 1
        drop = torch.rand(batch, generator=g) < p_uncond
        cond_prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        sigma = torch.sigmoid(torch.randn(batch, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        s4 = sigma.view(-1, 1, 1, 1)
        x = (1 - s4) * x0 + s4 * eps
        v = velocity(recipe, tr, enc, tok, x, sigma, cond_prompts)
        loss = ((v - (eps - x0)) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 200)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - d)
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            writer.writerow([step, f"{loss.item():.5f}", f"{time.time() - t0:.1f}"])
            log.flush()
        done = max_minutes is not None and (time.time() - t0) / 60 > max_minutes
        if step % ckpt_every == 0 or step == steps or done:
            torch.save({"tr": tr.state_dict(), "enc": enc.state_dict(), "opt": opt.state_dict(),
                        "ema_tr": ema_tr.state_dict(), "ema_enc": ema_enc.state_dict(), "step": step},
                       state_file)
        if step % eval_every == 0 or step == steps or done:
            last = evaluate(recipe, ema_tr, ema_enc, tok, train_prompts, held, eval_n)
            last["step"] = step
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.write(json.dumps(last))
        if done:
            break
    bar.close()
    log.close()
    return last


def evaluate(
    recipe: TeacherRecipe, tr: Any, enc: Any, tok: Any, train: list[str], held: list[str], n: int,
    guidance: float | None = None,
) -> dict[str, float]:
    """Gold and strict scores of the teacher at each of ``recipe.eval_steps`` Euler steps (CFG ``guidance``).

    ``n`` training prompts (drawn with seed 12345) and ``n // 2`` held-out prompts (cycled)."""
    was = tr.training
    tr.eval(), enc.eval()
    g = torch.Generator().manual_seed(12345)
    pt = [train[i] for i in torch.randint(len(train), (n,), generator=g).tolist()]
    ph = [held[i % len(held)] for i in range(n // 2)]
    res: dict[str, float] = {}
    for name, prompts in (("train", pt), ("heldout", ph)):
        for steps in recipe.eval_steps:
            imgs = sample_teacher(recipe, tr, enc, tok, prompts, steps,
                                  recipe.guidance if guidance is None else guidance, seed=1)
            res[f"{name}_gold@{steps}"], res[f"{name}_strict@{steps}"] = recipe.judge(imgs, prompts)
    tr.train(was), enc.train(was)
    return {k: round(v, 4) for k, v in res.items()}


def export(recipe: TeacherRecipe, out_dir: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the EMA teacher as a diffusers-format directory (transformer/, text_encoder/, tokenizer/, teacher.json)."""
    st = torch.load(Path(out_dir) / "train_state.pt", weights_only=False)
    tok, enc, tr = build_models(recipe, 0)
    tr.load_state_dict(st["ema_tr"]), enc.load_state_dict(st["ema_enc"])
    target = Path(target)
    tr.to(dtype).save_pretrained(target / "transformer")
    enc.to(dtype).save_pretrained(target / "text_encoder")
    tok.save_pretrained(target / "tokenizer")
    info = {"step": st["step"], **recipe.meta, "pixel_space": True, "guidance": recipe.guidance, "shift": 1.0}
    (target / "teacher.json").write_text(json.dumps(info, indent=2))
