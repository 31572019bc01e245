"""CLIP-family rewards (``pickscore``, ``clip_score``) on a tiny random ``CLIPModel`` saved and loaded back."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

pytest.importorskip("transformers")

from fewstep_rl import registry  # noqa: E402
from fewstep_rl.backbones import tiny  # noqa: E402
from fewstep_rl.rewards.clip import ClipRewardConfig, ClipScore, PickScore, clip_preprocess  # noqa: E402

PROMPTS = ["a red cube", "two blue balls", "a cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tok = tiny.clip_byte_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    d = tmp_path_factory.mktemp("pickscore")
    CLIPModel(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_pickscore_equals_clip_logits_and_is_differentiable(clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    r = registry.load("rewards", "pickscore")(ClipRewardConfig(path=str(clip_dir)))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 48, 40, generator=g, requires_grad=True)
    s = r(x, PROMPTS)
    assert s.shape == (3,) and torch.isfinite(s).all()
    # reference: the model's own forward on the same preprocessed pixels and tokens (diagonal of logits_per_image)
    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = model(pixel_values=clip_preprocess(x.detach(), 32), **t).logits_per_image.diagonal()
    torch.testing.assert_close(s.detach(), ref, rtol=1e-4, atol=1e-4)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())


def test_clip_score_is_the_plain_cosine(clip_dir):
    p = PickScore(ClipRewardConfig(path=str(clip_dir)))
    c = ClipScore(ClipRewardConfig(path=str(clip_dir)))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    cos = c(x, PROMPTS)
    assert (cos.abs() <= 1 + 1e-5).all()
    torch.testing.assert_close(p(x, PROMPTS), cos * p.model.logit_scale.exp().item(), rtol=1e-5, atol=1e-5)


def test_preprocess_resizes_short_side_and_centre_crops():
    x = torch.zeros(1, 3, 20, 40)
    x[..., :, 10:30] = 1.0  # a bright centre band: the centre crop keeps only it
    y = clip_preprocess(x, 10)
    assert y.shape == (1, 3, 10, 10)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(y[0, :, 5, 5], white, rtol=1e-3, atol=1e-3)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="local CLIPModel directory"):
        PickScore(ClipRewardConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="cannot load a CLIPModel"):
        PickScore(ClipRewardConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="expect images"):
        clip_preprocess(torch.zeros(2, 32, 32), 16)
