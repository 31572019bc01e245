"""The ``sd3`` backbone on tiny random SD3 components built in code, saved and loaded back (infra.md appendix A)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fewstep_rl.backbones import tiny  # noqa: E402
from fewstep_rl.backbones.sd3 import BackboneLoadError, SD3Backbone  # noqa: E402
from fewstep_rl.roles import RolesConfig, add_roles  # noqa: E402
from fewstep_rl.sampling import Transition, sample, sigma_grid  # noqa: E402

PROMPTS = ["a red cube", "two blue balls"]
ROLES = dict(trainable=["generator", "fake_score"], snapshots={"ema": "generator"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny StableDiffusion3Pipeline (2 CLIPs, T5, VAE, scheduler shift 3) saved with ``save_pretrained``."""
    from diffusers import StableDiffusion3Pipeline

    d = tmp_path_factory.mktemp("sd3_world")
    StableDiffusion3Pipeline(**tiny.sd3_pipeline_components()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pixel_world(tmp_path_factory):
    """A pixel-space world (one word-level CLIP, no VAE, no T5) written by ``SD3Backbone.save_pretrained``."""
    tok = tiny.word_tokenizer(["a", "red", "blue", "cube", "ball", "two", "balls"])
    enc = tiny.clip_text_encoder(vocab_size=len(tok), hidden=32, layers=3, projection_dim=32, max_positions=16)
    tr = tiny.sd3_transformer(in_channels=3, out_channels=3, sample_size=8, patch_size=2, pooled_projection_dim=32)
    d = tmp_path_factory.mktemp("pixel_world")
    SD3Backbone.from_components(tr, clips=[(tok, enc)]).save_pretrained(d)
    return d


def _noise(bb, n=2, seed=0):
    return torch.randn(n, *bb.sample_shape, generator=torch.Generator().manual_seed(seed))


def _with_roles(path, mode="lora", **kw):
    """A backbone with generator, fake_score and an ema snapshot (rank-4 LoRA or full copies)."""
    kw.setdefault("resolution", 16)  # 256 image tokens instead of 1024: 4x cheaper forwards
    bb = SD3Backbone.from_pretrained(path, roles=RolesConfig(mode=mode, rank=4, alpha=8), **kw)
    add_roles(bb, **ROLES)
    return bb


@torch.no_grad()
def _perturb(bb, role, seed=1, scale=0.05):
    """Random non-zero weights for ``role`` (LoRA A and B, or every copy parameter)."""
    g = torch.Generator().manual_seed(seed)
    for p in bb.role_parameters(role):
        p.add_(scale * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ (a) parity
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_euler_sample_equals_pipeline(world, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    bb = _with_roles(world, resolution=None)
    _perturb(bb, "generator")  # adapters exist and are non-zero: the teacher must still be the plain base
    assert bb.default_shift == 3.0 and bb.sample_shape == (4, 32, 32)
    pipe = StableDiffusion3Pipeline.from_pretrained(world, local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # custom sigmas are used exactly as given
    pipe.set_progress_bar_config(disable=True)
    sig = sigma_grid(4, shift=3.0)
    assert torch.allclose(sig, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    noise = _noise(bb)

    cond = bb.encode_prompts(PROMPTS)
    traj = sample(lambda x, s: bb.velocity(x, s, cond, role="teacher", guidance=guidance), noise, sig,
                  Transition("euler"))
    kw = dict(prompt=PROMPTS, guidance_scale=guidance, sigmas=sig[:-1].tolist(), height=32, width=32)
    latents = pipe(latents=noise.clone(), output_type="latent", **kw).images
    assert torch.equal(pipe.scheduler.timesteps, 1000 * sig[:-1])
    assert torch.equal(pipe.scheduler.sigmas, sig)
    assert (latents - traj.final).abs().max() < 1e-5
    images = pipe(latents=noise.clone(), output_type="pt", **kw).images
    ours = bb.decode(traj.final)
    assert ours.shape == images.shape == (2, 3, 32, 32)
    assert (images - ours).abs().max() < 1e-5


def test_prompt_encoding_matches_pipeline_and_caches(world):
    from diffusers import StableDiffusion3Pipeline

    bb = SD3Backbone.from_pretrained(world)
    pipe = StableDiffusion3Pipeline.from_pretrained(world, local_files_only=True)
    with torch.no_grad():  # (as in the pipeline's __call__; grad mode picks other attention kernels)
        seq, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    cond, null = bb.encode_prompts(PROMPTS), bb.null_cond(2)
    assert cond["seq"].shape == (2, 77 + 256, 32) and cond["pooled"].shape == (2, 64)
    for a, b in ((cond["seq"], seq), (cond["pooled"], pooled), (null["seq"], neg), (null["pooled"], neg_pooled)):
        assert (a - b).abs().max() < 1e-6
    again = bb.encode_prompts([PROMPTS[1], PROMPTS[0], PROMPTS[1]])  # served from the cache
    assert torch.equal(again["seq"][1], cond["seq"][0]) and torch.equal(again["seq"][2], cond["seq"][1])
    assert set(bb._cache) == set(PROMPTS)
    assert torch.equal(bb.encode_prompts([""])["seq"][0], null["seq"][1])


def test_save_pretrained_fp16_round_trip(world, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    bb = _with_roles(world)
    bb.save_pretrained(tmp_path, dtype=torch.float16)
    assert json.loads((tmp_path / "model_index.json").read_text())["transformer"] == ["diffusers",
                                                                                     "SD3Transformer2DModel"]
    back = SD3Backbone.from_pretrained(tmp_path)
    assert back.default_shift == 3.0 and not back.roles
    ref = SD3Backbone.from_pretrained(world)
    for a, b in ((back.transformer, ref.transformer), (back.vae, ref.vae), (back.t5_encoder, ref.t5_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == torch.float32
            assert torch.equal(sa[k], sb[k].half().float()), k
    assert bb.transformer.dtype == torch.float32  # saving did not cast the live model
    StableDiffusion3Pipeline.from_pretrained(tmp_path, local_files_only=True)  # a valid pipeline directory


# ------------------------------------------------------------------------------------------------ (b) roles
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_roles_start_equal_to_teacher_and_train_separately(world, mode):
    state = torch.get_rng_state()
    bb = _with_roles(world, mode)
    assert torch.equal(torch.get_rng_state(), state), "adding roles must not touch the global RNG"
    x, sigma, cond = _noise(bb), torch.tensor([0.9, 0.4]), bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        teacher = bb.velocity(x, sigma, cond, role="teacher")
        for role in ("generator", "fake_score", "ema", "reference", None):
            assert torch.equal(bb.velocity(x, sigma, cond, role=role), teacher), role
        assert torch.equal(bb.velocity(x, sigma, cond, role="ema", guidance=3.0),
                           bb.velocity(x, sigma, cond, role="teacher", guidance=3.0))
    _perturb(bb, "generator")
    with torch.no_grad():
        assert not torch.allclose(bb.velocity(x, sigma, cond, role="generator"), teacher)
        assert torch.equal(bb.velocity(x, sigma, cond, role="fake_score"), teacher)
        assert torch.equal(bb.velocity(x, sigma, cond, role="ema"), teacher)
        assert torch.equal(bb.velocity(x, sigma, cond, role="teacher"), teacher)

    role_ids = {r: {id(p) for p in bb.role_parameters(r)} for r in bb.roles}
    base = [p for n, p in bb.named_parameters() if not any(id(p) in ids for ids in role_ids.values())]
    assert base and role_ids["generator"] and not role_ids["generator"] & role_ids["fake_score"]

    def check_flags():
        assert all(p.requires_grad for r in ("generator", "fake_score") for p in bb.role_parameters(r))
        assert not any(p.requires_grad for p in bb.role_parameters("ema"))
        assert not any(p.requires_grad for p in base)

    check_flags()
    for role in ("ema", "fake_score", None, "generator", "teacher"):
        bb.velocity(x, sigma, cond, role=role)
        check_flags()
    # Two roles in one graph (switching between the forwards): each loss reaches exactly its own role.
    loss = bb.velocity(x, sigma, cond, role="generator", guidance=2.0).square().mean()
    (loss + 0 * bb.velocity(x, sigma, cond, role="ema").sum()).backward()
    gen = bb.role_parameters("generator")
    # (in the tiny one-block model add_q_proj only feeds the discarded context stream: zero, not missing, grads)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in gen)
    assert mode == "full" or all(p.grad is not None for p in gen)
    others = [p for r in ("fake_score", "ema") for p in bb.role_parameters(r)] + base
    assert all(p.grad is None for p in others)


# ------------------------------------------------------------------------------------------------ (c) merge/reset
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_merge_reset_and_state_dict_round_trip(world, mode):
    bb = _with_roles(world, mode)
    _perturb(bb, "generator")
    _perturb(bb, "fake_score", seed=2)
    x, sigma, cond = _noise(bb), torch.tensor([0.8, 0.3]), bb.encode_prompts(PROMPTS)
    with torch.no_grad():
        old_gen = bb.velocity(x, sigma, cond, role="generator")
        old_teacher = bb.velocity(x, sigma, cond, role="teacher")
        bb.merge_role("generator")
        teacher = bb.velocity(x, sigma, cond, role="teacher")
        assert (teacher - old_gen).abs().max() < 1e-5 and not torch.allclose(teacher, old_teacher)
        assert torch.equal(bb.velocity(x, sigma, cond, role="generator"), teacher)  # reset to the new base
        fake = bb.velocity(x, sigma, cond, role="fake_score")
        assert not torch.allclose(fake, teacher)
    assert int(bb.store.base_merges) == 1

    kept = {k: v for k, v in bb.state_dict().items() if bb.is_role_key(k)}
    for k in kept:
        if mode == "lora":
            assert ".lora_A." in k or ".lora_B." in k or k.startswith("store.merged.") or k == "store.base_merges", k
        else:
            assert k.startswith(("store.copies.", "transformer.")) or k == "store.base_merges", k  # base kept once merged
    assert not any(k.startswith(("clip_encoders.", "t5_encoder.", "vae.")) for k in kept)
    if mode == "lora":
        assert not any("base_layer" in k for k in kept) and any(k.startswith("store.merged.0.") for k in kept)

    fresh = _with_roles(world, mode)
    fresh.load_state_dict(kept, strict=False)
    with torch.no_grad():
        for role in ("teacher", "generator", "fake_score", "ema"):
            assert torch.equal(fresh.velocity(x, sigma, cond, role=role), bb.velocity(x, sigma, cond, role=role))
    assert int(fresh.store.base_merges) == 1
    full = _with_roles(world, mode)
    full.load_state_dict(bb.state_dict())  # strict, base weights included: the (merged) base in the file wins
    with torch.no_grad():
        assert torch.equal(full.velocity(x, sigma, cond, role="teacher"), teacher)
    if mode == "lora":
        bare = SD3Backbone.from_pretrained(world, resolution=16)  # no roles yet: records replay onto plain layers
        bare.load_state_dict({k: v for k, v in kept.items() if not k.startswith("transformer.")}, strict=False)
        with torch.no_grad():
            assert torch.equal(bare.velocity(x, sigma, cond, role="teacher"), teacher)
        assert len(fresh.store.merged) == 1
        fresh.load_state_dict(kept, strict=False)  # reloading the same records applies nothing twice
        with torch.no_grad():
            assert torch.equal(fresh.velocity(x, sigma, cond, role="teacher"), teacher)

    bb.reset_role("fake_score")
    with torch.no_grad():
        assert torch.equal(bb.velocity(x, sigma, cond, role="fake_score"), teacher)
    fresh.reset_role("fake_score")
    for a, b in zip(bb.role_parameters("fake_score"), fresh.role_parameters("fake_score")):
        assert torch.equal(a, b)  # resets are deterministic (seeded by role and reset count)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fold_role_gives_chosen_roles_a_private_base(world, mode):
    """fold_role: the folded roles keep their function on a fresh adapter; teacher and other roles are untouched."""
    bb = _with_roles(world, mode)
    _perturb(bb, "generator")
    _perturb(bb, "fake_score", seed=2)
    _perturb(bb, "ema", seed=3)
    x, sigma, cond = _noise(bb), torch.tensor([0.8, 0.3]), bb.encode_prompts(PROMPTS)
    roles = ("teacher", "generator", "fake_score", "ema")
    with torch.no_grad():
        before = {r: bb.velocity(x, sigma, cond, role=r) for r in roles}
        bb.fold_role("generator", into=["ema"])  # generator and ema both become the old generator
        bb.fold_role("fake_score")
        after = {r: bb.velocity(x, sigma, cond, role=r) for r in roles}
    assert torch.equal(after["teacher"], before["teacher"])  # the shared base is not touched
    assert (after["generator"] - before["generator"]).abs().max() < 1e-5
    assert (after["ema"] - before["generator"]).abs().max() < 1e-5 and not torch.allclose(after["ema"], before["ema"])
    assert (after["fake_score"] - before["fake_score"]).abs().max() < 1e-5
    assert int(bb.store.base_merges) == 0
    if mode == "lora":
        assert bb.folds == ["fold0__generator__ema", "fold1__fake_score"]
        assert bb.folds_of("ema") == ["fold0__generator__ema"] and bb.folds_of("teacher") == []
        for r in ("generator", "ema", "fake_score"):  # fresh zero-output adapters on top
            assert all(float(p.abs().sum()) == 0 for n, p in zip(range(10**6), bb.role_parameters(r)) if n % 2)
        fold_params = [p for n, p in bb.transformer.named_parameters() if ".fold0__" in n]
        assert fold_params and not any(p.requires_grad for p in fold_params)
        assert not {id(p) for p in fold_params} & {id(p) for r in bb.roles for p in bb.role_parameters(r)}
        # the fresh adapter trains: a gradient reaches it, none reaches the fold
        bb.velocity(x, sigma, cond, role="generator").square().mean().backward()
        assert all(p.grad is None for p in fold_params)
        assert any(p.grad is not None for p in bb.role_parameters("generator"))
        bb.zero_grad(set_to_none=True)
        with pytest.raises(ValueError, match="sits on folds"):
            bb.fold_role("generator", into=["fake_score"])
        with pytest.raises(ValueError, match="sits on folds"):
            bb.merge_role("generator")
    _perturb(bb, "generator", seed=4)
    kept = {k: v for k, v in bb.state_dict().items() if bb.is_role_key(k)}
    fresh = _with_roles(world, mode)  # a resumed run: folds come back from the checkpoint alone
    fresh.load_state_dict(kept, strict=False)
    assert fresh.folds == bb.folds
    with torch.no_grad():
        for role in roles:
            assert torch.equal(fresh.velocity(x, sigma, cond, role=role), bb.velocity(x, sigma, cond, role=role))
    assert all(not p.requires_grad for n, p in fresh.transformer.named_parameters() if ".fold" in n)
    assert all(p.requires_grad for p in fresh.role_parameters("generator"))


def test_checkpoint_keys_before_any_merge(world):
    bb = _with_roles(world)
    keys = [k for k in bb.state_dict() if bb.is_role_key(k)]
    n = sum(p.numel() for r in bb.roles for p in bb.role_parameters(r))
    assert n == sum(bb.state_dict()[k].numel() for k in keys if k != "store.base_merges")
    assert all(".lora_" in k for k in keys if k != "store.base_merges")
    assert len(bb.role_parameters("generator")) == len(bb.role_parameters("ema")) > 0
    units = list(bb.fsdp_units())  # every module with parameters is a unit: the root is never called directly
    assert units[: len(bb.transformer.transformer_blocks)] == list(bb.transformer.transformer_blocks)
    assert {id(m) for m in units} >= {id(bb.transformer), id(bb.vae), id(bb.t5_encoder), *map(id, bb.clip_encoders)}
    covered = {id(p) for u in units for p in u.parameters()}
    assert all(id(p) in covered for p in bb.parameters())


# ------------------------------------------------------------------------------------------------ (d) load errors
def _broken_copy(world, tmp_path):
    d = tmp_path / "world"
    shutil.copytree(world, d)
    return d


def test_missing_transformer_is_one_clear_error(world, tmp_path):
    d = _broken_copy(world, tmp_path)
    shutil.rmtree(d / "transformer")
    with pytest.raises(BackboneLoadError, match=r"required folder .*transformer is missing"):
        SD3Backbone.from_pretrained(d)


@pytest.mark.parametrize("change", [{"attention_head_dim": 16}, {"num_layers": 0}, {"in_channels": 8}])
def test_transformer_config_not_fitting_weights(world, tmp_path, change):
    d = _broken_copy(world, tmp_path)
    cfg = d / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
    with pytest.raises(BackboneLoadError) as err:
        SD3Backbone.from_pretrained(d)
    msg = str(err.value)
    assert str(cfg) in msg and "diffusion_pytorch_model.safetensors" in msg, msg


def test_missing_tokenizer_and_mismatched_components(world, tmp_path):
    d = _broken_copy(world, tmp_path)
    shutil.rmtree(d / "tokenizer_2")
    with pytest.raises(BackboneLoadError, match=r"text_encoder_2 exists but .*tokenizer_2 is missing"):
        SD3Backbone.from_pretrained(d)
    shutil.rmtree(d / "tokenizer")
    with pytest.raises(BackboneLoadError, match=r"required folder .*tokenizer is missing"):
        SD3Backbone.from_pretrained(d)
    shutil.rmtree(d)
    d = _broken_copy(world, tmp_path)
    os.remove(d / "text_encoder" / "model.safetensors")
    with pytest.raises(BackboneLoadError, match=r"no weights file in .*text_encoder"):
        SD3Backbone.from_pretrained(d)
    shutil.rmtree(d)
    d = _broken_copy(world, tmp_path)
    shutil.rmtree(d / "vae")  # a latent transformer without a VAE
    with pytest.raises(BackboneLoadError, match="pixel space needs transformer in_channels=3"):
        SD3Backbone.from_pretrained(d)
    with pytest.raises(BackboneLoadError, match="does not exist"):
        SD3Backbone.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ (e) pixel space
def test_pixel_space_world(pixel_world):
    assert not (pixel_world / "vae").exists() and not (pixel_world / "text_encoder_3").exists()
    bb = _with_roles(pixel_world, resolution=None)
    assert bb.sample_shape == (3, 8, 8) and bb.vae is None and bb.default_shift == 1.0
    cond = bb.encode_prompts(["a red cube", "two blue balls", "a red cube"])
    assert cond["seq"].shape == (3, 16, 32) and cond["pooled"].shape == (3, 32)
    x = 3 * _noise(bb, 3)
    img = bb.decode(x)
    assert img.shape == (3, 3, 8, 8) and img.min() >= 0 and img.max() <= 1 and img.min() == 0 and img.max() == 1
    inside = torch.rand(3, 3, 8, 8)
    assert torch.allclose(bb.decode(bb.encode(inside)), inside, atol=1e-6)

    sigma = torch.full((3,), 0.7)
    with torch.no_grad():
        v_c = bb.velocity(x, sigma, cond, role="teacher")
        v_u = bb.velocity(x, sigma, bb.null_cond(3), role="teacher")
        v_g = bb.velocity(x, sigma, cond, role="teacher", guidance=4.0)
    assert not torch.allclose(v_c, v_u)
    assert torch.allclose(v_g, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    traj = sample(lambda x, s: bb.velocity(x, s, cond, role="generator", guidance=4.0), _noise(bb, 3),
                  sigma_grid(2), Transition("euler"), grad="last")
    bb.decode(traj.final).mean().backward()
    assert all(p.grad is not None for p in bb.role_parameters("generator"))
    assert all(p.grad is None for p in bb.role_parameters("fake_score"))
