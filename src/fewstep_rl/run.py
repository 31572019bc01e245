"""Run configuration and assembly: resolve a config, build world, rewards, method, data and Trainer.

The run config has five sections (plus the optional ``judges``/``monitor``)::

    method:  {...}                       # the method's typed Config (``--method NAME`` picks the class)
    world:   {name: toy2d, ...}          # the world's typed Config
    roles:   {mode: lora, rank: 32, alpha: 64.0, targets: null}   # RolesConfig; defaults: the world's
    rewards: [{name: linear, weight: 1.0, w: [1.0, 0.0]}, ...]   # default: the world's default rewards
    trainer: {...}                       # TrainerConfig below

The keys ``world.roles_mode``, ``world.lora_rank``, ``world.lora_alpha`` and ``world.lora_targets`` of earlier
versions are read as ``roles.mode``/``rank``/``alpha``/``targets`` (old checkpoints and configs keep working).

Layers, later wins: the packaged preset ``configs/<method>/<world>.yaml`` (when it exists) ← each ``--config FILE``
← dotted overrides. Everything is validated against the dataclasses before any model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from fewstep_rl import registry
from fewstep_rl.config import (
    ConfigError,
    build,
    deep_merge,
    field_types,
    knob,
    plugin_preset,
    to_dict,
    unknown_key_message,
)
from fewstep_rl.optim import check_optim_roles
from fewstep_rl.roles.config import LEGACY_WORLD_KEYS, RolesConfig

DEFAULT_WORLD = "shapes"
SECTIONS = ("method", "world", "roles", "rewards", "trainer", "judges", "monitor")


@dataclass
class TrainerConfig:
    """Trainer section (``trainer.*``): devices, strategy, length, logging, checkpoints."""

    max_steps: int = knob(1000, "training iterations (prompt batches; not optimiser steps)")
    max_minutes: float = knob(0.0, "also stop (with the final evaluation and last.ckpt) after M minutes of training "
                                   "wall time, counted across resumes (0: off)")
    accelerator: str = knob("auto", "Lightning accelerator: auto, cpu, gpu, cuda")
    devices: int = knob(1, "number of devices (processes) per node")
    num_nodes: int = knob(1, "number of nodes (machines); launch with torchrun or srun, see README 'Multi-node'")
    strategy: Literal["auto", "ddp", "fsdp2"] = knob("auto", "auto, ddp (gloo on CPU) or fsdp2 (ModelParallelStrategy)")
    precision: str = knob("32-true", "Lightning precision, e.g. 32-true, bf16-mixed")
    seed: int = knob(0, "seed of every random stream (noise, prompts, adapter init)")
    run_dir: str | None = knob(None, "run directory (default: runs/<method>-<world>-<time>)")
    log_every: int = knob(10, "log training metrics every N iterations")
    eval_every: int = knob(0, "evaluate every N iterations (0: only at the end)")
    eval_samples: int = knob(1024, "samples per evaluation")
    ckpt_every: int = knob(0, "also keep a checkpoint iter=N.ckpt every N iterations (0: only last.ckpt)")
    ckpt_last_every: int = knob(100, "refresh checkpoints/last.ckpt every N iterations (0: off; always at the end)")
    ckpt_last_minutes: float = knob(10.0, "refresh checkpoints/last.ckpt at least every M minutes (0: off)")
    nonfinite_limit: int = knob(3, "abort after N iterations in a row with a non-finite loss or gradient (0: never)")
    num_threads: int | None = knob(None, "torch intra-op threads (default: torch's choice; DDP uses 1 per rank)")
    progress_bar: bool = knob(True, "show a progress bar")
    reward_overlap: bool = knob(
        True, "score black-box rewards in a background thread while the rest of the rollout runs (same results)")
    logger: Literal["csv", "tensorboard", "wandb"] = knob(
        "csv", "metrics logger: csv (metrics.csv), tensorboard or wandb (offline; both keep metrics.csv too)")

    def __post_init__(self) -> None:
        check_trainer_config(self)


def check_trainer_config(tc: TrainerConfig) -> None:
    """Range checks of the trainer section (ValueError naming the key and what is allowed)."""
    for key in ("max_steps", "devices", "num_nodes", "log_every", "eval_samples"):
        if getattr(tc, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(tc, key)}")
    for key in ("eval_every", "ckpt_every", "ckpt_last_every", "nonfinite_limit"):
        if getattr(tc, key) < 0:
            raise ValueError(f"{key} must be >= 0 (0: off), got {getattr(tc, key)}")
    if not (tc.ckpt_last_minutes >= 0 and tc.ckpt_last_minutes < float("inf")):
        raise ValueError(f"ckpt_last_minutes must be a finite number >= 0 (0: off), got {tc.ckpt_last_minutes}")
    if not (tc.max_minutes >= 0 and tc.max_minutes < float("inf")):
        raise ValueError(f"max_minutes must be a finite number >= 0 (0: off), got {tc.max_minutes}")
    if tc.num_threads is not None and tc.num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {tc.num_threads}")


@dataclass
class Resolved:
    """A validated run config."""

    method_name: str
    method_cls: type
    method: Any
    world_name: str
    world_cls: type
    world: Any
    rewards: list[tuple[str, type, Any, float]]
    trainer: TrainerConfig
    judges: list[tuple[str, type, Any, float]] = dataclasses.field(default_factory=list)
    monitor: Any = None
    roles: RolesConfig = dataclasses.field(default_factory=RolesConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "method": {"name": self.method_name, **to_dict(self.method)},
            "world": {"name": self.world_name, **to_dict(self.world)},
            "roles": to_dict(self.roles),
            "rewards": [{"name": n, "weight": w, **to_dict(c)} for n, _, c, w in self.rewards],
            "trainer": to_dict(self.trainer),
        }
        if self.judges:  # judge rewards + reward-hacking monitor (fewstep_rl.eval.monitor); absent when unused
            out["judges"] = [{"name": n, "weight": w, **to_dict(c)} for n, _, c, w in self.judges]
            out["monitor"] = to_dict(self.monitor)
        return out


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict (creating levels)."""
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(unknown_key_message("<config>", parts[0], list(SECTIONS)).replace("'<config>.", "'"))
    node = cfg
    for p in parts[:-1]:
        if p.isdigit() and isinstance(node, list):
            node = node[int(p)]
            continue
        node = node.setdefault(p, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"cannot set '{key}': no such list index")
        node[int(last)] = value
    else:
        node[last] = value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping with sections {', '.join(SECTIONS)}")
    return data


def preset_path(method: str, world: str) -> Path | None:
    """The packaged preset ``configs/<method>/<world>.yaml`` when it exists, else one a plugin ships under the
    ``fewstep_rl.presets`` entry-point group (:func:`fewstep_rl.config.plugin_preset`)."""
    try:
        p = resources.files("fewstep_rl.configs").joinpath(method, f"{world}.yaml")
    except ModuleNotFoundError:
        p = None
    if p is None or not p.is_file():
        p = plugin_preset(method, world)
    return Path(str(p)) if p is not None and p.is_file() else None


def resolve(
    method: str | None, world: str | None = None, configs: tuple[str, ...] = (), overrides: Mapping[str, Any] = (),
    use_preset: bool = True, raw: dict | None = None,
) -> Resolved:
    """Merge presets, files and overrides, then validate every section (raises :class:`ConfigError`)."""
    merged: dict = {}
    for c in configs:
        merged = deep_merge(merged, load_yaml(c))
    for k, v in dict(overrides).items():
        set_dotted(merged, k, v)
    if raw is not None:
        merged = deep_merge(raw, merged)
    method = method or (merged.get("method") or {}).get("name")
    if not method:
        raise ConfigError(f"no method given: use --method NAME (installed: {', '.join(registry.names('methods'))})")
    world = world or (merged.get("world") or {}).get("name") or DEFAULT_WORLD
    method_cls = registry.load("methods", method)
    world_cls = registry.load("worlds", world)
    if use_preset and raw is None and (p := preset_path(getattr(method_cls, "name", method), world)) is not None:
        merged = deep_merge(load_yaml(p), merged)
    elif use_preset and raw is None:
        import sys

        hint = getattr(world_cls, "missing_preset_hint", "")
        print(f"note: no preset for method {method!r} on world {world!r} (configs/{method}/{world}.yaml): the method's "
              f"defaults apply{'; ' + hint if hint else ''}", file=sys.stderr)
    for key in merged:
        if key not in SECTIONS:
            raise ConfigError(unknown_key_message("<config>", key, list(SECTIONS)).replace("'<config>.", "'"))
    msec = dict(merged.get("method") or {})
    if raw is not None:  # a checkpoint's recorded config may predate a rename: upgrade it quietly
        msec = upgrade_renamed(msec, method_cls.Config)
    if msec.pop("name", method) != method:
        raise ConfigError(f"config says method.name={merged['method']['name']!r} but --method is {method!r}")
    wsec = dict(merged.get("world") or {})
    if wsec.pop("name", world) != world:
        raise ConfigError(f"config says world.name={merged['world']['name']!r} but --world is {world!r}")
    rsec = legacy_roles(wsec, merged.get("roles"), quiet=raw is not None)
    method_cfg = build(method_cls.Config, msec, "method")
    world_cfg = build(world_cls.Config, wsec, "world")
    roles_cfg = resolve_roles(rsec, world_cls)
    trainable = tuple(getattr(method_cls, "trainable_roles", ()))
    try:
        check_optim_roles(method_cfg, trainable)
    except ValueError as e:
        raise ConfigError(f"'method': {e}") from None
    try:
        roles_cfg.check_checkpointed_roles(trainable, method)
    except ValueError as e:
        raise ConfigError(f"'roles': {e}") from None
    trainer_cfg = build(TrainerConfig, merged.get("trainer"), "trainer")
    rewards = resolve_rewards(merged.get("rewards"), world_cls, world_cfg)
    judges, monitor = resolve_judges(merged, world_cls, world_cfg)
    return Resolved(method, method_cls, method_cfg, world, world_cls, world_cfg, rewards, trainer_cfg, judges, monitor,
                    roles_cfg)


def upgrade_renamed(section: dict, cls: type) -> dict:
    """``section`` (a checkpoint's recorded config section of ``cls``) with every retired key that ``cls.RENAMED``
    maps to new dotted key(s) moved there — e.g. ``lr`` → ``optim.lr``, rtdmd's ``grad_clip`` → ``optim.grad_clip``
    and ``optim_stage2.grad_clip`` — so runs recorded before a rename still resume, evaluate and export. A new key the
    config also gives (a later override) keeps its value; an old null ("inherit") is dropped where the class has no
    default to override. Retired *values* (``"key=value"`` entries) are not upgraded: they still fail with the message
    that names the new setting. A user's own config is never upgraded (:func:`fewstep_rl.config.build` rejects its
    old keys with the new name)."""
    import copy

    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    fields = set(field_types(cls))
    try:
        defaults = to_dict(cls())
    except (TypeError, ValueError):  # a class without defaults for every field
        defaults = {}
    out = copy.deepcopy(section)
    for old in [k for k in out if k not in fields and k in renamed]:
        value = out.pop(old)
        for target in renamed[old].split(","):
            *path, last = target.split(".")
            default: Any = defaults
            for part in path + [last]:
                default = default.get(part) if isinstance(default, dict) else None
            if value is None and default is None:
                continue
            node = out
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"recorded config: cannot move '{old}' to '{target}': '{part}' is not a section")
            node.setdefault(last, copy.deepcopy(value))
    return out


def legacy_roles(wsec: dict, roles: Any, quiet: bool = False) -> Any:
    """Move the pre-``roles`` keys ``world.roles_mode|lora_rank|lora_alpha|lora_targets`` (removed from ``wsec``)
    into a copy of the ``roles`` section. A key given both ways with different values is an error, except in a
    checkpoint's recorded config (``quiet``), where the ``roles`` key (a later override) wins."""
    old = {k: wsec.pop(k) for k in list(wsec) if k in LEGACY_WORLD_KEYS}
    if not old:
        return roles
    if roles is not None and not isinstance(roles, dict):
        raise ConfigError(f"'roles': expected a mapping, got {roles!r}")
    rsec = dict(roles or {})
    for k, v in old.items():
        new = LEGACY_WORLD_KEYS[k]
        if new in rsec:
            if quiet or rsec[new] == v:
                continue
            raise ConfigError(f"'world.{k}' and 'roles.{new}' are the same setting; give only roles.{new}")
        rsec[new] = v
        if not quiet:
            import sys

            print(f"note: world.{k} is now roles.{new}", file=sys.stderr)
    return rsec


def resolve_roles(rsec: Any, world_cls: type) -> RolesConfig:
    """The ``roles`` section over the world's defaults, checked by the world (raises :class:`ConfigError`)."""
    if rsec is not None and not isinstance(rsec, dict):
        raise ConfigError(f"'roles': expected a mapping, got {rsec!r}")
    roles = build(RolesConfig, {**getattr(world_cls, "roles_defaults", {}), **(rsec or {})}, "roles")
    check = getattr(world_cls, "check_roles", None)
    if check is not None:
        try:
            check(roles)
        except ValueError as e:
            raise ConfigError(f"'roles': {e}") from None
    return roles


def resolve_judges(merged: Mapping, world_cls: type, world_cfg: Any) -> tuple[list, Any]:
    """The ``judges`` reward list (never handed to the method) and the ``monitor`` section (needs judges)."""
    from fewstep_rl.eval.monitor import MonitorConfig

    specs = merged.get("judges")
    if specs in (None, []):
        if merged.get("monitor"):
            raise ConfigError("'monitor' needs judge rewards: add a 'judges' list, e.g. judges: [{name: gold}]")
        return [], None
    return resolve_rewards(specs, world_cls, world_cfg), build(MonitorConfig, merged.get("monitor"), "monitor")


def resolve_rewards(specs: Any, world_cls: type, world_cfg: Any) -> list[tuple[str, type, Any, float]]:
    """Validate reward specs (default: the world's default rewards)."""
    if specs is None:
        try:
            specs = world_cls(world_cfg).default_rewards()
        except (ValueError, OSError) as e:
            raise ConfigError(f"world: {e}") from None
    if not isinstance(specs, list):
        raise ConfigError("'rewards' must be a list of {name: ..., weight: ..., <reward keys>}")
    rewards = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ConfigError(f"'rewards[{i}]' must be a mapping like {{name: linear, weight: 1.0}}, got {spec!r}")
        spec = dict(spec)
        if "name" not in spec:
            raise ConfigError(f"'rewards[{i}]' needs a name (installed: {', '.join(registry.names('rewards'))})")
        name = spec.pop("name")
        weight = spec.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"'rewards[{i}].weight': expected a number, got {weight!r}")
        cls = registry.load("rewards", name)
        rewards.append((name, cls, build(cls.Config, spec, f"rewards[{i}]"), float(weight)))
    return rewards


def resolve_world(world: str | None, configs: tuple[str, ...] = (), overrides: Mapping[str, Any] = ()) -> tuple[Any, Any]:
    """(world, MultiReward) from ``world``/``rewards`` sections only (for ``--teacher`` sampling and evaluation)."""
    merged: dict = {}
    for c in configs:
        merged = deep_merge(merged, load_yaml(c))
    for k, v in dict(overrides).items():
        set_dotted(merged, k, v)
    for key in merged:
        if key not in ("world", "roles", "rewards"):
            raise ConfigError(f"with --teacher only 'world', 'roles' and 'rewards' keys apply, got '{key}'")
    wsec = dict(merged.get("world") or {})
    name = world or wsec.pop("name", None) or DEFAULT_WORLD
    wsec.pop("name", None)
    world_cls = registry.load("worlds", name)
    rsec = legacy_roles(wsec, merged.get("roles"))
    world_cfg = build(world_cls.Config, wsec, "world")
    roles_cfg = resolve_roles(rsec, world_cls)
    w = world_cls(world_cfg)
    w.roles_cfg = roles_cfg
    return w, _multi_reward(resolve_rewards(merged.get("rewards"), world_cls, world_cfg), w)


def build_rewards(resolved: Resolved, world: Any) -> Any:
    return _multi_reward(resolved.rewards, world)


def _multi_reward(specs: list[tuple[str, type, Any, float]], world: Any) -> Any:
    from fewstep_rl.rewards import MultiReward

    rewards = []
    for name, cls, cfg, _ in specs:
        try:
            rewards.append(cls(cfg))
        except (OSError, ValueError, KeyError) as e:  # missing weights, bad files: one clear line
            raise ConfigError(f"reward {name!r}: {e}") from None
    for r in rewards:
        check = getattr(world, "check_reward", None)
        if check is not None:
            try:
                check(r)
            except ValueError as e:
                raise ConfigError(f"reward {r.name!r}: {e}") from None
    return MultiReward(rewards, [w for *_, w in specs])


def build_method(resolved: Resolved) -> Any:
    """World, rewards and the method module (roles are built later, in ``configure_model``)."""
    try:
        world = resolved.world_cls(resolved.world)
    except (ValueError, OSError) as e:
        raise ConfigError(f"world {resolved.world_name!r}: {e}") from None
    world.roles_cfg = resolved.roles
    rewards = build_rewards(resolved, world)
    try:
        return resolved.method_cls(
            resolved.method, world, rewards, seed=resolved.trainer.seed, run_config=resolved.to_dict()
        )
    except ValueError as e:
        raise ConfigError(f"method {resolved.method_name!r}: {e}") from None


def default_run_dir(resolved: Resolved) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{resolved.method_name}-{resolved.world_name}-{stamp}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fewstep-rl", "torch", "lightning", "diffusers", "transformers", "peft", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def write_run_files(run_dir: Path, resolved: Resolved) -> None:
    from fewstep_rl.ckpt_io import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    atomic_write_text(run_dir / "versions.json", json.dumps(versions(), indent=2))


def reliability_parts(tc: TrainerConfig, run_dir: Path, resumed: bool = False) -> tuple[list, Any, list]:
    """(callbacks, logger, plugins) that make a run crash-safe: scheduled ``last.ckpt`` + signal handling + the
    non-finite guard (:mod:`fewstep_rl.guards`), a CSV logger that appends on resume (:mod:`fewstep_rl.rundir`),
    atomic hashed checkpoint files (:mod:`fewstep_rl.ckpt_io`; FSDP2 keeps its sharded writer)."""
    from fewstep_rl.ckpt_io import SafeCheckpointIO
    from fewstep_rl.guards import SafetyCallback
    from fewstep_rl.rundir import csv_logger

    safety = SafetyCallback(run_dir, tc.max_steps, tc.ckpt_last_every, tc.ckpt_last_minutes, tc.nonfinite_limit,
                            guard_grads=not str(tc.precision).startswith("16"), resumed=resumed)
    plugins = [] if tc.strategy == "fsdp2" else [SafeCheckpointIO()]
    return [safety], csv_logger(run_dir), plugins


_FRAMEWORK_NOISE = ("GPU available", "TPU available", "HPU available", "💡 Tip", "`weights_only` was not set")


class _DropFrameworkNoise:
    """Logging filter: drops Lightning's start-up inventory (GPU/TPU/HPU availability), its advertising tip and the
    ``weights_only`` notice — lines a user of this CLI cannot act on. Every other record passes."""

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).lstrip().startswith(_FRAMEWORK_NOISE)


def quiet_framework() -> None:
    """Silence framework output a user cannot act on (idempotent): see :class:`_DropFrameworkNoise`, plus
    Lightning's own deprecation warning about torch's ``LeafSpec`` (raised inside Lightning, not by our code) and its
    "Found N module(s) in eval mode" notice (frozen roles — teacher, reward models — are in eval mode on purpose)."""
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector",
                 "lightning.fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropFrameworkNoise) for f in log.filters):
            log.addFilter(_DropFrameworkNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def build_trainer(tc: TrainerConfig, run_dir: Path, callbacks: list, safety: bool = True) -> Any:
    import lightning as L

    quiet_framework()

    from fewstep_rl.eval.callbacks import progress_bar

    if tc.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy: Any = DDPStrategy(find_unused_parameters=True)
    elif tc.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=tc.devices * tc.num_nodes, tensor_parallel_size=1)
    else:
        strategy = "auto"
    safe_callbacks, logger, plugins = reliability_parts(tc, run_dir)
    callbacks = [StopAt(tc.max_steps), *(safe_callbacks if safety else []), *callbacks]
    if tc.progress_bar:
        callbacks = [*callbacks, progress_bar(tc.max_steps, max(1, tc.log_every))]
    return L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=strategy,
        precision=tc.precision,
        max_epochs=-1, max_steps=-1, logger=make_loggers(tc.logger, run_dir, logger), plugins=plugins,
        callbacks=callbacks, enable_progress_bar=tc.progress_bar, log_every_n_steps=tc.log_every,
        default_root_dir=str(run_dir), num_sanity_val_steps=0, enable_model_summary=False,
        enable_checkpointing=False,
        max_time=_dt.timedelta(minutes=tc.max_minutes) if tc.max_minutes else None,
    )


def make_loggers(kind: str, run_dir: Path, csv: Any) -> list:
    """CSV (``metrics.csv``, always: ``csv``, the logger that appends on resume) plus TensorBoard (``tensorboard/``)
    or W&B offline (``wandb/``) for ``kind``."""
    loggers: list = [csv]
    extra = {"tensorboard": "tensorboard", "wandb": "wandb"}
    if kind in extra:
        import importlib.util

        if importlib.util.find_spec(extra[kind]) is None:
            raise ConfigError(f"trainer.logger {kind!r} needs the {extra[kind]} package: "
                              f"pip install 'fewstep-rl[logging]' (or choose trainer.logger csv)")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    elif kind == "wandb":
        import os

        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")  # never reaches a server; `wandb sync` uploads later
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(WandbLogger(save_dir=str(run_dir), offline=True, project="fewstep-rl", name=Path(run_dir).name))
    return loggers


def monitor_callbacks(resolved: Resolved, run_dir: Path, world: Any) -> list:
    """The reward-hacking monitor of a run with judges (``[]`` without)."""
    if not resolved.judges:
        return []
    from fewstep_rl.eval.callbacks import MonitorCallback

    tc = resolved.trainer
    judges = _multi_reward(resolved.judges, world)
    every = resolved.monitor.every or tc.eval_every
    return [MonitorCallback(judges, resolved.monitor, Path(run_dir), every, tc.max_steps)]


def assemble(resolved: Resolved, run_dir: Path, callbacks: list, run_callback: bool = True) -> tuple[Any, Any, Any]:
    """(method, prompt data module, Trainer) of a resolved config; ``run_callback`` adds evaluation/checkpoints."""
    from fewstep_rl.data.prompts import PromptDataModule
    from fewstep_rl.eval.callbacks import RunCallback

    tc = resolved.trainer
    method = build_method(resolved)
    method.max_iterations = tc.max_steps
    method.reward_overlap = tc.reward_overlap
    dm = PromptDataModule(method.world.train_prompts, *method.batch_spec(), seed=tc.seed)
    if run_callback:
        callbacks = [RunCallback(Path(run_dir), tc.eval_every, tc.eval_samples, tc.ckpt_every, tc.seed, tc.max_steps),
                     *callbacks]
    callbacks = [*callbacks, *monitor_callbacks(resolved, Path(run_dir), method.world)]
    return method, dm, build_trainer(tc, Path(run_dir), callbacks, safety=run_callback)


def _stop_at_cls() -> type:
    import lightning as L

    class StopAt(L.Callback):
        """Stop after ``max_steps`` iterations (prompt batches).

        The prompt stream is infinite and the run length is counted in iterations, not epochs or optimiser steps:
        a checkpoint written at the end of a run then resumes into a longer run (with an epoch-based stop the
        restored loop would already be finished).
        """

        def __init__(self, max_steps: int) -> None:
            self.max_steps = max_steps

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if int(batch["pos"]) + 1 >= self.max_steps:
                trainer.should_stop = True

    return StopAt


def StopAt(max_steps: int) -> Any:  # noqa: N802 - a factory that keeps lightning out of import time
    return _stop_at_cls()(max_steps)
