"""fewstep-rl plan: counted weights/optimiser state against a real (tiny) backbone, activations from counted grad
passes, the largest-batch arithmetic, and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep_rl.plan import GiB, PlanResult, lora_params, make_plan, saved_bytes_per_sample


def test_lora_params_hand_count():
    m = torch.nn.Module()
    m.to_q = torch.nn.Linear(4, 6)
    m.other = torch.nn.Linear(5, 5)
    m.block = torch.nn.Module()
    m.block.to_q = torch.nn.Linear(3, 2)
    assert lora_params(m, ["to_q"], rank=2) == 2 * (4 + 6) + 2 * (3 + 2)


def test_max_batch_arithmetic():
    p = PlanResult("m", "tiny", "lora", "bf16", 1, "auto", [("weights", 10.0), ("activations", 6.0)], 2, 1, 6.0,
                   10.0, {}, False)
    assert p.total_gb == 16.0
    assert p.max_batch(40.0) == 10    # (40 − 10) / (6 / 2)
    assert p.max_batch(9.0) == 0      # the weights alone do not fit
    assert "largest batch_size that fits 40 GiB: 10" in p.format(40.0)


def test_plan_static_parts_equal_the_real_backbone():
    """Weights, LoRA roles and AdamW state of the plan = the bytes of the tiny backbone the method really builds."""
    from fewstep_rl.perf.arch import ARCHS, build_sd3_backbone
    from fewstep_rl.roles import add_roles
    from fewstep_rl.run import resolve

    p = make_plan("dmd2", "tiny", "lora", "fp32", resolution=64, precomputed_text=True, prompt_cache=3)
    lines = dict(p.lines)
    rc = resolve("dmd2", "sd3", (), {"world.path": ".", "world.prompts": __file__}).roles
    bb = build_sd3_backbone(ARCHS["tiny"], ["a", "b"], device="cpu", dtype=torch.float32, resolution=64, roles=rc)
    cls = resolve("dmd2", "sd3", (), {"world.path": ".", "world.prompts": __file__}).method_cls
    add_roles(bb, cls.trainable_roles, cls.snapshot_roles)
    base = sum(q.numel() * 4 for n, q in bb.transformer.named_parameters() if ".lora_" not in n)
    assert math.isclose(lines[next(k for k in lines if k.startswith("base transformer"))], base / GiB)
    gen = sum(q.numel() * 4 for q in bb.role_parameters("generator"))
    assert math.isclose(lines["role generator: LoRA adapter weights"], gen / GiB)
    assert math.isclose(lines["role generator: AdamW moments (2)"], 2 * gen / GiB)
    assert math.isclose(lines["role ema: LoRA adapter weights (snapshot)"], gen / GiB)
    seq_row = ARCHS["tiny"].text_tokens * ARCHS["tiny"].transformer["joint_attention_dim"]
    assert math.isclose(lines["prompt-embedding cache (3 prompts)"],
                        3 * (seq_row + ARCHS["tiny"].transformer["pooled_projection_dim"]) * 4 / GiB)
    assert p.activations_gb > 0 and p.passes["backward_groups"] > 0


def test_fsdp2_shards_weights_not_activations():
    one = make_plan("refl", "tiny", "full", "fp32", resolution=64, precomputed_text=True)
    four = make_plan("refl", "tiny", "full", "fp32", devices=4, strategy="fsdp2", resolution=64,
                     precomputed_text=True)
    a, b = dict(one.lines), dict(four.lines)
    assert math.isclose(b["role generator: full copy weights"], a["role generator: full copy weights"] / 4)
    key = next(k for k in a if k.startswith("activations"))
    assert math.isclose(a[key], b[key])
    assert "one gathered transformer block (fsdp2)" in b


def test_saved_bytes_lora_between_frozen_and_full():
    """A LoRA role keeps the adapted layers' inputs, a full copy every linear input: input-grad ≤ lora ≤ full."""
    from fewstep_rl.backbones.sd3 import DEFAULT_LORA_TARGETS
    from fewstep_rl.perf.arch import ARCHS, build_backbone
    from fewstep_rl.roles import RolesConfig
    from fewstep_rl.roles.lora import add_lora_adapter

    bb = build_backbone(ARCHS["tiny"], ["a"], device="meta", dtype=torch.float32, resolution=64,
                        roles=RolesConfig(mode="full")).to("meta")
    full = saved_bytes_per_sample(bb, torch.float32, "full")[0]
    frozen = saved_bytes_per_sample(bb, torch.float32, "input")[0]
    add_lora_adapter(bb.transformer, "bench", 4, 8, list(DEFAULT_LORA_TARGETS))
    lora = saved_bytes_per_sample(bb, torch.float32, "lora")[0]
    assert 0 < frozen < lora < full


def test_plan_cli(capsys):
    from fewstep_rl.cli import main

    assert main(["plan", "--method", "dmd2", "--world", "sd3", "--arch", "tiny", "--resolution", "64",
                 "--memory", "1"]) == 0
    out = capsys.readouterr().out
    assert "role fake_score: AdamW moments (2)" in out and "largest batch_size that fits 1 GiB" in out


@pytest.mark.parametrize("argv,msg", [
    (["--world", "toy2d"], "--world must be one with real-size architectures"),
    (["--world", "sd3", "--arch", "flux.1-dev"], "belongs to --world flux, not sd3"),
    (["--arch", "sd9"], "unknown --arch 'sd9'"),
    (["--roles", "half"], "invalid choice: 'half'"),
    (["--devices", "1", "--strategy", "fsdp2"], "fsdp2 needs --devices >= 2"),
])
def test_plan_cli_bad_input(capsys, argv, msg):
    from fewstep_rl.cli import main

    assert main(["plan", "--method", "dmd2", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_role_lines_hand_count():
    """1 GiB of parameters at 2 bytes over 2 devices: 1 GiB of weights, 1 of gradients, 2 of AdamW moments; a
    snapshot role holds its weights only."""
    from fewstep_rl.plan import role_lines

    assert role_lines("generator", 2**30, "LoRA adapter", True, 2, 2) == [
        ("role generator: LoRA adapter weights", 1.0), ("role generator: gradients", 1.0),
        ("role generator: AdamW moments (2)", 2.0)]
    assert role_lines("ema", 2**30, "full copy", False, 4, 1) == [("role ema: full copy weights (snapshot)", 4.0)]
