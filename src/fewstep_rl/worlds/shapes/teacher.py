"""Train the ``shapes`` world's teacher: a tiny SD3 MMDiT + a tiny CLIP text encoder, in pixel space.

Recipe (issue 3's measured pilot): 16×16 RGB images in [-1, 1] (``x0 = 2·img − 1``), an ``SD3Transformer2DModel``
with 6 joint blocks, 4 heads × 32 (width 128), patch 2 (64 tokens); a 3-layer, 128-wide CLIP text encoder over a
word-level tokenizer, trained jointly (its penultimate layer is the SD3 sequence embedding, its projection the
pooled embedding — ``backbones/sd3_text.py``); rectified-flow matching ``‖v(x_σ, σ, c) − (ε − x0)‖²`` with σ drawn
logit-normal(0, 1); 10% of prompts replaced by ``""`` (classifier-free guidance); AdamW lr 1e-3 with warm-up; an
EMA of the weights (decay 0.999) is what ships. Training data are fresh procedural renders of the training
prompts (the held-out relational prompts of :func:`grammar.split_prompts` are never shown).

The loop is resumable (``train_state.pt`` every ``ckpt_every`` steps) and logs to ``train_log.csv``; periodic
evaluation samples the EMA teacher with Euler + CFG and scores the gold verifier on training and held-out prompts.
:func:`export` writes the diffusers-format directory the ``sd3`` backbone loads (fp16 safetensors).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.backbones import tiny
from fewstep_rl.backbones.sd3_text import clip_embeds
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


def build_models(seed: int = 0) -> tuple[Any, Any, Any]:
    """(tokenizer, text encoder, transformer), freshly initialised."""
    tok = tiny.word_tokenizer(vocabulary(), max_length=MAX_TOKENS)
    enc = tiny.clip_text_encoder(vocab_size=len(tok), seed=seed, **TEXT_CFG)
    tr = tiny.sd3_transformer(seed=seed + 1, **TEACHER_CFG)
    return tok, enc, tr


def velocity(tr: Any, enc: Any, tok: Any, x: Tensor, sigma: Tensor, prompts: list[str]) -> Tensor:
    seq, pooled = clip_embeds(tok, enc, prompts, MAX_TOKENS)
    return tr(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=seq, pooled_projections=pooled,
              return_dict=False)[0]


@torch.no_grad()
def sample_teacher(tr: Any, enc: Any, tok: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> Tensor:
    """Euler samples (images in [0, 1]) with CFG against the empty prompt."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompts)
    x = torch.randn(n, 3, 16, 16, generator=g)
    sig = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        s = sig[i].expand(n)
        both = velocity(tr, enc, tok, torch.cat([x, x]), torch.cat([s, s]), list(prompts) + [""] * n)
        vc, vu = both.chunk(2)
        x = x + (sig[i + 1] - sig[i]) * (vu + guidance * (vc - vu))
    return ((x + 1) / 2).clamp(0, 1)


def gold(images: Tensor, prompts: list[str]) -> tuple[float, float]:
    scores, strict, _ = verify.score_batch(images, prompts)
    return float(scores.mean()), float(strict.float().mean())


def train_teacher(
    out_dir: str | Path, seed: int = 0, steps: int = 10000, batch: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
    p_uncond: float = 0.1, eval_every: int = 1000, eval_n: int = 192, ckpt_every: int = 250,
    max_minutes: float | None = None, progress: bool = True,
) -> dict[str, float]:
    """Train (or resume) the teacher in ``out_dir``; returns the last evaluation."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, held = grammar.split_prompts(seed=0)
    tok, enc, tr = build_models(seed)
    _, ema_enc, ema_tr = build_models(seed)
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
    bar = tqdm(total=steps, initial=step, desc="shapes teacher", disable=not progress)
    while step < steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(train_prompts), (batch,), generator=g).tolist()
        prompts = [train_prompts[i] for i in idx]
        x0 = render.render_batch(prompts, seed=seed * 7_919 + step) * 2 - 1
        drop = torch.rand(batch, generator=g) < p_uncond
        cond_prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        sigma = torch.sigmoid(torch.randn(batch, generator=g))
        eps = torch.randn(x0.shape, generator=g)
        s4 = sigma.view(-1, 1, 1, 1)
        x = (1 - s4) * x0 + s4 * eps
        v = velocity(tr, enc, tok, x, sigma, cond_prompts)
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
            last = evaluate(ema_tr, ema_enc, tok, train_prompts, held, eval_n, seed)
            last["step"] = step
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
            bar.write(json.dumps(last))
        if done:
            break
    bar.close()
    log.close()
    return last


def evaluate(tr: Any, enc: Any, tok: Any, train: list[str], held: list[str], n: int, seed: int) -> dict[str, float]:
    """Gold (partial credit) and strict accuracy of the teacher at 25 steps CFG 4 and at 4 steps."""
    was = tr.training
    tr.eval(), enc.eval()
    g = torch.Generator().manual_seed(12345)
    pt = [train[i] for i in torch.randint(len(train), (n,), generator=g).tolist()]
    ph = [held[i % len(held)] for i in range(n // 2)]
    res: dict[str, float] = {}
    for name, prompts in (("train", pt), ("heldout", ph)):
        for steps in (25, 4):
            imgs = sample_teacher(tr, enc, tok, prompts, steps, 4.0, seed=1)
            res[f"{name}_gold@{steps}"], res[f"{name}_strict@{steps}"] = gold(imgs, prompts)
    tr.train(was), enc.train(was)
    return {k: round(v, 4) for k, v in res.items()}


def export(out_dir: str | Path, target: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write the EMA teacher as a diffusers-format directory (transformer/, text_encoder/, tokenizer/)."""
    st = torch.load(Path(out_dir) / "train_state.pt", weights_only=False)
    tok, enc, tr = build_models(0)
    tr.load_state_dict(st["ema_tr"]), enc.load_state_dict(st["ema_enc"])
    target = Path(target)
    tr.to(dtype).save_pretrained(target / "transformer")
    enc.to(dtype).save_pretrained(target / "text_encoder")
    tok.save_pretrained(target / "tokenizer")
    (target / "teacher.json").write_text(json.dumps({"step": st["step"], "size": 16, "pixel_space": True,
                                                     "guidance": 4.0, "shift": 1.0}, indent=2))


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

