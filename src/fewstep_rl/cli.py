"""The ``fewstep-rl`` command line, with Lightning's conventions.

::

    fewstep-rl fit --method NAME [--world NAME] [--config FILE ...] [--a.b.c VALUE ...] [--ckpt_path C]
                   [--allow_changes KEY,...] [--overwrite] [--print_config] [--help]
    fewstep-rl sample (--ckpt C | --teacher [--world NAME]) --n N (--prompt P ... | --prompts FILE) [--steps S]
                   [--guidance G] [--seed S] --out F
    fewstep-rl eval (--ckpt C | --teacher [--world NAME]) --n N [--rewards a,b] [--steps S] [--guidance G]
    fewstep-rl eval --paired CKPT ... [--teacher] [--labels a,b] [--n N] [--rewards a,b] [--nfe] [--seed S]
    fewstep-rl export --ckpt C --out DIR [--merge] [--role ema|generator]
    fewstep-rl compare CONFIG.yaml [--jobs N] [--out DIR] [--print_config]
    fewstep-rl list methods|rewards|worlds
    fewstep-rl reward-server (--config FILE | --rewards a,b) [--host H] [--port P] [--device D] [--max_batch N]
    fewstep-rl world shapes build [--seed S] [--teacher_steps N] [--proxy_steps N] [--calibration_steps N] [--minutes M] [--out DIR]
    fewstep-rl world glyphs build [--seed S] [--teacher_steps N] [--batch B] [--minutes M] [--out DIR] [--work DIR]
    fewstep-rl validate --method M [--worlds N] [--seed S] [--family all|2d|8d] [--reward auto|mixed|linear|region]
                   [--steps N] [--jobs J] [--eval_samples N] [--config FILE ...] [--out DIR]
    fewstep-rl plan --method M --world sd3 --arch sd3.5-medium [--roles lora|full] [--precision bf16]
                   [--devices N --strategy fsdp2] [--memory GB]

Departure from architecture.md §3 (which names LightningCLI): the parser is our own, over typed dataclasses,
because the public config layout (``method``/``world``/``rewards``/``trainer`` sections, ``--method.KEY``
overrides, errors that name the closest valid key with exit code 2 before any model is built) does not fit
LightningCLI's ``model``/``data`` namespaces. It keeps Lightning's conventions: ``fit`` subcommand, repeatable
``--config``, dotted overrides, ``--print_config``, ``--ckpt_path`` to resume, per-method ``--help``.
Values of overrides are parsed as YAML (``--world.means "[[0, 0]]"``, ``--method.guidance null``).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from fewstep_rl import registry
from fewstep_rl.config import ConfigError, help_lines

USAGE = __doc__.split("::")[1].split("Departure")[0]


class UsageError(ConfigError):
    pass


def _parse(argv: list[str], flags: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``argv`` into known flags (``flags``: name → 'value' | 'list' | 'bool') and dotted overrides."""
    opts: dict[str, Any] = {k: ([] if v == "list" else None) for k, v in flags.items()}
    over: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok in ("-h", "--help"):
            opts["help"] = True
            continue
        if not tok.startswith("--"):
            raise UsageError(f"unexpected argument {tok!r}")
        key, eq, val = tok[2:].partition("=")
        if key in flags and flags[key] == "bool":
            opts[key] = True
            continue
        if not eq:
            if i >= len(argv):
                raise UsageError(f"--{key} needs a value")
            val = argv[i]
            i += 1
        if key in flags:
            if flags[key] == "list":
                opts[key].append(val)
            else:
                opts[key] = val
        elif "." in key or key in ("rewards", "judges"):  # dotted override, or a whole rewards/judges list
            try:
                over[key] = yaml.safe_load(val) if val != "" else ""
            except yaml.YAMLError:
                over[key] = val
            if key in ("rewards", "judges") and isinstance(over[key], str):  # --rewards gold,proxy: default configs
                over[key] = [{"name": n.strip()} for n in over[key].split(",") if n.strip()]
        else:
            from fewstep_rl.config import closest

            best = closest(key, list(flags))
            hint = f"; did you mean --{best}?" if best else ""
            raise UsageError(f"unknown option --{key}{hint} (options: {', '.join('--' + f for f in flags)})")
    return opts, over


def _num(opts: dict, key: str, kind: type = int, default: Any = None, minimum: float | None = None) -> Any:
    """A numeric option, with a clear error for a bad value (non-finite numbers and values below ``minimum``)."""
    if opts.get(key) is None:
        return default
    try:
        val = kind(opts[key])
    except ValueError:
        raise UsageError(f"--{key} expects {'an integer' if kind is int else 'a number'}, got {opts[key]!r}") from None
    if kind is float and not math.isfinite(val):
        raise UsageError(f"--{key} expects a finite number, got {opts[key]!r}")
    if minimum is not None and val < minimum:
        raise UsageError(f"--{key} must be >= {minimum:g}, got {opts[key]!r}")
    return val


# ---------------------------------------------------------------------------------------------------------- fit
FIT_FLAGS = {"method": "value", "world": "value", "config": "list", "ckpt_path": "value", "print_config": "bool",
             "help": "bool", "no_preset": "bool", "overwrite": "bool", "allow_changes": "value"}


def _method_help(method: str | None, world: str | None) -> str:
    from fewstep_rl.eval.monitor import MonitorConfig
    from fewstep_rl.roles.config import RolesConfig
    from fewstep_rl.run import DEFAULT_WORLD, TrainerConfig, preset_path

    if method is None:
        return f"usage:{USAGE}\ninstalled methods: {', '.join(registry.names('methods'))}"
    cls = registry.load("methods", method)
    world = world or DEFAULT_WORLD
    wcls = registry.load("worlds", world)
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    lines = [f"usage: fewstep-rl fit --method {method} [--world NAME] [--config FILE ...] [--KEY VALUE ...]", "",
             f"{method}: {doc}"]
    if cls.paper:
        lines.append(f"paper: {cls.paper}")
    p = preset_path(getattr(cls, "name", method), world)
    lines += ["", f"preset for world {world!r}: {p if p else '(none; dataclass defaults)'}", "",
              f"method options ({cls.Config.__name__}):", *help_lines(cls.Config, "method"), "",
              f"world options ({world}):", *help_lines(wcls.Config, "world"), "",
              f"roles options (defaults of world {world!r}: {getattr(wcls, 'roles_defaults', {}) or 'none'}):",
              *help_lines(RolesConfig, "roles"), "",
              "trainer options:", *help_lines(TrainerConfig, "trainer"), "",
              "rewards: a list, e.g. --rewards '[{name: linear, w: [1.0, 0.0]}]'; "
              f"installed: {', '.join(registry.names('rewards'))}",
              "judges: rewards the method never sees, for the reward-hacking monitor, e.g. --judges gold", "",
              "monitor options (active with judges):", *help_lines(MonitorConfig, "monitor")]
    return "\n".join(lines)


def cmd_fit(argv: list[str]) -> int:
    opts, over = _parse(argv, FIT_FLAGS)
    if opts.get("help"):
        print(_method_help(opts["method"], opts["world"]))
        return 0
    from fewstep_rl.run import preset_path, resolve

    resolved = resolve(opts["method"], opts["world"], tuple(opts["config"]), over, use_preset=not opts["no_preset"])
    method, world = getattr(resolved.method_cls, "name", resolved.method_name), resolved.world_name
    if not opts["no_preset"] and not opts["config"] and preset_path(method, world) is None:
        print(f"note: no preset configs/{method}/{world}.yaml (no published setting of this method for this world): "
              f"the method's defaults apply; see fewstep-rl fit --method {method} --world {world} --help",
              file=sys.stderr)
    if opts["print_config"]:
        print(yaml.safe_dump(resolved.to_dict(), sort_keys=False), end="")
        return 0
    if opts["ckpt_path"] and not Path(opts["ckpt_path"]).is_file():
        raise UsageError(f"checkpoint file not found: {opts['ckpt_path']}")
    if opts["allow_changes"] and not opts["ckpt_path"]:
        raise UsageError("--allow_changes only applies when resuming with --ckpt_path")
    return _fit(resolved, opts["ckpt_path"], overwrite=bool(opts["overwrite"]), allow_changes=opts["allow_changes"])


def _fit(resolved: Any, ckpt_path: str | None, overwrite: bool = False, allow_changes: str | None = None) -> int:
    """Validate (config, checkpoint, run directory, world), then lock the run directory, write it and train."""
    import torch

    from fewstep_rl.eval.callbacks import RunCallback
    from fewstep_rl.guards import Interrupted, dumps
    from fewstep_rl.resume import plan_resume
    from fewstep_rl.run import assemble, default_run_dir, versions
    from fewstep_rl.rundir import check_run_dir, is_launched_rank, open_run_dir

    tc = resolved.trainer
    plan = plan_resume(ckpt_path, resolved, allow_changes) if ckpt_path else None
    run_dir = Path(tc.run_dir or os.environ.get("FEWSTEP_RUN_DIR") or default_run_dir(resolved))
    rank0 = not is_launched_rank()
    if rank0:
        check_run_dir(run_dir, ckpt_path, overwrite, plan.config if plan else None)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    method, dm, trainer = assemble(resolved, run_dir, [])  # builds the world: validates its files
    lock = None
    if rank0:
        lock = open_run_dir(run_dir, resolved.to_dict(), versions(), ckpt_path, plan.done if plan else None,
                            overwrite, plan.changes if plan else None, plan.config if plan else None)
    os.environ["FEWSTEP_RUN_DIR"] = str(run_dir)  # child ranks of the subprocess launcher share the directory
    cb = next(c for c in trainer.callbacks if isinstance(c, RunCallback))
    safety = next(c for c in trainer.callbacks if type(c).__name__ == "SafetyCallback")
    from fewstep_rl.backbones.base import BackboneLoadError
    from fewstep_rl.rewards.remote import RewardServerError

    try:
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    except BackboneLoadError as e:  # raised while building roles in configure_model: one clear line
        raise ConfigError(str(e)) from None
    except Interrupted as e:
        if trainer.is_global_zero:
            hint = f"; resume with --ckpt_path {e.saved} --trainer.run_dir {run_dir}" if e.saved else ""
            print(f"{e}{hint}", file=sys.stderr)
        return e.exit_code
    except RewardServerError as e:  # a reward server died or answered garbage: keep the progress, stop
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        print(f"error: {e}\ncheckpoint: {ckpt} (resume with --ckpt_path {ckpt})", file=sys.stderr)
        return 3
    except Exception as e:
        if safety.phase == "final" and trainer.is_global_zero:
            print(f"error: the final evaluation failed ({type(e).__name__}: {e}); the trained state is saved in "
                  f"{safety.last_path} (evaluate it with: fewstep-rl eval --ckpt {safety.last_path})", file=sys.stderr)
        raise
    finally:
        if lock is not None:
            lock.release()
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    if trainer.is_global_zero:
        print(f"run directory: {run_dir}", file=sys.stderr)
        print(dumps({"run_dir": str(run_dir), **cb.final}))
    return 0


# ---------------------------------------------------------------------------------------------------------- load
def load_checkpoint(path: str, device: str = "cpu") -> Any:
    """Rebuild the method of a checkpoint (config, roles, trainable weights) for sampling or evaluation."""
    from fewstep_rl.ckpt_io import load_checkpoint as load_verified
    from fewstep_rl.run import build_method, resolve

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint file not found: {path}")
    ckpt = load_verified(p, map_location=device)
    state = ckpt.get("fewstep") if isinstance(ckpt, dict) else None
    if not state:
        raise UsageError(f"{path} is not a fewstep-rl checkpoint (no 'fewstep' section)")
    resolved = resolve(None, raw=state["config"])
    method = build_method(resolved)
    from fewstep_rl.backbones.base import BackboneLoadError

    try:
        method.configure_model()
    except BackboneLoadError as e:
        raise UsageError(str(e)) from None
    try:
        method.on_load_checkpoint(ckpt)
    except (ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {path}: {e}") from None
    method.load_state_dict(ckpt["state_dict"], strict=False)
    method.to(device).eval()
    return method


def _teacher(opts: dict, over: dict) -> tuple[Any, Any, Any]:
    """(world, backbone, resolved) for ``--teacher`` runs (no method, frozen base)."""
    from fewstep_rl.backbones.base import BackboneLoadError
    from fewstep_rl.run import resolve_world

    world, rewards = resolve_world(opts.get("world"), tuple(opts.get("config") or ()), over)
    try:
        backbone = world.build_backbone()
    except BackboneLoadError as e:
        raise UsageError(str(e)) from None
    backbone.eval()
    return world, backbone, rewards


def _source(opts: dict, over: dict) -> tuple[Any, Any, Any, Any]:
    """(world, rewards, method or None, generate(prompts) -> samples) for ``--teacher`` or ``--ckpt``."""
    import torch

    from fewstep_rl.eval.generate import generate
    from fewstep_rl.sampling import Transition, sigma_grid

    g = torch.Generator().manual_seed(_num(opts, "seed", int, 0, minimum=0))
    steps = _num(opts, "steps", int, minimum=1)
    if opts.get("teacher"):
        world, backbone, rewards = _teacher(opts, over)
        guidance = _num(opts, "guidance", float, float(world.teacher_guidance))
        sigmas = sigma_grid(steps or 32, shift=_num(opts, "shift", float, 1.0, minimum=1e-12))
        return world, rewards, None, lambda prompts: generate(
            backbone, "teacher", prompts, g, sigmas, Transition("euler"), guidance
        )
    if over:
        raise UsageError(f"overrides {sorted(over)} are only accepted with --teacher")
    if not opts.get("ckpt"):
        raise UsageError("give --ckpt FILE (a fewstep-rl checkpoint) or --teacher")
    method = load_checkpoint(opts["ckpt"])
    guidance = _num(opts, "guidance", float, 1.0)
    return method.world, method.eval_rewards, method, lambda prompts: method.generate(
        prompts, g, steps=steps, role=opts.get("role"), guidance=guidance
    )


SAMPLE_FLAGS = {"ckpt": "value", "teacher": "bool", "world": "value", "config": "list", "n": "value",
                "prompt": "list", "prompts": "value", "steps": "value", "guidance": "value", "seed": "value",
                "out": "value", "role": "value", "shift": "value", "help": "bool"}


def cmd_sample(argv: list[str]) -> int:
    opts, over = _parse(argv, SAMPLE_FLAGS)
    if opts.get("help"):
        print(f"usage:{USAGE}")
        return 0
    if not opts.get("out"):
        raise UsageError("sample needs --out (a .npy file for point worlds, a folder for image worlds)")
    prompts = list(opts["prompt"])
    if opts.get("prompts"):
        pf = Path(opts["prompts"])
        if not pf.is_file():
            raise UsageError(f"prompt file not found: {pf}")
        from_file = [line.strip() for line in pf.read_text().splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"prompt file {pf} holds no prompts (give one prompt per line)")
        prompts += from_file
    n = _num(opts, "n", int, max(len(prompts), 1), minimum=1)
    if not prompts:
        raise UsageError("give --prompt P (repeatable) or --prompts FILE")
    from fewstep_rl.eval.generate import cycle_prompts
    from fewstep_rl.guards import check_prompts, dumps

    world, _, _, gen = _source(opts, over)
    check_prompts(world, prompts)
    prompts = cycle_prompts(prompts, n)
    samples = gen(prompts)
    world.save_samples(samples, prompts, Path(opts["out"]))
    print(dumps({"out": opts["out"], "n": n, "shape": list(samples.shape)}))
    return 0


EVAL_FLAGS = {**{k: v for k, v in SAMPLE_FLAGS.items() if k not in ("out", "prompt", "prompts")}, "rewards": "value",
              "beta": "value"}


def cmd_eval(argv: list[str]) -> int:
    if "--paired" in argv:
        from fewstep_rl.eval.paired_cli import cmd_paired

        return cmd_paired(argv)
    opts, over = _parse(argv, EVAL_FLAGS)
    if opts.get("help"):
        print(f"usage:{USAGE}")
        return 0
    from fewstep_rl.eval.evaluate import score_samples
    from fewstep_rl.eval.generate import cycle_prompts
    from fewstep_rl.rewards import MultiReward

    n = _num(opts, "n", int, 1024, minimum=1)
    world, rewards, method, gen = _source(opts, over)
    prompts = cycle_prompts(world.eval_prompts, n)
    samples = gen(prompts)
    if opts.get("rewards"):
        rewards = MultiReward([_reward_by_name(name.strip(), rewards) for name in opts["rewards"].split(",")])
    beta = _num(opts, "beta", float, getattr(method.cfg, "beta", None) if method else None)
    import torch

    g = torch.Generator().manual_seed(1 + _num(opts, "seed", int, 0))
    metrics = score_samples(world, rewards, samples, prompts, beta, g)
    from fewstep_rl.guards import dumps

    print(dumps({"n": n, **metrics}))
    return 0


def _reward_by_name(name: str, configured: Any) -> Any:
    """A configured reward of that name when the run has one, else the reward with its default config."""
    for r in getattr(configured, "rewards", []):
        if r.name == name:
            return r
    cls = registry.load("rewards", name)
    return cls(cls.Config())


# ---------------------------------------------------------------------------------------------------------- list
def cmd_list(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in registry.GROUPS:
        raise UsageError(f"usage: fewstep-rl list {'|'.join(registry.GROUPS)}")
    for name, target, dist in registry.describe(argv[0]):
        print(f"{name:16s} {target}  ({dist})")
    return 0


# ---------------------------------------------------------------------------------------------------------- world
WORLD_FLAGS = {"seed": "value", "teacher_steps": "value", "proxy_steps": "value", "out": "value", "minutes": "value",
               "calibration_steps": "value", "skip_teacher": "bool", "skip_proxy": "bool", "help": "bool"}


GLYPHS_FLAGS = {"seed": "value", "teacher_steps": "value", "batch": "value", "out": "value", "work": "value",
                "minutes": "value", "help": "bool"}


def cmd_world(argv: list[str]) -> int:
    """``fewstep-rl world shapes|glyphs build``: retrain an embedded world's models and install them."""
    if argv[:2] == ["glyphs", "build"]:
        return cmd_world_glyphs(argv[2:])
    if len(argv) < 2 or argv[:2] != ["shapes", "build"]:
        raise UsageError("usage: fewstep-rl world shapes build [--seed S] [--teacher_steps N] [--proxy_steps N] "
                         "[--calibration_steps N] [--minutes M] [--out DIR] [--skip_teacher] [--skip_proxy]\n"
                         "       fewstep-rl world glyphs build [--seed S] [--teacher_steps N] [--batch B] [--minutes M] "
                         "[--out DIR] [--work DIR]")
    opts, over = _parse(argv[2:], WORLD_FLAGS)
    if over:
        raise UsageError(f"unexpected options {sorted(over)}")
    if opts.get("help"):
        print(cmd_world.__doc__)
        return 0
    from fewstep_rl.guards import dumps
    from fewstep_rl.worlds.shapes import proxy, teacher
    from fewstep_rl.worlds.shapes.world import ASSETS

    seed = _num(opts, "seed", int, 0, minimum=0)
    out = Path(opts["out"]) if opts.get("out") else ASSETS
    work = Path("runs") / "shapes-build"  # resumable training state; never inside the package
    if not opts.get("skip_proxy"):
        print(dumps({"proxy": proxy.train_proxy(out, seed=seed, steps=_num(opts, "proxy_steps", int, 1600, minimum=1))}))
    if not opts.get("skip_teacher"):
        res = teacher.train_teacher(work, seed=seed, steps=_num(opts, "teacher_steps", int, 10000, minimum=1),
                                    max_minutes=_num(opts, "minutes", float, minimum=0))
        teacher.export(work, out / "teacher")
        print(dumps({"teacher": res}))
    if not opts.get("skip_proxy") and _num(opts, "calibration_steps", int, 4000, minimum=0) > 0:
        from fewstep_rl.worlds.shapes import calibrate

        tdir = out / "teacher" if (out / "teacher" / "transformer").is_dir() else None  # None: the shipped one
        res = calibrate.calibrate_and_save(out, tdir, seed=seed,
                                           steps=_num(opts, "calibration_steps", int, 4000))
        print(dumps({"proxy_calibration": res}))
    return 0


def cmd_world_glyphs(argv: list[str]) -> int:
    """``fewstep-rl world glyphs build``: train (or resume) the glyphs teacher and install it.

    Training state lives in ``--work`` (default ``runs/glyphs-build``; ``train_state.pt``, ``train_log.csv``,
    ``eval.jsonl``), so an interrupted build resumes where it stopped; ``--minutes`` stops (and exports) early.
    The EMA teacher is written to ``--out`` (default: the package's ``worlds/glyphs/assets/teacher``).
    """
    opts, over = _parse(argv, GLYPHS_FLAGS)
    if over:
        raise UsageError(f"unexpected options {sorted(over)}")
    if opts.get("help"):
        print(cmd_world_glyphs.__doc__)
        return 0
    from fewstep_rl.guards import dumps
    from fewstep_rl.worlds.glyphs import teacher
    from fewstep_rl.worlds.glyphs.world import ASSETS

    work = Path(opts["work"]) if opts.get("work") else Path("runs") / "glyphs-build"
    out = Path(opts["out"]) if opts.get("out") else ASSETS / "teacher"
    res = teacher.train_teacher(work, seed=_num(opts, "seed", int, 0, minimum=0),
                                steps=_num(opts, "teacher_steps", int, teacher.SHIPPED_STEPS, minimum=1),
                                batch=_num(opts, "batch", int, 32, minimum=1), eval_n=64,
                                max_minutes=_num(opts, "minutes", float, minimum=0))
    teacher.export(work, out)
    print(dumps({"teacher": res, "out": str(out)}))
    return 0


def cmd_validate(argv: list[str]) -> int:
    from fewstep_rl.validate import main as validate_main

    return validate_main(argv, _parse)


def cmd_compare(argv: list[str]) -> int:
    from fewstep_rl.compare.runner import cmd_compare as run_compare

    return run_compare(argv)


def cmd_plan(argv: list[str]) -> int:
    """``fewstep-rl plan --method M --world sd3 --arch sd3.5-medium ...``: memory per role, largest batch."""
    from fewstep_rl.plan import cmd_plan as run_plan

    return run_plan(argv)


def cmd_export(argv: list[str]) -> int:
    """``fewstep-rl export --ckpt C --out DIR [--merge] [--role ema|generator]``: the generator for diffusers."""
    from fewstep_rl.export import cmd_export as run

    return run(argv)


def cmd_reward_server(argv: list[str]) -> int:
    from fewstep_rl.serve.server import cmd_reward_server as run

    return run(argv)


COMMANDS = {"fit": cmd_fit, "sample": cmd_sample, "eval": cmd_eval, "list": cmd_list, "world": cmd_world,
            "validate": cmd_validate, "compare": cmd_compare, "plan": cmd_plan,
            "reward-server": cmd_reward_server, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers reads this once at import: its per-load "Loading weights" bar would sit beside the training bar
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:{USAGE}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        from fewstep_rl.config import closest

        best = closest(cmd, list(COMMANDS))
        print(f"error: unknown command {cmd!r}" + (f"; did you mean {best!r}?" if best else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
