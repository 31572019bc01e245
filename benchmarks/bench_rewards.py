"""Load time and ms/image of every reward at 512 px, each in a fresh subprocess.

    python benchmarks/bench_rewards.py [--rewards jpeg,ocr,...] [--size 512] [--threads 1] [--reps 2]

Model rewards with no weights on this machine (HPS, ImageReward, aesthetic, CLIP score, PickScore) are measured
with **random weights of the real architecture**, written in the real checkpoint layout first (not timed), then
loaded through the production loader (timed: "load s"). OCR rewards use their real shipped weights. Per reward:
``load s`` (constructor), ``no-grad ms/img`` (``torch.no_grad`` call, batch 1, median of ``reps`` after a warm-up),
``fwd+bwd ms/img`` (differentiable rewards: score + backward to the pixels), peak RSS. Images are 512×512 random
noise with a rendered text line for the OCR rewards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALL = ["jpeg", "ocr", "ocr_det", "ocr_ctc", "hpsv2", "imagereward", "aesthetic", "clip_score", "pickscore", "remote"]


def _clip_config(kind: str):
    from transformers import CLIPConfig

    if kind == "H":  # open_clip ViT-H-14 / PickScore_v1
        v = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                 image_size=224, hidden_act="gelu")
        t = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", eos_token_id=49407)
        return CLIPConfig(text_config=t, vision_config=v, projection_dim=1024)
    v = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
             image_size=224, hidden_act="quick_gelu")  # OpenAI ViT-L/14
    t = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
             max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407)
    return CLIPConfig(text_config=t, vision_config=v, projection_dim=768)


def _tokenizer_dir(d: Path) -> Path:
    from fewstep_rl.rewards.hps import openclip_bpe_file, write_clip_tokenizer_files

    bpe = openclip_bpe_file()
    if bpe is None:
        raise SystemExit("the benchmark writes CLIP tokenizer files from open_clip_torch's BPE table: install it")
    write_clip_tokenizer_files(bpe, d)
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>").save_pretrained(d)
    return d


def prepare(name: str, d: Path) -> tuple[str, dict]:
    """Write the files a reward loads; return (registry name, config)."""
    import torch

    if name in ("jpeg", "ocr", "ocr_ctc"):
        return name, {}
    if name == "ocr_det":
        return "ocr", {"detect": True}
    if name == "remote":
        return "remote", {}
    if name == "hpsv2":
        from transformers import CLIPModel

        from fewstep_rl.rewards.hps import hf_clip_to_openclip

        sd = hf_clip_to_openclip(CLIPModel(_clip_config("H")).state_dict())
        torch.save({"state_dict": {"module." + k: v.half() for k, v in sd.items()}}, d / "HPS_v2.1_compressed.pt")
        return "hpsv2", {"path": str(d / "HPS_v2.1_compressed.pt"), "tokenizer_path": str(_tokenizer_dir(d / "tok"))}
    if name == "imagereward":
        from transformers import BlipTextConfig, BlipVisionConfig

        from fewstep_rl.rewards.imagereward import ImageRewardModel, to_imagereward_state_dict

        med = dict(vocab_size=30524, hidden_size=768, encoder_width=1024, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu")
        vcfg = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=224, patch_size=16, layer_norm_eps=1e-6)
        tcfg = BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512)
        torch.save(to_imagereward_state_dict(ImageRewardModel(vcfg, tcfg).state_dict()), d / "ImageReward.pt")
        (d / "med_config.json").write_text(json.dumps(med))
        words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        words += [f"w{i}" for i in range(30522 - len(words) - 8)] + ["a", "photo", "of", "cat", "red", "cube", "on", "grass"]
        (d / "vocab.txt").write_text("\n".join(words) + "\n")
        return "imagereward", {"path": str(d)}
    if name in ("aesthetic", "clip_score", "pickscore"):
        from transformers import CLIPModel

        kind = "H" if name == "pickscore" else "L"
        CLIPModel(_clip_config(kind)).save_pretrained(d / "clip")
        _tokenizer_dir(d / "clip")
        if name != "aesthetic":
            return name, {"path": str(d / "clip")}
        from fewstep_rl.rewards.imagereward import reward_head

        torch.save({"layers." + k: v for k, v in reward_head(768).state_dict().items()}, d / "head.pth")
        return "aesthetic", {"path": str(d / "clip"), "head_path": str(d / "head.pth")}
    raise SystemExit(f"unknown reward {name!r}; choose from {', '.join(ALL)}")


def child(name: str, size: int, reps: int, threads: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    torch.set_num_threads(threads)
    from fewstep_rl import registry
    from fewstep_rl.config import build

    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        reg, cfg = prepare(name, Path(tmp))
        server = None
        if reg == "remote":
            from fewstep_rl.rewards import MultiReward
            from fewstep_rl.rewards.jpeg import JpegCompressibility
            from fewstep_rl.serve.server import RewardServer

            server = RewardServer(MultiReward([JpegCompressibility()])).start()
            cfg = {"url": server.url}
        cls = registry.load("rewards", reg)
        t0 = time.perf_counter()
        reward = cls(build(cls.Config, cfg, "reward"))
        load = time.perf_counter() - t0
        img = Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype(np.uint8))
        if name.startswith("ocr"):
            img = Image.new("RGB", (size, size), "white")
            ImageDraw.Draw(img).text((20, size // 2 - 20), "Open Sesame 42", fill="black",
                                     font=ImageFont.load_default(size=max(12, size // 12)))
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
        prompts = ['a photo of a cat on grass, sign "Open Sesame 42"']

        def timed(fn) -> float:
            fn()  # warm-up
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return 1000 * statistics.median(ts)

        with torch.no_grad():
            nograd = timed(lambda: reward(x, prompts))
        fwdbwd = None
        if reward.differentiable:
            def step():
                xx = x.clone().requires_grad_(True)
                reward(xx, prompts).sum().backward()
                assert xx.grad is not None and torch.isfinite(xx.grad).all()

            fwdbwd = timed(step)
        if server is not None:
            server.stop()
    return {"reward": name, "differentiable": bool(reward.differentiable), "load_s": load, "nograd_ms": nograd,
            "fwdbwd_ms": fwdbwd, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rewards", default=",".join(ALL))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.size, a.reps, a.threads)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    print(f"| reward | differentiable | load s | no-grad ms/img | fwd+bwd ms/img | peak RSS GB |  ({a.size}² px, "
          f"batch 1, {a.threads} thread)")
    print("|---|---|---|---|---|---|")
    for name in a.rewards.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", name, "--size", str(a.size), "--reps", str(a.reps),
                            "--threads", str(a.threads)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(f"| {name} | FAILED: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode} |||||",
                  flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        fb = f"{r['fwdbwd_ms']:.0f}" if r["fwdbwd_ms"] is not None else "n/a"
        print(f"| {name} | {'yes' if r['differentiable'] else 'no'} | {r['load_s']:.2f} | {r['nograd_ms']:.0f} | {fb} | "
              f"{r['peak_rss_gb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
