"""The ``fewstep-rl compare`` file: shared parts plus a ``methods:`` list, resolved into one run config per method.

::

    world: {name: toy2d}                      # shared world (and its keys)
    rewards: [{name: linear, w: [1, 0]}]      # training rewards (what the methods optimise)
    judges: [{name: region}]                  # judge rewards: only the monitor and the report see them
    beta: 0.25                                # written into method.beta of every method that has one
    seeds: [0]                                # one run per method and seed
    budget: {seconds: 60}                     # exactly one of iterations / seconds / samples (+ max_iterations)
    eval: {samples: 512, seed: 1234, grid_per_prompt: 4, teacher_steps: 25}
    monitor: {every: 100, alarm: 2.0}         # the reward-hacking monitor of every run
    trainer: {log_every: 50}                  # shared trainer keys
    preset: true                              # layer each method's packaged preset under the shared parts
    methods:
      - rtdmd                                 # a registry name (or module:Class) ...
      - {name: crd, label: crd-k16, method: {group_size: 16}, trainer: {...}}   # ... or one with overrides

Layers of one method's run config, later wins: the method's preset for the world (``preset: true``) ← the shared
parts (``world``, ``rewards``, ``judges``, ``monitor``, ``trainer``, ``beta``) ← the entry's own ``method``/``trainer``
overrides ← what the compare runner sets (run directory, seed, iteration cap, thread count). Every layer is
recorded (:func:`value_sources`) so the side-by-side table can mark which values came from a preset and differ.

Budgets: ``iterations`` sets ``trainer.max_steps``; ``seconds`` counts training-step wall time only (evaluations,
checkpoints and start-up excluded; on a shared machine the same budget buys fewer iterations); ``samples`` counts
``batch_size × group_size × world size`` per iteration (the method's batch spec — RTDMD's stage 1 with
``stage1_one_per_group`` or several epochs per batch are counted by that spec, not by every forward pass). With a
``seconds`` or ``samples`` budget ``trainer.max_steps`` is ``budget.max_iterations``, which is also the length of a
cosine learning-rate schedule (it does not reach 0 when the budget ends first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fewstep_rl.config import ConfigError, build, knob
from fewstep_rl.eval.monitor import MonitorConfig


@dataclasses.dataclass
class BudgetConfig:
    """``budget.*``: exactly one of ``iterations``, ``seconds`` (training wall time) or ``samples`` (generated
    training samples); ``max_iterations`` caps the run (and sets the learning-rate schedule's length) otherwise."""

    iterations: int | None = knob(None, "train every method for this many iterations")
    seconds: float | None = knob(None, "train every method for this many wall seconds (evaluations excluded)")
    samples: int | None = knob(None, "train every method until it generated this many training samples")
    max_iterations: int = knob(100000, "iteration cap with a seconds or samples budget")
    checkpoint_every: int = knob(0, "write a resume checkpoint every N iterations (0: by checkpoint_seconds)")
    checkpoint_seconds: float = knob(30.0, "write a resume checkpoint every this many wall seconds")

    def __post_init__(self) -> None:
        given = [k for k in ("iterations", "seconds", "samples") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"budget: give exactly one of iterations, seconds, samples (got {given or 'none'})")
        if any((getattr(self, k) or 0) <= 0 for k in given) or self.max_iterations < 1:
            raise ValueError("budget: the budget and max_iterations must be > 0")

    @property
    def kind(self) -> str:
        return next(k for k in ("iterations", "seconds", "samples") if getattr(self, k) is not None)


@dataclasses.dataclass
class EvalConfig:
    """``eval.*``: the shared evaluation prompts and noise."""

    samples: int = knob(512, "final evaluation samples per method (pinned noise, the same for every method)")
    seed: int = knob(1234, "seed of the pinned evaluation noise (final scores, sample grids, monitor)")
    grid_per_prompt: int = knob(4, "samples per prompt in the side-by-side sample grids")
    grid_prompts: int = knob(6, "prompts shown in the sample grids")
    teacher_steps: int = knob(25, "Euler steps of the teacher's reference samples")
    prompts: list[str] | None = knob(None, "evaluation prompts (default: the world's)")

    def __post_init__(self) -> None:
        if self.samples < 2 or self.grid_per_prompt < 1 or self.grid_prompts < 1 or self.teacher_steps < 1:
            raise ValueError("eval: samples >= 2, grid_per_prompt, grid_prompts and teacher_steps >= 1")


@dataclasses.dataclass
class MethodEntry:
    """One ``methods:`` entry."""

    name: str = knob(help="registry name or module:Class")
    label: str | None = knob(None, "label in tables and directories (default: the name)")
    method: dict[str, Any] = knob(help="method overrides", factory=dict)
    trainer: dict[str, Any] = knob(help="trainer overrides", factory=dict)
    preset: bool | None = knob(None, "layer the method's preset (default: the file's preset)")


@dataclasses.dataclass
class CompareConfig:
    """A whole compare file."""

    methods: list[MethodEntry] = knob(help="methods to compare", factory=list)
    world: dict[str, Any] = knob(help="shared world section (name + keys)", factory=lambda: {"name": "toy2d"})
    rewards: list[dict[str, Any]] | None = knob(None, "training rewards (default: the world's)")
    judges: list[dict[str, Any]] = knob(help="judge rewards (never seen by training)", factory=list)
    beta: float | None = knob(None, "β written into every method that has a beta key")
    seeds: list[int] = knob(help="one run per method and seed", factory=lambda: [0])
    budget: BudgetConfig = knob(  # replaced whole, not merged: its keys exclude each other
        help="training budget", factory=lambda: BudgetConfig(iterations=1000), merge=False
    )
    eval: EvalConfig = knob(help="shared evaluation", factory=EvalConfig)
    monitor: MonitorConfig = knob(help="reward-hacking monitor", factory=MonitorConfig)
    trainer: dict[str, Any] = knob(help="shared trainer keys", factory=dict)
    preset: bool = knob(True, "layer each method's packaged preset under the shared parts")

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("compare: the 'methods' list is empty; name at least one method")
        if not self.seeds:
            raise ValueError("compare: 'seeds' is empty")
        labels = [run_label(e, s, len(self.seeds)) for e in self.methods for s in self.seeds]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"compare: two methods share the label(s) {dup}; give them distinct 'label's")


def run_label(entry: MethodEntry, seed: int, n_seeds: int) -> str:
    base = entry.label or entry.name.replace(":", "-").replace(".", "-")
    return base if n_seeds == 1 else f"{base}-seed{seed}"


def load_compare(path: str | Path) -> CompareConfig:
    """Read and validate a compare file (raises :class:`ConfigError` naming the bad key)."""
    from fewstep_rl.run import load_yaml

    data = dict(load_yaml(path))
    methods = data.get("methods")
    if isinstance(methods, list):
        data["methods"] = [{"name": m} if isinstance(m, str) else m for m in methods]
    for key in ("method",):
        if key in data:
            raise ConfigError(f"compare file {path}: per-method settings go under 'methods:' entries, not '{key}'")
    return build(CompareConfig, data, "compare")


@dataclasses.dataclass
class RunSpec:
    """One run of a comparison: its label, layers and resolved config."""

    label: str
    entry: MethodEntry
    seed: int
    layer: dict[str, Any]  # the compare layer (shared parts + entry overrides + runner settings)
    resolved: Any  # fewstep_rl.run.Resolved
    preset: Path | None

    def config(self) -> dict[str, Any]:
        return self.resolved.to_dict()


def layer_for(cfg: CompareConfig, entry: MethodEntry, seed: int, method_cls: type, run_dir: Path,
              threads: int | None) -> dict[str, Any]:
    """The compare layer of one run (applied over the method's preset)."""
    from fewstep_rl.config import to_dict

    method: dict[str, Any] = {}
    if cfg.beta is not None and any(f.name == "beta" for f in dataclasses.fields(method_cls.Config)):
        method["beta"] = cfg.beta
    method.update(entry.method)
    trainer: dict[str, Any] = {**cfg.trainer, **entry.trainer}
    b = cfg.budget
    trainer["max_steps"] = b.iterations if b.kind == "iterations" else b.max_iterations
    trainer["seed"] = seed
    trainer["run_dir"] = str(run_dir)
    if threads is not None and "num_threads" not in cfg.trainer and "num_threads" not in entry.trainer:
        trainer["num_threads"] = threads
    layer: dict[str, Any] = {"world": dict(cfg.world), "method": method, "trainer": trainer}
    if cfg.rewards is not None:
        layer["rewards"] = [dict(r) for r in cfg.rewards]
    if cfg.judges:
        layer["judges"] = [dict(j) for j in cfg.judges]
        layer["monitor"] = to_dict(cfg.monitor)
    return layer


def resolve_runs(cfg: CompareConfig, out: Path, jobs: int = 1) -> list[RunSpec]:
    """Every (method, seed) run of the comparison, resolved and validated before anything trains."""
    import os

    from fewstep_rl import registry
    from fewstep_rl.run import preset_path, resolve

    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    world = cfg.world.get("name")
    if not world:
        raise ConfigError("compare: 'world' needs a name, e.g. world: {name: toy2d}")
    specs = []
    for entry in cfg.methods:
        cls = registry.load("methods", entry.name)
        use_preset = cfg.preset if entry.preset is None else entry.preset
        for seed in cfg.seeds:
            label = run_label(entry, seed, len(cfg.seeds))
            layer = layer_for(cfg, entry, seed, cls, Path(out) / label, threads)
            try:
                resolved = resolve(entry.name, world, (), layer, use_preset=use_preset)
            except ConfigError as e:
                raise ConfigError(f"method {label!r}: {e}") from None
            if cfg.judges and resolved.judges and {n for n, *_ in resolved.rewards} & {n for n, *_ in resolved.judges}:
                shared = sorted({n for n, *_ in resolved.rewards} & {n for n, *_ in resolved.judges})
                raise ConfigError(f"method {label!r}: reward(s) {shared} are both training rewards and judges; "
                                  "a judge must never be seen by training")
            preset = preset_path(getattr(cls, "name", entry.name), world) if use_preset else None
            specs.append(RunSpec(label, entry, seed, layer, resolved, preset))
    return specs


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of nested mappings (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = d
    return out


def value_sources(spec: RunSpec) -> dict[str, str]:
    """Where each resolved key's value came from: ``shared``/``override``/``runner`` (the compare layer), ``preset``
    (the method's preset file) or ``default`` (the dataclass default)."""
    from fewstep_rl.run import load_yaml

    preset = flatten(load_yaml(spec.preset)) if spec.preset else {}
    entry = flatten({"method": spec.entry.method, "trainer": spec.entry.trainer})
    layer = flatten(spec.layer)
    runner = {"trainer.max_steps", "trainer.seed", "trainer.run_dir", "trainer.num_threads"}
    out = {}
    for key in flatten(spec.config()):
        top = key.split(".")[0]
        if key in entry:
            out[key] = "override"
        elif key in runner and key in layer:
            out[key] = "runner"
        elif key in layer or (top in ("rewards", "judges", "monitor") and top in spec.layer):
            out[key] = "shared"
        elif key in preset or (top in ("rewards", "judges") and top in {k.split(".")[0] for k in preset}):
            out[key] = "preset"
        else:
            out[key] = "default"
    return out
