"""``geneval``: GenEval's rules on hand-made detections (hand-checked partial credit), the relation test against the
shapes verifier's, the shapes world as the exact-detector case, and a tiny random OWL-ViT loaded from a directory."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from fewstep_rl import registry
from fewstep_rl.rewards.geneval import (
    Detection,
    GenEvalConfig,
    GenEvalReward,
    box_color,
    check_metadata,
    evaluate,
    relative_position,
)

POS = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                      {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]}]}


def test_rules_hand_checked():
    dog = Detection("dog", 0.9, (60, 10, 80, 30), "brown")
    cat_left = Detection("cat", 0.8, (10, 10, 30, 30), "red")
    score, strict, _ = evaluate([dog, cat_left], POS)
    assert (score, strict) == (1.0, True)  # dog count, cat count, cat colour, cat position: 4 terms of 1
    cat_right = Detection("cat", 0.8, (100, 10, 120, 30), "red")
    assert evaluate([dog, cat_right], POS)[:2] == (0.75, False)  # position fails
    blue_cat = Detection("cat", 0.8, (10, 10, 30, 30), "blue")
    assert evaluate([dog, blue_cat], POS)[:2] == (0.75, False)  # colour fails (1 of 4 terms)
    assert evaluate([cat_left], POS)[:2] == (0.5, False)  # no dog: dog count 0, position 0 (no reference)
    count = {"tag": "counting", "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}]}
    apples = [Detection("apple", 0.95, (i * 10, 0, i * 10 + 8, 8)) for i in range(5)]
    assert evaluate(apples[:3], count)[:2] == (1.0, True)
    s2, st2, _ = evaluate(apples[:2], count)
    assert s2 == pytest.approx((2 / 3 + 1) / 2) and not st2  # count credit 1 − 1/3, exclude holds
    s5, _, _ = evaluate(apples, count)
    assert s5 == pytest.approx((1 / 3 + 0) / 2)  # 5 of 3: 1 − 2/3; exclude (≥ 4 found) fails
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        check_metadata({"tag": "x"})
    with pytest.raises(ValueError, match="'position' must be"):
        check_metadata({"include": [{"class": "a", "count": 1, "position": ["near", 0]}]})


def test_relative_position_matches_the_shapes_verifier():
    from fewstep_rl.worlds.shapes.verify import Blob, relations_between

    rng = np.random.default_rng(0)
    for _ in range(300):
        y0, x0 = rng.integers(0, 40, 2)
        y1, x1 = y0 + rng.integers(1, 12), x0 + rng.integers(1, 12)
        v0, u0 = rng.integers(0, 40, 2)
        v1, u1 = v0 + rng.integers(1, 12), u0 + rng.integers(1, 12)
        a, b = Blob("red", "circle", (y0, x0, y1, x1), 1, 1.0), Blob("blue", "square", (v0, u0, v1, u1), 1, 1.0)
        assert relative_position((x0, y0, x1, y1), (u0, v0, u1, v1)) == relations_between(a, b)


def test_shapes_world_is_the_exact_detector_case():
    """Exact detections from the shapes verifier (class = "colour shape"), scored by GenEval's rules with GenEval
    metadata, are strictly correct on rendered prompts, agree with the verifier's own strict flag, and fail when the
    image shows another prompt."""
    from fewstep_rl.worlds.shapes.grammar import parse, relational_prompts, single_prompts
    from fewstep_rl.worlds.shapes.render import render
    from fewstep_rl.worlds.shapes.verify import detect, verify

    def metadata(prompt):
        spec = parse(prompt)
        inc = [{"class": f"{o.color} {o.shape}", "count": o.count, "color": o.color} for o in spec.objects]
        if spec.relation is not None:
            inc[spec.relation.subject]["position"] = [spec.relation.relation, spec.relation.reference]
        return {"include": inc}

    def detections(img):
        return [Detection(f"{b.color} {b.shape}", 1.0, (b.bbox[1], b.bbox[0], b.bbox[3], b.bbox[2]), b.color)
                for b in detect(img)]

    rng = np.random.default_rng(0)
    prompts = single_prompts()[::7][:10] + relational_prompts()[::11][:10]
    for p in prompts:
        img = render(p, rng, size=32)
        score, strict, _ = evaluate(detections(img), metadata(p))
        assert strict and score == 1.0, p
        assert verify(img, p).strict
    for a, b in zip(prompts, prompts[1:] + prompts[:1]):  # an image of another prompt
        img = render(a, rng, size=32)
        score, strict, _ = evaluate(detections(img), metadata(b))
        assert not strict and score < 1.0 and strict == verify(img, b).strict, (a, b)


def test_box_color_names():
    img = torch.zeros(3, 20, 20)
    img[0, 5:15, 5:15] = 0.9  # a red square on black
    assert box_color(img, (5, 5, 15, 15)) == "red" and box_color(img, (0, 0, 4, 4)) == "black"


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import OwlViTConfig, OwlViTForObjectDetection

    from fewstep_rl.backbones import tiny

    torch.manual_seed(0)
    tok = tiny.clip_byte_tokenizer(max_length=16)
    cfg = OwlViTConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,  # OWL-ViT needs vision hidden size == projection dim
    )
    d = tmp_path_factory.mktemp("owl")
    OwlViTForObjectDetection(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_owlvit_detector_round_trip(owl_dir):
    r = registry.load("rewards", "geneval")(GenEvalConfig(path=str(owl_dir), threshold=0.0, counting_threshold=0.0))
    assert isinstance(r, GenEvalReward) and r.kind == "owlvit"
    x = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    meta = [POS, {"tag": "counting", "include": [{"class": "apple", "count": 2}]}]
    s = r(x, ["a red cat left of a dog", "two apples"], meta)
    assert s.shape == (2,) and ((s >= 0) & (s <= 1)).all()
    dets = r.detect(x, [["cat", "dog"], ["apple"]], [0.0, 0.0])
    assert len(dets[1]) == 16 and {d.label for d in dets[1]} == {"apple"}  # 16 boxes ≥ 0, capped at max_objects
    for d in dets[0]:
        assert d.label in ("cat", "dog") and 0 <= d.score <= 1 and d.color is not None
    torch.testing.assert_close(s, torch.tensor([evaluate(d, m)[0] for d, m in zip(dets, meta)]))
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        r(x[:1], ["a cat"], [{}])
    high = GenEvalReward(GenEvalConfig(path=str(owl_dir), threshold=1.01, counting_threshold=1.01))
    assert high(x, ["", ""], meta).tolist() == [0.0, 0.0]  # nothing detected: every term fails


def test_unsupported_detector(tmp_path):
    pytest.importorskip("transformers")
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        GenEvalReward(GenEvalConfig(path=str(tmp_path)))
