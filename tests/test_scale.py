"""benchmarks/scale.py at tiny width on the CPU: the real method code path over an in-memory SD3 backbone with
precomputed embeddings, counted passes and FLOPs, and the batch scaling of presets."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scale():
    return _scale()


def test_sd35_medium_config_is_the_real_one():
    from fewstep_rl.perf.arch import ARCHS, transformer_params

    cfg = ARCHS["sd3.5-medium"].transformer
    assert (cfg["num_layers"], cfg["num_attention_heads"], cfg["attention_head_dim"]) == (24, 24, 64)
    assert cfg["dual_attention_layers"] == tuple(range(13)) and cfg["qk_norm"] == "rms_norm"
    assert (cfg["joint_attention_dim"], cfg["pooled_projection_dim"], cfg["pos_embed_max_size"]) == (4096, 2048, 384)
    # Stability AI announces SD3.5-Medium as a 2.5 B-parameter MMDiT; the transformer alone holds ~2.24 B
    assert 2.2e9 < transformer_params(cfg) < 2.5e9


def test_text_embedder_rows_are_fixed_per_prompt():
    from fewstep_rl.perf.arch import RandomTextEmbedder

    e = RandomTextEmbedder(["a", "b"], tokens=5, dim=3, pooled=4, dtype=torch.float32)
    s1, p1 = e(["a", "b", "a", ""])
    assert s1.shape == (4, 5, 3) and p1.shape == (4, 4)
    assert torch.equal(s1[0], s1[2]) and not torch.equal(s1[0], s1[1]) and not torch.equal(s1[0], s1[3])
    s2, _ = RandomTextEmbedder(["a", "b"], tokens=5, dim=3, pooled=4, dtype=torch.float32)(["a"])
    assert torch.equal(s1[0], s2[0])  # seeded: the same table in another process


def test_scaled_overrides_keep_divisibility(scale):
    from fewstep_rl.run import resolve

    over = {"world.path": ".", "world.prompts": __file__}
    rt = resolve("rtdmd", "sd3", (), over).method          # 6 × 24 in 16 micro-batches of 9
    o = scale.scaled_overrides(rt, "rtdmd", 2, 4)
    assert (o["method.batch_size"], o["method.group_size"]) == (2, 4)
    assert o["method.micro_batches"] == 1                   # 8 samples / micro size 9 → one micro-batch
    o = scale.scaled_overrides(rt, "rtdmd", 6, 24)          # uncapped: the preset's own values
    assert o["method.micro_batches"] == 16
    tr = resolve("tdm_r1", "sd3", (), over).method          # 12 prompts in 12 micro-batches
    assert scale.scaled_overrides(tr, "tdm_r1", 4, 4)["method.micro_batches"] == 4
    cr = resolve("crd", "sd3", (), over).method             # opt_steps_per_epoch 2 must divide batch_size
    o = scale.scaled_overrides(cr, "crd", 1, 4)
    assert o["method.opt_steps_per_epoch"] == 1 and o["method.forward_batch"] == 4


@pytest.mark.parametrize("row,roles", [("dmd2", "lora"), ("refl", "full")])
def test_bench_row_counts_passes_and_flops(scale, row, roles):
    a = scale.parse(["--device", "cpu", "--roles", roles, "--max-batch", "2", "--max-group", "2", "--iters", "2",
                     "--peak-tflops", "1"])
    assert a.arch == "tiny" and a.precision == "32-true"
    r = scale.bench_row(row, a)
    assert r["iters"] == 2 and r["s_per_iter"] > 0 and r["passes_per_iter"] > 0
    # FLOPs per iteration = Σ count × per-pass FLOPs of the recorded kinds
    total = sum(k["count"] * k["tflop"] for k in r["pass_kinds"].values())
    assert math.isclose(total, r["tflop_per_iter"], rel_tol=1e-9)
    assert math.isclose(r["mfu"], r["tflops"] / 1.0, rel_tol=1e-9)
    assert math.isclose(r["images_per_s"], r["batch"] * r["group"] / r["s_per_iter"], rel_tol=1e-9)
    grads = [k for k in r["pass_kinds"] if k.endswith("|grad")]
    assert grads, r["pass_kinds"]
    # a grad pass costs more than a forward of the same shape (forward + backward)
    for key in grads:
        twin = key[: -len("|grad")] + "|nograd"
        if twin in r["pass_kinds"]:
            assert r["pass_kinds"][key]["tflop"] > 1.5 * r["pass_kinds"][twin]["tflop"]
    if roles == "full":  # each role a full copy: role bytes = base bytes
        assert all(math.isclose(v, r["base_gb"], rel_tol=1e-6) for v in r["roles_gb"].values())
    else:  # r·(in + out) per adapted linear, fp32
        from fewstep_rl.backbones.sd3 import DEFAULT_LORA_TARGETS
        from fewstep_rl.perf.arch import ARCHS, build_transformer
        from fewstep_rl.plan import lora_params

        t = build_transformer(ARCHS["tiny"], "meta", torch.float32)
        rank = 64  # configs/dmd2/sd3.yaml
        want = lora_params(t, list(DEFAULT_LORA_TARGETS), rank) * 4 / 2**30
        assert all(math.isclose(v, want, rel_tol=1e-9) for v in r["roles_gb"].values())
    assert r["opt_state_gb"] > 0


def test_table_marks_failures(scale):
    t = scale.fmt_table([{"row": "x", "roles": "lora", "error": "boom"}])
    assert "failed: boom" in t


def test_job_order_puts_full_copies_next_to_their_lora_row(scale):
    a = scale.parse(["--device", "cpu", "--methods", "rtdmd,refl,crd", "--full-methods", "refl,dmd2"])
    assert scale.job_list(a) == [("rtdmd", "lora"), ("refl", "lora"), ("refl", "full"), ("crd", "lora"),
                                 ("dmd2", "full")]


def test_saved_bytes_counts_one_backward_group(scale):
    """exp saves its output (1000 fp32 = 4000 bytes); the parameter w saved by mul is excluded."""
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.ones(1000))
    sb = scale.SavedBytes()
    orig = torch.Tensor.backward
    sb.enter(m)
    try:
        x = torch.zeros(1000, requires_grad=True)
        (x.exp() * m.w).sum().backward()   # mul saves exp's output (shared storage) and w (excluded)
        assert sb.peak == 4000
        y = torch.zeros(10, requires_grad=True)
        y.exp().sum().backward()            # a smaller later group does not lower the peak
        assert sb.peak == 4000
    finally:
        sb.exit()
    assert torch.Tensor.backward is orig  # restored
