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
    f.write_text("method: {optim: {lr: 0.5}, num_steps: 2}\ntrainer: {max_steps: 7}\n")
    r = resolve("dmd2", "toy2d", (str(f),), {"method.num_steps": 3})
    assert r.method.optim.lr == 0.5 and r.method.num_steps == 3 and r.trainer.max_steps == 7
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
        # the optimiser's flat keys moved into method.optim (rtdmd's stage 2: method.optim_stage2)
        *[(m, "lr", 2e-3, "optim.lr") for m in ("crd", "di_star", "didr", "dmd2", "flow_grpo", "nft", "refl", "rtdmd",
                                                   "tdm", "tdm_r1")],
        ("dmd2", "lr_schedule", "cosine", "optim.lr_schedule"),
        ("nft", "adam_betas", [0.5, 0.9], "optim.adam_betas"),
        ("crd", "weight_decay", 0.01, "optim.weight_decay"),
        ("refl", "grad_clip", 3.0, "optim.grad_clip"),
        ("dmd2", "lr_fake_score", 2e-4, "optim.roles.fake_score.lr"),
        ("didr", "lr_fake_score", 2e-4, "optim.roles.fake_score.lr"),
        ("di_star", "lr_fake_score", 2e-4, "optim.roles.fake_score.lr"),
        ("tdm", "lr_generator", 2e-5, "optim.roles.generator.lr"),
        ("tdm_r1", "lr_generator", 2e-5, "optim.roles.generator.lr"),
        ("tdm_r1", "lr_fake_score", 2e-4, "optim.roles.fake_score.lr"),
        ("tdm_r1", "lr_surrogate", 1e-4, "optim.roles.surrogate.lr"),
        ("tdm_r1", "surrogate_adam_betas", [0.5, 0.9], "optim.roles.surrogate.adam_betas"),
        ("rtdmd", "lr_fake_score", 2e-4, "optim.roles.fake_score.lr"),
        ("rtdmd", "weight_decay", 0.01, "optim.weight_decay"),
        ("rtdmd", "lr_stage2", 1e-4, "optim_stage2.lr"),
        ("rtdmd", "lr_fake_stage2", 2e-4, "optim_stage2.roles.fake_score.lr"),
        ("rtdmd", "weight_decay_stage2", 0.01, "optim_stage2.weight_decay"),
    ],
)
def test_renamed_keys_fail_with_the_new_name_and_the_new_name_works(method, old, value, new):
    """One name per concept: the DMD normaliser is ``dmd_weighting`` and TTUR is ``fake_updates_per_gen`` everywhere;
    the optimiser settings are one typed sub-config, ``method.optim``."""
    with pytest.raises(ConfigError, match=f"^'method.{old}' was renamed 'method.{new}' \\(same values\\)"):
        resolve(method, "toy2d", (), {f"method.{old}": value})
    assert _dotted(resolve(method, "toy2d", (), {f"method.{new}": value}).method, new) == value


def _dotted(obj, key):
    for part in key.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


@pytest.mark.parametrize("old", ["adam_betas", "grad_clip"])
def test_rtdmd_keys_of_both_stages_name_both_new_keys(old):
    with pytest.raises(ConfigError) as e:
        resolve("rtdmd", "toy2d", (), {f"method.{old}": 0.5})
    assert str(e.value) == (f"'method.{old}' was split into 'method.optim.{old}' and 'method.optim_stage2.{old}' "
                            "(same values); set each in your config")


def test_a_recorded_config_from_before_the_renames_still_resolves():
    """A checkpoint's recorded config (``raw``: resume, evaluate, export) written with the flat optimiser keys and
    rtdmd's ``ttur`` resolves to the same settings under the new names; an override given the new way wins; the
    same keys in a user's config still fail with the new name."""
    raw = {"method": {"name": "tdm_r1", "lr": 2e-4, "lr_generator": 5e-5, "lr_fake_score": None,
                      "surrogate_adam_betas": [0.8, 0.9], "grad_clip": 2.0, "weight_decay": 0.0},
           "world": {"name": "toy2d"}}
    opt = resolve(None, raw=raw).method.optim
    assert (opt.lr, opt.grad_clip, opt.weight_decay) == (2e-4, 2.0, 0.0)
    assert opt.roles["generator"].lr == 5e-5 and opt.roles["surrogate"].adam_betas == [0.8, 0.9]
    assert "fake_score" not in opt.roles  # an old null ("default: lr") is an absent override
    assert resolve(None, None, (), {"method.optim.lr": 1e-4}, raw=raw).method.optim.lr == 1e-4
    rt = resolve(None, raw={"method": {"name": "rtdmd", "ttur": 3, "adam_betas": [0.5, 0.9], "grad_clip": 4.0,
                                       "lr_stage2": 1e-5, "lr_fake_stage2": 2e-5, "weight_decay_stage2": 0.01},
                            "world": {"name": "toy2d"}}).method
    assert rt.fake_updates_per_gen == 3
    assert rt.optim.adam_betas == rt.optim_stage2.adam_betas == [0.5, 0.9]
    assert rt.optim.grad_clip == rt.optim_stage2.grad_clip == 4.0
    assert (rt.optim_stage2.lr, rt.optim_stage2.roles["fake_score"].lr, rt.optim_stage2.weight_decay) == (
        1e-5, 2e-5, 0.01)
    assert rt.optim_stage2.roles["fake_score"].weight_decay == 0.0  # rtdmd's own stage-2 default is kept
    with pytest.raises(ConfigError, match="^'method.lr' was renamed 'method.optim.lr'"):
        resolve("tdm_r1", "toy2d", (), {"method.lr": 2e-4})


def test_partial_optim_merges_over_the_methods_own_default():
    """Setting only ``optim.lr`` (or one ``roles`` entry) keeps the rest of the *method's* optim default, not the
    OptimConfig class defaults."""
    from fewstep_rl.methods.dmd2 import DMD2Config
    from fewstep_rl.methods.rtdmd import RTDMDConfig
    from fewstep_rl.methods.tdm_r1 import TDMR1Config
    from fewstep_rl.optim import OptimConfig

    assert (OptimConfig().adam_betas, OptimConfig().grad_clip) == ([0.9, 0.999], 1.0)  # not dmd2's
    c = build(DMD2Config, {"optim": {"lr": 5e-4}}, "method").optim
    assert (c.lr, c.adam_betas, c.grad_clip, c.weight_decay, c.roles) == (5e-4, [0.0, 0.99], 10.0, 0.0, {})
    c = build(DMD2Config, {"optim": {"roles": {"fake_score": {"lr": 2e-4}}}}, "method").optim
    assert (c.lr, c.adam_betas, c.grad_clip) == (1e-3, [0.0, 0.99], 10.0)
    assert (c.lr_of("generator"), c.lr_of("fake_score"), c.betas_of("fake_score")) == (1e-3, 2e-4, (0.0, 0.99))
    # a roles entry merges over that role's default entry; the other roles keep theirs
    c = build(TDMR1Config, {"optim": {"lr": 1e-3, "roles": {"surrogate": {"lr": 1e-4}}}}, "method").optim
    assert c.lr_of("surrogate") == 1e-4 and c.betas_of("surrogate") == (0.9, 0.999)
    assert c.lr_of("generator") == 7.5e-5 and c.lr_of("fake_score") == 1e-3 and c.betas_of("generator") == (0.0, 0.999)
    c = build(TDMR1Config, {"optim": {"roles": {"generator": {"lr": None}}}}, "method").optim
    assert c.lr_of("generator") == 3e-4  # null: inherit optim.lr
    # rtdmd's stage 2: the fake score keeps weight decay 0 (and lr 3e-5) when the generator's is set
    c = build(RTDMDConfig, {"optim_stage2": {"weight_decay": 1e-3}}, "method").optim_stage2
    assert (c.weight_decay_of("generator"), c.weight_decay_of("fake_score"), c.lr_of("fake_score")) == (1e-3, 0.0, 3e-5)
    # dotted overrides layered on a preset: the preset's optim stays (dmd2 toy2d: cosine, betas (0.9, 0.999))
    o = resolve("dmd2", "toy2d", (), {"method.optim.lr": 2e-3}).method.optim
    assert (o.lr, o.lr_schedule, o.adam_betas, o.grad_clip) == (2e-3, "cosine", [0.9, 0.999], 10.0)
    o = resolve("dmd2", "toy2d", (), {"method.optim.lr": 2e-3}, use_preset=False).method.optim
    assert (o.lr, o.lr_schedule, o.adam_betas, o.grad_clip) == (2e-3, "constant", [0.0, 0.99], 10.0)


@dataclass
class Budget:
    iterations: int | None = knob(None, "iterations")
    seconds: float | None = knob(None, "seconds")


@dataclass
class Outer:
    inner: Inner = knob(factory=lambda: Inner(depth=7))
    budget: Budget = knob(factory=lambda: Budget(iterations=10), merge=False)
    other: Budget = knob(factory=lambda: Budget(iterations=10))


def test_nested_config_merges_over_its_field_default_unless_merge_false():
    o = build(Outer, {"inner": {}, "budget": {"seconds": 5}, "other": {"seconds": 5}}, "x")
    assert o.inner.depth == 7  # the field's default, not Inner's class default 2
    assert (o.budget.iterations, o.budget.seconds) == (None, 5.0)  # merge=False: replaced whole
    assert (o.other.iterations, o.other.seconds) == (10, 5.0)
    assert build(Outer, {}, "x").inner.depth == 7


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"method.optim.roles.surrogate": {"lr": 1e-3}},
         "'method': optim.roles.surrogate: not a trainable role of this method (roles: generator, fake_score)"),
        ({"method.optim.roles.fake": {"lr": 1e-3}}, "did you mean 'fake_score'?"),
        ({"method.optim.lr": 0}, "'method.optim.lr': a learning rate must be a finite number > 0"),
        ({"method.optim.roles.fake_score.lr": -1e-3},
         "'method.optim.roles.fake_score.lr': a learning rate must be a finite number > 0"),
        ({"method.optim.roles.generator.lr": float("nan")}, "'method.optim.roles.generator.lr': NaN"),
        ({"method.optim.adam_betas": [0.9]}, "adam_betas takes two numbers in [0, 1)"),
        ({"method.optim.adam_betas": [0.9, 1.0]}, "adam_betas takes two numbers in [0, 1)"),
        ({"method.optim.roles.fake_score.adam_betas": [-0.1, 0.9]}, "adam_betas takes two numbers in [0, 1)"),
        ({"method.optim.weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"method.optim.roles.generator.weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
        ({"method.optim.grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
        ({"method.optim.lr_schedule": "linear"}, "choose one of 'constant', 'cosine'"),
        ({"method.optim.lrr": 1e-3}, "did you mean 'method.optim.lr'?"),
    ],
)
def test_optim_values_are_checked_with_the_dotted_key(over, needle):
    with pytest.raises(ConfigError) as e:
        resolve("dmd2", "toy2d", (), over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_rtdmd_checks_the_roles_of_both_stages():
    with pytest.raises(ConfigError, match="optim_stage2.roles.surrogate: not a trainable role"):
        resolve("rtdmd", "toy2d", (), {"method.optim_stage2.roles.surrogate.lr": 1e-3})
