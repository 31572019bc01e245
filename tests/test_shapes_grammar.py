"""The model-free part of the ``shapes`` world: grammar, renderer and gold verifier (hand-computed scores)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewstep_rl.worlds.shapes import grammar, render, verify
from fewstep_rl.worlds.shapes.grammar import ObjectSpec, PromptSpec, Relation
from fewstep_rl.worlds.shapes.render import Placed

ALL = grammar.all_prompts()


# --------------------------------------------------------------------------------------------------------- grammar


def test_grammar_size_and_round_trip():
    assert len(ALL) == len(set(ALL)) == 36 + 12 * 11 * 4
    assert len(grammar.COLORS) >= 4 and set(grammar.SHAPES) == {"circle", "square", "triangle"}
    for p in ALL:
        spec = grammar.parse(p)
        assert grammar.format_prompt(spec) == p == grammar.format(spec)
        assert PromptSpec(spec.objects, spec.relation) == spec
    assert grammar.parse("two red circles") == PromptSpec((ObjectSpec(2, "red", "circle"),))
    spec = grammar.parse("a blue square left of a green triangle")
    assert spec.objects == (ObjectSpec(1, "blue", "square"), ObjectSpec(1, "green", "triangle"))
    assert spec.relation == Relation(0, "left of", 1)


def test_parse_aliases_normalise():
    assert grammar.parse("  One RED circle. ") == grammar.parse("a red circle")
    assert grammar.parse("a red circle to the left of a blue square") == grammar.parse(
        "a red circle left of a blue square"
    )


@pytest.mark.parametrize(
    ("junk", "needle"),
    [
        ("", "empty"),
        ("a purple circle", "purple"),
        ("a red hexagon", "hexagon"),
        ("four red circles", "four"),
        ("two red circle", "circles"),
        ("a red circles", "circle"),
        ("red circle", "<number> <colour> <shape>"),
        ("a red circle next to a blue square", "<number> <colour> <shape>"),
        ("two red circles left of a blue square", "single objects"),
        ("a red circle left of a red circle", "differ"),
        ("a red circle left of a blue square above a green square", "more than one relation"),
    ],
)
def test_parse_rejects_junk(junk, needle):
    with pytest.raises(ValueError, match=needle):
        grammar.parse(junk)


def test_spec_validation():
    with pytest.raises(ValueError, match="relation"):
        PromptSpec((ObjectSpec(1, "red", "circle"), ObjectSpec(1, "blue", "square")))
    with pytest.raises(ValueError, match="count"):
        PromptSpec((ObjectSpec(4, "red", "circle"),))


def test_split_deterministic_disjoint_and_mirror_closed():
    train, held = grammar.split_prompts(seed=0)
    assert (train, held) == grammar.split_prompts(seed=0)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(ALL)
    rel = grammar.relational_prompts()
    assert set(held) <= set(rel) and set(grammar.single_prompts()) <= set(train)
    assert abs(len(held) / len(rel) - 0.1) < 0.01
    assert all(grammar.mirror(p) in held for p in held)  # a held-out scene is held out in both wordings
    assert grammar.split_prompts(seed=1)[1] != held
    assert grammar.split_prompts(holdout_frac=0.0)[1] == []


def test_meta_is_geneval_like_and_json():
    m = grammar.meta("a blue square left of a green triangle")
    assert json.loads(json.dumps(m)) == m
    assert m["tag"] == "position"
    assert m["objects"] == [
        {"count": 1, "color": "blue", "shape": "square"},
        {"count": 1, "color": "green", "shape": "triangle"},
    ]
    assert m["relation"] == {"subject": 0, "relation": "left of", "reference": 1}
    assert m["include"][0]["position"] == ["left of", 1]
    assert grammar.meta("three red circles")["tag"] == "counting"
    assert grammar.meta("a red circle")["tag"] == "single_object"


# -------------------------------------------------------------------------------------------------------- renderer


def test_shape_masks_at_5px():
    assert render.shape_mask("square", 5, 5).sum() == 25
    circle = render.shape_mask("circle", 5, 5)
    assert circle.sum() == 21 and not circle[[0, 0, -1, -1], [0, -1, 0, -1]].any()
    assert render.shape_mask("triangle", 5, 5).sum(1).tolist() == [1, 1, 3, 3, 5]


def test_render_batch_deterministic_and_in_range():
    prompts = ALL[::7]
    a, b = render.render_batch(prompts, seed=3), render.render_batch(prompts, seed=3)
    assert a.shape == (len(prompts), 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, render.render_batch(prompts, seed=4))
    assert a.min() >= 0 and a.max() <= 1
    assert render.render_batch(["a red circle"], seed=0, size=32).shape == (1, 3, 32, 32)


def test_placement_constraints():
    rng = np.random.default_rng(0)
    for p in ALL:
        placed = render.place(p, rng)
        for i, a in enumerate(placed):
            assert 0 <= a.y <= 11 and 0 <= a.x <= 11
            for b in placed[i + 1 :]:  # boxes ≥ 1 px apart
                assert abs(a.y - b.y) >= 6 or abs(a.x - b.x) >= 6
        spec = grammar.parse(p)
        if spec.relation is not None:
            s, r = placed[0], placed[1]
            along = {"left of": r.x - s.x, "right of": s.x - r.x, "above": r.y - s.y, "below": s.y - r.y}
            assert along[spec.relation.relation] >= 6


# -------------------------------------------------------------------------------------------------------- verifier


@pytest.mark.parametrize(("size", "obj_size"), [(16, None), (16, 4), (32, None)])
def test_ground_truth_scores_one(size, obj_size):
    rng = np.random.default_rng(0)
    seeds = 3 if size == 16 and obj_size is None else 1
    scores, strict = [], []
    for p in ALL:
        for _ in range(seeds):
            res = verify.verify(render.render(p, rng, size, obj_size), p, obj_size=obj_size)
            scores.append(res.score)
            strict.append(res.strict)
    assert np.mean(scores) >= 0.99 and np.mean(strict) >= 0.99


def test_noise_robustness():
    rng = np.random.default_rng(1)
    imgs = render.render_batch(ALL, seed=rng)
    noisy = (imgs + 0.05 * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    scores, strict, _ = verify.score_batch(noisy, ALL)
    assert scores.mean() >= 0.95 and strict.float().mean() >= 0.95


def _img(*objs: tuple[str, str, int, int]) -> np.ndarray:
    return render.draw([Placed(c, s, y, x, 5) for c, s, y, x in objs])


@pytest.mark.parametrize(
    ("prompt", "objs", "expected"),
    [
        ("a red circle", [("red", "circle", 5, 5)], 1.0),
        ("two red circles", [("red", "circle", 0, 0)], 0.5),  # count, colour, shape each 1 − 1/2
        ("a red circle", [("red", "circle", 0, 0), ("red", "circle", 0, 8), ("red", "circle", 8, 0)], 0.0),
        ("a red circle", [("blue", "circle", 0, 0)], 1 / 3),  # only the shape term
        ("a red circle", [("blue", "square", 0, 0)], 0.0),
        ("a red circle", [("red", "circle", 0, 0), ("blue", "square", 8, 8)], 0.75),  # unrelated: × (1 − 0.25)
        # 2 of 3 circles (2/3 each) and one unrelated object: 2/3 × (1 − 0.25 / 3)
        (
            "three red circles",
            [("red", "circle", 0, 0), ("red", "circle", 0, 8), ("blue", "square", 8, 8)],
            2 / 3 * 11 / 12,
        ),
        ("a red circle left of a blue square", [("red", "circle", 5, 0), ("blue", "square", 5, 10)], 1.0),
        ("a red circle left of a blue square", [("red", "circle", 5, 10), ("blue", "square", 5, 0)], 6 / 7),
        ("a red circle above a red square", [("red", "circle", 0, 5), ("red", "square", 10, 5)], 1.0),
        ("a red circle above a red square", [("red", "square", 0, 5), ("red", "circle", 10, 5)], 5 / 6),
        # the square is missing: count 1 + 0, colour 1 + 0, shape 1 + 0, position 0 → 3 / 7
        ("a red circle left of a blue square", [("red", "circle", 5, 0)], 3 / 7),
    ],
)
def test_hand_computed_partial_credit(prompt, objs, expected):
    res = verify.verify(_img(*objs), prompt)
    assert res.score == pytest.approx(expected)
    assert res.strict == (expected == 1.0)
    assert json.loads(json.dumps(res.details)) == res.details


def test_relation_flipped_position_term_zero():
    rng = np.random.default_rng(5)
    for p in grammar.relational_prompts()[::11]:
        res = verify.verify(render.render(grammar.mirror(p), rng), p)  # the same scene in the mirrored wording
        assert res.details["position"]["score"] == 1.0
        spec = grammar.parse(p)
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        wrong = PromptSpec(spec.objects, Relation(0, flip[spec.relation.relation], 1))
        res = verify.verify(render.render(wrong, rng), p)
        assert res.details["position"]["score"] == 0.0 and not res.strict
        assert res.details["criteria"]["count"] == res.details["criteria"]["color"] == 1.0


def test_blank_and_wrong_images():
    blank = torch.zeros(len(ALL), 3, 16, 16)
    scores, strict, details = verify.score_batch(blank, ALL)
    assert scores.shape == (len(ALL),) and strict.dtype == torch.bool
    assert torch.all(scores == 0) and not strict.any() and details[0]["blobs"] == []
    rng = np.random.default_rng(2)
    wrong = [ALL[(i + 1 + rng.integers(len(ALL) - 1)) % len(ALL)] for i in range(len(ALL))]
    right, _, _ = verify.score_batch(render.render_batch(ALL, seed=2), ALL)
    other, _, _ = verify.score_batch(render.render_batch(wrong, seed=2), ALL)
    assert right.mean() == 1.0 and other.mean() < 0.5


def test_specks_ignored_and_other_colour():
    img = _img(("red", "circle", 5, 5))
    img[:, 0, 0] = (0.0, 1.0, 0.0)  # a 2-px green speck
    img[:, 0, 1] = (0.0, 1.0, 0.0)
    assert verify.verify(img, "a red circle").score == 1.0
    img = _img(("red", "circle", 5, 5))
    img[:, 0:4, 12:16] = 0.5  # grey: far from every palette colour → an unrelated "other" blob
    res = verify.verify(img, "a red circle")
    assert res.score == pytest.approx(0.75) and res.details["blobs"][0]["color"] == "other"
