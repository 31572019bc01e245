"""Native HPSv2/HPSv2.1, ImageReward and LAION-aesthetic scorers: tiny random models of the real classes, saved in
the real checkpoint layouts, loaded back through the production loaders, checked against a direct forward, with
gradients reaching the pixels. Parity against the reference packages (open_clip_torch, hpsv2, image-reward, OpenAI
clip) on the same random weights needs torchvision, hence its own interpreter: tests/test_reward_parity.py, run by
`make reward-parity`."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from fewstep_rl import registry  # noqa: E402
from fewstep_rl.backbones import tiny  # noqa: E402
from fewstep_rl.rewards.aesthetic import Aesthetic, AestheticConfig  # noqa: E402
from fewstep_rl.rewards.clip import clip_preprocess  # noqa: E402
from fewstep_rl.rewards.hps import HPSConfig, HPSv2, HPSv21, hf_clip_to_openclip, openclip_to_hf_clip  # noqa: E402
from fewstep_rl.rewards.imagereward import (  # noqa: E402
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageReward,
    ImageRewardConfig,
    blip_tokenizer,
    to_imagereward_state_dict,
)

PROMPTS = ["a red cube", "two blue balls"]


def _images(seed=0, h=40, w=48):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- HPS (open_clip layout)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = tiny.clip_byte_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=1, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("hps")
    tok.save_pretrained(d / "tok")
    sd = {"module." + k: v.half() for k, v in hf_clip_to_openclip(model.state_dict()).items()}  # HPS: fp16 + DDP prefix
    torch.save({"state_dict": sd, "epoch": 3, "name": "tiny"}, d / "HPS_v2_compressed.pt")
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})  # the same fp16 rounding
    return d, model, tok


def test_hps_round_trip_matches_direct_forward_and_has_gradients(hps_files):
    d, model, tok = hps_files
    cfg = HPSConfig(path=str(d / "HPS_v2_compressed.pt"), tokenizer_path=str(d / "tok"), vision_heads=2, text_heads=2)
    r = registry.load("rewards", "hpsv2")(cfg)
    assert isinstance(r, HPSv2) and registry.load("rewards", "hpsv21") is HPSv21
    x = _images().requires_grad_(True)
    s = r(x, PROMPTS)
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(pixel_values=clip_preprocess(x.detach(), 32), input_ids=ids)
        ref = (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1)
    torch.testing.assert_close(s.detach(), ref, rtol=1e-5, atol=1e-5)
    assert (s.abs() <= 1).all()  # a cosine, no logit scale
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert HPSv21(cfg)(x.detach(), PROMPTS).allclose(s.detach())


def test_hps_bad_files(tmp_path, hps_files):
    d, _, _ = hps_files
    with pytest.raises(ValueError, match="no checkpoint file"):
        HPSv2(HPSConfig(path=str(tmp_path / "none.pt"), tokenizer_path=str(d / "tok")))
    torch.save({"state_dict": {"module.foo": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an open_clip CLIP state dict"):
        HPSv2(HPSConfig(path=str(tmp_path / "bad.pt"), tokenizer_path=str(d / "tok")))
    with pytest.raises(ValueError, match="'path'"):
        HPSv2(HPSConfig())
    with pytest.raises(ValueError, match="heads|divisible"):
        HPSv2(HPSConfig(path=str(d / "HPS_v2_compressed.pt"), tokenizer_path=str(d / "tok"), vision_heads=3))


def test_openclip_map_rejects_unknown_towers():
    with pytest.raises(KeyError, match="unexpected open_clip key"):
        openclip_to_hf_clip({"visual.trunk.blocks.0.weight": torch.zeros(1)})


# ---------------------------------------------------------------- ImageReward (BLIP layout)

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cube", "two", "blue", "balls", "cat", "##s"]


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    from transformers import BlipTextConfig, BlipVisionConfig

    from fewstep_rl.rewards.imagereward import ImageRewardModel

    d = tmp_path_factory.mktemp("imagereward")
    (d / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    med = dict(vocab_size=len(BERT_WORDS) + 2, hidden_size=32, encoder_width=24, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40, layer_norm_eps=1e-12,
               hidden_act="gelu", add_cross_attention=True, architectures=["BertModel"])
    (d / "med_config.json").write_text(json.dumps(med))
    torch.manual_seed(0)
    vcfg = BlipVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, layer_norm_eps=1e-6)
    tcfg = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=24, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=40)
    model = ImageRewardModel(vcfg, tcfg).eval()
    for m in model.mlp:  # the package's own head init (std 1/769) outputs ≈ 0 for everything (rewards.md §2)
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    sd = to_imagereward_state_dict(model.state_dict())
    sd["blip.vision_proj.weight"] = torch.zeros(4, 24)  # in the real file, unused by the score
    torch.save(sd, d / "ImageReward.pt")
    return d, model


def test_imagereward_round_trip_matches_direct_forward_and_has_gradients(ir_dir):
    d, model = ir_dir
    r = registry.load("rewards", "imagereward")(ImageRewardConfig(path=str(d), vision_heads=2))
    x = _images(1).requires_grad_(True)
    s = r(x, PROMPTS)
    tok = blip_tokenizer(d / "vocab.txt")
    assert tok.convert_tokens_to_ids("[DEC]") == len(BERT_WORDS) and tok.convert_tokens_to_ids("[ENC]") == len(BERT_WORDS) + 1
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"][0, :5].tolist() == [2, 5, 6, 7, 3]  # [CLS] a red cube [SEP]
    with torch.no_grad():
        ref = model(clip_preprocess(x.detach(), 32), t["input_ids"], t["attention_mask"])
        raw = model.mlp(model.text(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                   encoder_hidden_states=model.vision(pixel_values=clip_preprocess(x.detach(), 32))
                                   .last_hidden_state, is_decoder=False).last_hidden_state[:, 0]).squeeze(-1)
    torch.testing.assert_close(s.detach(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, rtol=1e-5, atol=1e-5)
    assert s[0] != s[1]
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_imagereward_missing_pieces(ir_dir, tmp_path):
    d, _ = ir_dir
    with pytest.raises(ValueError, match="no checkpoint"):
        ImageReward(ImageRewardConfig(path=str(tmp_path)))
    sd = torch.load(d / "ImageReward.pt", weights_only=True)
    sd.pop("mlp.layers.7.bias")
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="no med_config.json"):
        ImageReward(ImageRewardConfig(path=str(tmp_path / "ImageReward.pt")))
    with pytest.raises(ValueError, match=r"missing \['mlp.7.bias'\]"):
        ImageReward(ImageRewardConfig(path=str(tmp_path / "ImageReward.pt"), med_config=str(d / "med_config.json"),
                                      tokenizer_path=str(d), vision_heads=2))


# ---------------------------------------------------------------- LAION aesthetic


@pytest.fixture(scope="module")
def aesthetic_files(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from fewstep_rl.rewards.imagereward import reward_head

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=24,
    )
    d = tmp_path_factory.mktemp("aesthetic")
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(d / "clip")
    head = reward_head(24)
    for m in head:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.3)
    torch.save({"layers." + k: v for k, v in head.state_dict().items()}, d / "sac+logos+ava1-l14-linearMSE.pth")
    return d, clip, head.eval()


def test_aesthetic_round_trip_and_gradients(aesthetic_files):
    d, clip, head = aesthetic_files
    r = registry.load("rewards", "aesthetic")(
        AestheticConfig(path=str(d / "clip"), head_path=str(d / "sac+logos+ava1-l14-linearMSE.pth")))
    x = _images(2).requires_grad_(True)
    s = r(x, ["ignored", "also ignored"])
    with torch.no_grad():
        e = clip.get_image_features(pixel_values=clip_preprocess(x.detach(), 32))
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        ref = head(F.normalize(e, dim=-1)).squeeze(-1)
    torch.testing.assert_close(s.detach(), ref, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_aesthetic_bad_head(aesthetic_files, tmp_path):
    d, _, _ = aesthetic_files
    torch.save({"layers.0.weight": torch.zeros(1024, 768), "layers.0.bias": torch.zeros(1024)}, tmp_path / "h.pth")
    with pytest.raises(ValueError, match="does not fit the aesthetic MLP"):
        Aesthetic(AestheticConfig(path=str(d / "clip"), head_path=str(tmp_path / "h.pth")))
    with pytest.raises(ValueError, match="'head_path'"):
        Aesthetic(AestheticConfig(path=str(d / "clip")))
