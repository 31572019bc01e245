"""benchmarks/scale.py and fewstep-rl plan for the FLUX.1, FLUX.2-klein, Z-Image and Qwen-Image families: the real
configs' sizes (meta device), one benchmark iteration at tiny width on the CPU, and plan numbers that equal the bytes
of the backbone the method really builds."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLDS = ("flux", "flux2", "zimage", "qwen_image")


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale_families", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale_families"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch,lo,hi,text_lo,text_hi", [
    ("flux.1-dev", 11.8e9, 12.0e9, 4.8e9, 5.0e9),          # "12B"; CLIP-L text + T5-XXL encoder
    ("flux.2-klein-4b", 3.8e9, 4.0e9, 4.0e9, 4.1e9),       # "4B"; Qwen3-4B
    ("z-image-turbo", 6.1e9, 6.2e9, 4.0e9, 4.1e9),         # "6B"; Qwen3-4B
    ("qwen-image", 20.4e9, 20.5e9, 8.2e9, 8.4e9),          # "20B"; Qwen2.5-VL-7B (8.29 B with its vision tower)
])
def test_real_configs_have_the_announced_sizes(arch, lo, hi, text_lo, text_hi):
    from fewstep_rl.perf.arch import ARCHS, text_encoder_params, transformer_params

    a = ARCHS[arch]
    assert lo < transformer_params(a.transformer, a.world) < hi
    assert text_lo < text_encoder_params(a) < text_hi


def test_arch_world_mismatch_is_one_line(capsys):
    from fewstep_rl.cli import main

    assert main(["plan", "--method", "dmd2", "--world", "flux", "--arch", "qwen-image"]) == 2
    err = capsys.readouterr().err.strip()
    assert "belongs to --world qwen_image" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("world", WORLDS)
def test_bench_row_and_plan_at_tiny_width(scale, world):
    """One timed iteration of dmd2 through the real world code; the plan's weights, VAE and role lines equal the
    parameter bytes of the tiny backbone built from the config (fp32)."""
    from fewstep_rl.perf.arch import ARCHS, TINY, build_backbone
    from fewstep_rl.plan import GiB, make_plan
    from fewstep_rl.roles import add_roles
    from fewstep_rl.run import resolve

    a = scale.parse(["--device", "cpu", "--world", world, "--max-batch", "1", "--max-group", "2", "--warmup", "0",
                     "--iters", "1", "--peak-tflops", "1"])
    assert a.arch == TINY[world] and a.resolution == 64
    r = scale.bench_row("dmd2", a)
    assert r["iters"] == 1 and r["world"] == world and r["passes_per_iter"] > 0 and r["flop_error"] is None
    total = sum(k["count"] * k["tflop"] for k in r["pass_kinds"].values())
    assert total > 0 and math.isclose(total, r["tflop_per_iter"], rel_tol=1e-9)
    assert any(k.endswith("|grad") for k in r["pass_kinds"])

    p = make_plan("dmd2", TINY[world], "lora", "fp32", resolution=64, precomputed_text=True, prompt_cache=3)
    lines = dict(p.lines)
    rc = resolve("dmd2", world, (), {"world.path": ".", "world.prompts": __file__}).roles
    bb = build_backbone(ARCHS[TINY[world]], ["a"], device="cpu", dtype=torch.float32, resolution=64, roles=rc)
    add_roles(bb, ["generator", "fake_score"], {"ema": "generator"})
    base = sum(q.numel() * 4 for n, q in bb.transformer.named_parameters() if ".lora_" not in n)
    assert math.isclose(lines[next(k for k in lines if k.startswith("base transformer"))], base / GiB)
    vae = sum(q.numel() * 4 for q in bb.vae.parameters())
    assert math.isclose(lines[next(k for k in lines if k.startswith("VAE"))], vae / GiB)
    gen = sum(q.numel() * 4 for q in bb.role_parameters("generator"))
    assert gen > 0 and math.isclose(lines["role generator: LoRA adapter weights"], gen / GiB)
    assert math.isclose(lines["role fake_score: AdamW moments (2)"], 2 * gen / GiB)
    # the benchmark's measured role bytes are the plan's (same rank from the same resolved config)
    assert math.isclose(r["roles_gb"]["generator"], gen / GiB, rel_tol=1e-9)
    assert p.activations_gb > 0 and p.passes["backward_groups"] > 0
    assert not any(k.startswith("text encoders") for k in lines)  # --precomputed-text
