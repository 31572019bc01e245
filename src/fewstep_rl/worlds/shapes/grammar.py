"""Prompt grammar of the ``shapes`` world (architecture.md §4): counts, colours, shapes and relative positions.

The language (canonical spelling; :func:`parse` also accepts the aliases noted)::

    prompt   := group | single REL single
    group    := NUMBER COLOR SHAPE          "a red circle", "two blue squares", "three yellow triangles"
    single   := "a" COLOR SHAPE             (count 1; "one" is accepted as an alias of "a")
    NUMBER   := "a" | "two" | "three"       ("one" = "a"); the noun is singular for 1 and plural ("…s") otherwise
    COLOR    := red | green | blue | yellow
    SHAPE    := circle | square | triangle  (a triangle always points up)
    REL      := "left of" | "right of" | "above" | "below"   ("to the left of", "to the right of" are aliases)

A relational prompt ``"a blue square left of a green triangle"`` relates two *different* (colour, shape) objects of
count 1: the first (the subject, index 0) stands left of / right of / above / below the second (the reference,
index 1). Parsing is case-insensitive, collapses runs of whitespace and drops one trailing full stop; anything else
outside the grammar raises :class:`ValueError` naming the offending words.

:func:`all_prompts` enumerates the whole grammar (36 single-group prompts, 528 relational ones) and
:func:`split_prompts` holds ~10% of the relational prompts out of training for a generalisation report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
"""Palette: colour name → RGB in [0, 1]. Every pair (and the background) is at Euclidean distance ≥ 1."""

BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
"""Plain black background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MAX_COUNT = 3

NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
_NUMBERS_IN: dict[str, int] = {"a": 1, "one": 1, "two": 2, "three": 3}
_RELATION_ALIASES: dict[str, str] = {"to the left of": "left of", "to the right of": "right of"}
_MIRROR: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


class ObjectSpec(NamedTuple):
    """One requested object group: ``count`` objects of one colour and one shape."""

    count: int
    color: str
    shape: str


class Relation(NamedTuple):
    """``objects[subject]`` stands ``relation`` (e.g. ``"left of"``) ``objects[reference]``."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt.

    Attributes:
        objects: the requested object groups, in prompt order (1 group, or 2 groups of count 1 with a relation).
        relation: the spatial relation between the two groups, ``None`` for single-group prompts.
    """

    objects: tuple[ObjectSpec, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        objects = tuple(ObjectSpec(*o) for o in self.objects)
        object.__setattr__(self, "objects", objects)
        if self.relation is not None:
            object.__setattr__(self, "relation", Relation(*self.relation))
        _validate(self)

    @property
    def num_objects(self) -> int:
        """Total number of requested objects (sum of the group counts)."""
        return sum(o.count for o in self.objects)


def _validate(spec: PromptSpec) -> None:
    if len(spec.objects) not in (1, 2):
        raise ValueError(f"a prompt has 1 or 2 object groups, got {len(spec.objects)}")
    for o in spec.objects:
        if not 1 <= o.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {o.count}")
        if o.color not in COLORS:
            raise ValueError(f"unknown colour {o.color!r}; choose one of {', '.join(COLORS)}")
        if o.shape not in SHAPES:
            raise ValueError(f"unknown shape {o.shape!r}; choose one of {', '.join(SHAPES)}")
    if len(spec.objects) == 2:
        if spec.relation is None:
            raise ValueError("a two-object prompt needs a relation")
        a, b = spec.objects
        if a.count != 1 or b.count != 1:
            raise ValueError("both objects of a relational prompt have count 1")
        if (a.color, a.shape) == (b.color, b.shape):
            raise ValueError(f"the two objects of a relational prompt must differ, got two {a.color} {a.shape}s")
        r = spec.relation
        if r.relation not in RELATIONS:
            raise ValueError(f"unknown relation {r.relation!r}; choose one of {', '.join(RELATIONS)}")
        if {r.subject, r.reference} != {0, 1}:
            raise ValueError(f"relation indices must be 0 and 1, got {r.subject} and {r.reference}")
    elif spec.relation is not None:
        raise ValueError("a single-group prompt has no relation")


def _group_words(o: ObjectSpec) -> str:
    noun = o.shape if o.count == 1 else o.shape + "s"
    return f"{NUMBER_WORDS[o.count]} {o.color} {noun}"


def format_prompt(spec: PromptSpec) -> str:
    """The canonical prompt string of ``spec`` (``parse(format_prompt(s)) == s``).

    Args:
        spec: a prompt spec.

    Returns:
        e.g. ``"two red circles"`` or ``"a blue square left of a green triangle"``.
    """
    if spec.relation is None:
        return _group_words(spec.objects[0])
    r = spec.relation
    return f"{_group_words(spec.objects[r.subject])} {r.relation} {_group_words(spec.objects[r.reference])}"


format = format_prompt  # the short name; shadows the builtin inside this module only


def _parse_group(words: list[str], prompt: str) -> ObjectSpec:
    if len(words) != 3:
        raise ValueError(f"expected '<number> <colour> <shape>' but got {' '.join(words)!r} in prompt {prompt!r}")
    num, color, noun = words
    if num not in _NUMBERS_IN:
        raise ValueError(f"unknown number word {num!r} in prompt {prompt!r}; use one of a, one, two, three")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r} in prompt {prompt!r}; use one of {', '.join(COLORS)}")
    count = _NUMBERS_IN[num]
    plural = noun.endswith("s")
    shape = noun[:-1] if plural else noun
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {noun!r} in prompt {prompt!r}; use one of {', '.join(SHAPES)} (plural -s)")
    if plural != (count > 1):
        want = shape + "s" if count > 1 else shape
        raise ValueError(f"{num!r} needs {want!r}, got {noun!r} in prompt {prompt!r}")
    return ObjectSpec(count, color, shape)


@functools.lru_cache(maxsize=4096)
def parse(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar (strict).

    Args:
        prompt: e.g. ``"three yellow triangles"`` or ``"a red circle above a blue square"``.

    Returns:
        The :class:`PromptSpec`.

    Raises:
        ValueError: if ``prompt`` is outside the grammar; the message names the offending part.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt is a string, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    for alias, rel in _RELATION_ALIASES.items():
        text = text.replace(f" {alias} ", f" {rel} ")
    words = text.split()
    if not words:
        raise ValueError("empty prompt")
    rel_at = [(i, n) for i in range(len(words)) for n in (1, 2) if " ".join(words[i : i + n]) in RELATIONS]
    if not rel_at:
        try:
            group = _parse_group(words, prompt)
        except ValueError as e:
            raise ValueError(
                f"{e}; prompts are '<number> <colour> <shape>' or '<object> <relation> <object>'"
            ) from None
        return PromptSpec((group,))
    if len(rel_at) > 1:
        raise ValueError(f"more than one relation in prompt {prompt!r}")
    i, n = rel_at[0]
    left, right = _parse_group(words[:i], prompt), _parse_group(words[i + n :], prompt)
    if left.count != 1 or right.count != 1:
        raise ValueError(f"relational prompts relate single objects ('a <colour> <shape>'), got {prompt!r}")
    try:
        return PromptSpec((left, right), Relation(0, " ".join(words[i : i + n]), 1))
    except ValueError as e:
        raise ValueError(f"{e} (prompt {prompt!r})") from None


def _all_objects() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


@functools.lru_cache(maxsize=1)
def _all_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    singles = [_group_words(ObjectSpec(n, c, s)) for n in range(1, MAX_COUNT + 1) for c, s in _all_objects()]
    pairs = [
        format_prompt(PromptSpec((ObjectSpec(1, *a), ObjectSpec(1, *b)), Relation(0, rel, 1)))
        for a in _all_objects()
        for b in _all_objects()
        if a != b
        for rel in RELATIONS
    ]
    return tuple(singles), tuple(pairs)


def all_prompts() -> list[str]:
    """Every canonical prompt of the grammar, in a fixed order.

    Returns:
        ``3 counts × 4 colours × 3 shapes = 36`` single-group prompts, then ``12 × 11 × 4 = 528`` relational
        prompts (ordered pairs of different (colour, shape) objects, four relations).
    """
    singles, pairs = _all_prompts()
    return [*singles, *pairs]


def single_prompts() -> list[str]:
    """The 36 single-group prompts of :func:`all_prompts`."""
    return list(_all_prompts()[0])


def relational_prompts() -> list[str]:
    """The 528 two-object relational prompts of :func:`all_prompts`."""
    return list(_all_prompts()[1])


def mirror(prompt: str) -> str:
    """The relational prompt describing the same scene from the other object (``A left of B`` ↔ ``B right of A``).

    Args:
        prompt: a relational prompt.

    Returns:
        Its canonical mirror prompt.

    Raises:
        ValueError: if ``prompt`` has no relation.
    """
    spec = parse(prompt)
    if spec.relation is None:
        raise ValueError(f"{prompt!r} has no relation to mirror")
    a, b = spec.objects
    return format_prompt(PromptSpec((b, a), Relation(0, _MIRROR[spec.relation.relation], 1)))


def split_prompts(seed: int = 0, holdout_frac: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of the grammar.

    Held out are ``round(holdout_frac · 264)`` scenes of the relational prompts, i.e. about ``holdout_frac`` of the
    528 relational prompt strings. A scene is a prompt together with its mirror (``"A left of B"`` and
    ``"B right of A"``), so a held-out composition cannot be learned from its mirrored wording. Every
    single-group prompt is in training.

    Args:
        seed: seed of the permutation that picks the held-out scenes.
        holdout_frac: fraction of relational scenes held out, in [0, 1).

    Returns:
        ``(train, heldout)``: disjoint lists, each in :func:`all_prompts` order; their union is the whole grammar.
    """
    if not 0.0 <= holdout_frac < 1.0:
        raise ValueError(f"holdout_frac must be in [0, 1), got {holdout_frac}")
    singles, pairs = _all_prompts()
    scenes = sorted({min(p, mirror(p)) for p in pairs})
    n_hold = round(holdout_frac * len(scenes))
    order = np.random.default_rng(seed).permutation(len(scenes))
    held_scenes = {scenes[i] for i in order[:n_hold]}
    held = {p for p in pairs if min(p, mirror(p)) in held_scenes}
    train = [*singles, *(p for p in pairs if p not in held)]
    return train, [p for p in pairs if p in held]


def meta(prompt: str | PromptSpec) -> dict:
    """JSON-able, GenEval-like metadata of a prompt, for rewards and the gold verifier.

    Args:
        prompt: a prompt string or spec.

    Returns:
        ``{"prompt", "tag", "objects": [{"count", "color", "shape"}, ...], "relation": {"subject", "relation",
        "reference"} | None, "include": [...]}``; ``tag`` is ``"single_object"`` (count 1), ``"counting"`` (count
        2–3) or ``"position"``; ``include`` is the GenEval form (``"class"`` = shape, and the subject carries
        ``"position": [relation, reference index]``).
    """
    spec = parse(prompt) if isinstance(prompt, str) else prompt
    objects = [{"count": o.count, "color": o.color, "shape": o.shape} for o in spec.objects]
    include = [{"class": o.shape, "count": o.count, "color": o.color} for o in spec.objects]
    relation = None
    if spec.relation is not None:
        r = spec.relation
        relation = {"subject": r.subject, "relation": r.relation, "reference": r.reference}
        include[r.subject]["position"] = [r.relation, r.reference]
        tag = "position"
    else:
        tag = "single_object" if spec.objects[0].count == 1 else "counting"
    return {"prompt": format_prompt(spec), "tag": tag, "objects": objects, "relation": relation, "include": include}
