"""Typed config: unknown keys, wrong types, suggestions; registry lookups; config resolution layers."""

from dataclasses import dataclass
from typing import Literal

import pytest

from fewstep_rl import registry
from fewstep_rl.config import ConfigError, build, knob, to_dict
from fewstep_rl.run import resolve


@dataclass
class Inner:
    depth: int = knob(2, "depth")


@dataclass
class Cfg:
    lr: float = knob(1e-3, "learning rate")
    steps: int = knob(4, "steps")
    mode: Literal["a", "b"] = knob("a", "mode")
    betas: list[float] = knob([0.9, 0.99], "betas")
    maybe: float | None = knob(None, "optional")
    inner: Inner = knob(factory=Inner)


def test_build_types_and_widening():
    c = build(Cfg, {"lr": 1, "steps": 3.0, "betas": [0, 1], "maybe": 2, "inner": {"depth": 5}}, "method")
    assert c.lr == 1.0 and isinstance(c.lr, float) and c.steps == 3 and c.betas == [0.0, 1.0] and c.maybe == 2.0
    assert c.inner.depth == 5
    assert build(Cfg, {"lr": "3e-4"}, "method").lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert to_dict(c)["inner"] == {"depth": 5}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"stpes": 3}, "did you mean 'method.steps'"),
        ({"steps": "many"}, "'method.steps': expected an integer"),
        ({"steps": 2.5}, "expected an integer"),
        ({"mode": "c"}, "choose one of 'a', 'b'"),
        ({"betas": 0.9}, "expected a list"),
        ({"lr": True}, "expected a number"),
        ({"inner": {"dpth": 1}}, "method.inner.dpth"),
    ],
)
def test_build_rejects_with_named_key(data, needle):
    with pytest.raises(ConfigError, match=None) as e:
        build(Cfg, data, "method")
    assert needle in str(e.value)


def test_registry_suggests_and_accepts_module_paths():
    with pytest.raises(registry.UnknownName) as e:
        registry.load("methods", "dmd3")
    assert "did you mean 'dmd2'" in str(e.value) and "installed methods: " in str(e.value)
    cls = registry.load("methods", "fewstep_rl.methods.dmd2:DMD2")
    assert cls is registry.load("methods", "dmd2")
    with pytest.raises(registry.UnknownName):
        registry.load("methods", "fewstep_rl.methods.dmd2:Nope")


def test_resolve_layers_preset_file_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: {lr: 0.5, num_steps: 2}\ntrainer: {max_steps: 7}\n")
    r = resolve("dmd2", "toy2d", (str(f),), {"method.num_steps": 3})
    assert r.method.lr == 0.5 and r.method.num_steps == 3 and r.trainer.max_steps == 7
    assert r.method.batch_size == 256  # from the packaged preset configs/dmd2/toy2d.yaml
    assert [n for n, *_ in r.rewards] == ["linear"]  # the world's default rewards
    with pytest.raises(ConfigError, match="'rewards\\[0\\].w'"):
        resolve("dmd2", "toy2d", (), {"rewards": [{"name": "linear", "w": "x"}]})
    with pytest.raises(ConfigError, match="unknown reward 'lineer'; did you mean 'linear'"):
        resolve("dmd2", "toy2d", (), {"rewards": [{"name": "lineer"}]})


@pytest.mark.parametrize(
    "method,old,value,new",
    [
        ("dmd2", "dmd_normalizer", "batch", "dmd_weighting"),
        ("tdm", "normalizer", "batch", "dmd_weighting"),
        ("tdm_r1", "normalizer", "batch", "dmd_weighting"),
        ("didr", "weighting", "kl", "dmd_weighting"),
        ("di_star", "weighting", "kl", "dmd_weighting"),
        ("rtdmd", "dmd_normalizer", "batch", "dmd_weighting"),
        ("rtdmd", "ttur", 2, "fake_updates_per_gen"),
    ],
)
def test_renamed_keys_fail_with_the_new_name_and_the_new_name_works(method, old, value, new):
    """One name per concept: the DMD normaliser is ``dmd_weighting`` and TTUR is ``fake_updates_per_gen`` everywhere."""
    with pytest.raises(ConfigError, match=f"'method.{old}' was renamed 'method.{new}'"):
        resolve(method, "toy2d", (), {f"method.{old}": value})
    assert getattr(resolve(method, "toy2d", (), {f"method.{new}": value}).method, new) == value
