"""``fewstep-rl validate``: train one method on random, unseen, multimodal toy2d problems (issue 13, item 2).

::

    fewstep-rl validate --method M[,M2...] [--worlds N] [--seed S] [--family all|2d|8d] [--reward auto|mixed|linear|region]
                        [--steps N] [--jobs J] [--eval_samples N] [--config FILE ...] [--out DIR] [--only I,J]

``--only`` trains only the listed world indices (of the N); the summary is then over those. Several methods
(``--method crd,didr,rtdmd``) share one pool of ``--jobs`` worker processes, interleaved by world index, each with
its results in ``--out/<method>/``. Every world is :func:`fewstep_rl.worlds.toy2d_problems.make_problem` ``(S, i)``: its means/stds/weights/prompts
replace the ``world`` section, its reward the ``rewards`` list and its β ``method.beta``; everything else is the
method's packaged ``configs/<method>/toy2d.yaml`` preset (plus ``--config`` files, the same for every world: one
method-level setting, no per-world tuning). After training, ``eval_samples`` samples of the method's sampling role
(prompts ``p0``/``p1`` alternating) are scored by :func:`score_samples`:

* ``closure`` — reward-gap closure ``(E_samples r − E_teacher r)/(E_target r − E_teacher r)`` with the exact teacher
  and target means of :class:`~fewstep_rl.worlds.toy2d_problems.Problem` (1 = the target's reward exactly);
* ``energy_ratio`` — energy distance of the samples to an equal-size exact tilted-target set over the noise floor
  (the mean energy distance between two independent exact sets of that size, over 3 pairs; 1 = perfect);
* per prompt and component, the samples' mass (soft responsibilities, equal priors, the tilted target's component
  means) beside the target's closed-form mass and the teacher's; ``mass_tv`` = the largest total-variation distance
  between sample and target masses over the prompts, ``mode_closure`` = the fraction of the teacher→target mass move
  the samples made (least-squares projection over every prompt and component; 1 = all of it).

Rewards per method (``--reward auto``): methods whose training needs the reward's gradient (``didr`` with its exact
Diffused Reward Score, which has a closed form only for linear rewards; ``rtdmd``, whose β enters through the BP
branch; ``refl``, ``di_star``) are validated on the linear-reward worlds only; every other method on ``mixed``
worlds (even index linear, odd index region). So DIDR on region rewards is not validated here: its ``drs: drp``
proxy needs a differentiable reward and the box indicator has none.

Results: one line per world and a median/worst summary on stdout; ``results.json`` (problems, metrics, summary) and
``results.csv`` (one row per world) in ``--out`` (default ``runs/validate-<method>-<time>``), per-world run logs in
``--out/worlds/<name>/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fewstep_rl.config import ConfigError

GRADIENT_REWARD_METHODS = ("didr", "rtdmd", "refl", "di_star")
REWARD_DRIVEN = ("crd", "didr", "rtdmd", "tdm_r1", "flow_grpo", "nft", "refl", "di_star")
FLOOR_PAIRS = 3


def default_reward_kind(method: str) -> str:
    """``linear`` for methods that need the reward's gradient (see the module docstring), else ``mixed``."""
    return "linear" if method in GRADIENT_REWARD_METHODS else "mixed"


# ---------------------------------------------------------------------------------------------------------- metrics
def reward_values(problem: Any, x: Any) -> Any:
    """The problem's reward of points ``x`` (N, d), float64."""
    import torch

    x = x.double()
    spec = problem.reward
    if spec["name"] == "linear":
        return x @ torch.tensor(spec["w"], dtype=torch.float64) + float(spec.get("b", 0.0))
    lo = torch.tensor(spec["low"], dtype=torch.float64)
    hi = torch.tensor(spec["high"], dtype=torch.float64)
    inside = ((x >= lo) & (x <= hi)).all(dim=1)
    return inside.double() * float(spec.get("value", 1.0))


def score_samples(problem: Any, samples: Any, prompts: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Closure, energy / noise floor and per-component masses of ``samples`` (one per prompt) on ``problem``.

    The exact reference sets are drawn with ``torch.Generator().manual_seed(seed)``. See the module docstring.
    """
    import torch

    from fewstep_rl.eval.metrics import energy_distance
    from fewstep_rl.rewards.toy2d import LinearReward, RegionReward
    from fewstep_rl.worlds.toy2d import Toy2DWorld
    from fewstep_rl.worlds.toy2d_problems import component_responsibilities

    prompts = list(prompts)
    x = samples.detach().reshape(len(prompts), -1).double().cpu()
    world = Toy2DWorld({**problem.world_config(), "hidden": 8, "layers": 1})
    spec = {k: v for k, v in problem.reward.items() if k != "name"}
    reward = LinearReward(LinearReward.Config(**spec)) if problem.reward["name"] == "linear" else RegionReward(
        RegionReward.Config(**spec))
    g = torch.Generator().manual_seed(seed)
    target = world.sample_tilted(prompts, reward, None, problem.beta, g).double()
    floors = [energy_distance(world.sample_tilted(prompts, reward, None, problem.beta, g), target)
              for _ in range(FLOOR_PAIRS)]
    energy = energy_distance(x, target)
    floor = sum(floors) / len(floors)
    r_s = float(reward_values(problem, x).mean())
    r_t = sum(problem.mean_reward(p, tilted=False) for p in prompts) / len(prompts)
    r_p = sum(problem.mean_reward(p, tilted=True) for p in prompts) / len(prompts)
    means = problem.tilted_means()
    stds = torch.tensor(problem.stds, dtype=torch.float64)
    per_prompt: dict[str, Any] = {}
    num = den = 0.0
    tv = 0.0
    for p in sorted(set(prompts)):
        rows = torch.tensor([i for i, q in enumerate(prompts) if q == p])
        members = problem.prompts[p]
        m_s = component_responsibilities(x[rows], means, stds, members).mean(0)
        m_ref = component_responsibilities(target[rows], means, stds, members).mean(0)
        m_p = problem.tilted_weights(p)
        m_t = problem.prompt_weights(p)
        num += float(((m_s - m_t) * (m_p - m_t)).sum())
        den += float(((m_p - m_t) ** 2).sum())
        tv = max(tv, 0.5 * float((m_s - m_p).abs().sum()))
        per_prompt[p] = {
            "components": members,
            "mass": [round(float(m_s[k]), 4) for k in members],
            "target_mass": [round(float(m_p[k]), 4) for k in members],
            "target_mass_sampled": [round(float(m_ref[k]), 4) for k in members],
            "teacher_mass": [round(float(m_t[k]), 4) for k in members],
        }
    return {
        "reward": r_s, "reward_teacher": r_t, "reward_target": r_p,
        "closure": (r_s - r_t) / (r_p - r_t),
        "energy": energy, "energy_floor": floor, "energy_ratio": energy / floor,
        "mass_tv": tv, "mode_closure": num / den if den > 0 else float("nan"),
        "prompts": per_prompt,
    }


def eval_prompts(problem: Any, n: int) -> list[str]:
    names = sorted(problem.prompts)
    return [names[i % len(names)] for i in range(n)]


# ---------------------------------------------------------------------------------------------------------- training
def resolve_world_run(method: str, problem: Any, configs: Sequence[str], steps: int | None, seed: int,
                      run_dir: Path) -> Any:
    """The resolved config of ``method`` on ``problem``: packaged toy2d preset ← ``configs`` ← the problem."""
    from fewstep_rl.run import resolve

    over: dict[str, Any] = {f"world.{k}": v for k, v in problem.world_config().items()}
    over.update({
        "rewards": [dict(problem.reward)], "method.beta": problem.beta, "trainer.seed": seed,
        "trainer.eval_every": 0, "trainer.progress_bar": False, "trainer.num_threads": 1,
        "trainer.run_dir": str(run_dir), "trainer.devices": 1, "trainer.num_nodes": 1, "trainer.strategy": "auto",
    })
    if steps is not None:
        over["trainer.max_steps"] = steps
    return resolve(method, "toy2d", tuple(configs), over)


def train_world(method: str, problem: Any, configs: Sequence[str], steps: int | None, seed: int,
                run_dir: Path) -> tuple[Any, Any, float]:
    """Train ``method`` on ``problem`` as validate does (1 intra-op thread, Lightning's console quietened).

    Returns the trained module (in eval mode), the resolved config and the training time in seconds.
    """
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - configures its loggers on import; quieten them afterwards
    import torch

    from fewstep_rl.run import assemble, write_run_files

    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    t0 = time.time()
    resolved = resolve_world_run(method, problem, configs, steps, seed, run_dir)
    write_run_files(run_dir, resolved)
    module, dm, trainer = assemble(resolved, run_dir, [], run_callback=False)
    trainer.fit(module, datamodule=dm)
    module.eval()
    return module, resolved, time.time() - t0


def train_and_score(method: str, problem_dict: dict[str, Any], configs: Sequence[str], steps: int | None, seed: int,
                    eval_samples: int, run_dir: str) -> dict[str, Any]:
    """Train ``method`` on one problem (1 intra-op thread) and score its samples (runs in a worker process)."""
    import torch

    from fewstep_rl.worlds.toy2d_problems import Problem

    problem = Problem(**problem_dict)
    rd = Path(run_dir)
    module, resolved, train_s = train_world(method, problem, configs, steps, seed, rd)
    prompts = eval_prompts(problem, eval_samples)
    with torch.no_grad():
        x = module.generate(prompts, torch.Generator(device=module.device).manual_seed(seed + 1)).cpu()
    metrics = score_samples(problem, x, prompts, seed=seed + 2)
    out = {"world": problem.name, "family": problem.family, "reward_kind": problem.reward["name"],
           "beta": problem.beta, "K": len(problem.means), "train_s": round(train_s, 1),
           "steps": resolved.trainer.max_steps, **metrics}
    (rd / "metrics.json").write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------------- summary
def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst (closure: farthest from 1; the rest: largest) over the worlds."""
    def col(k: str) -> list[float]:
        return [float(r[k]) for r in rows if not math.isnan(float(r[k]))]

    out: dict[str, Any] = {"worlds": len(rows)}
    for k in ("closure", "mode_closure"):
        v = col(k)
        out[f"{k}_median"] = statistics.median(v) if v else float("nan")
        out[f"{k}_worst"] = max(v, key=lambda c: abs(c - 1.0)) if v else float("nan")
    for k in ("energy_ratio", "mass_tv"):
        v = col(k)
        out[f"{k}_median"] = statistics.median(v) if v else float("nan")
        out[f"{k}_worst"] = max(v) if v else float("nan")
    return out


def _masses(r: dict[str, Any]) -> str:
    return " ".join(f"{p}:{'/'.join(f'{m:.2f}' for m in d['mass'])}→{'/'.join(f'{m:.2f}' for m in d['target_mass'])}"
                    for p, d in r["prompts"].items())


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['world']:<18} K={r['K']} β={r['beta']:<7.4g} closure {100 * r['closure']:6.1f}%  "
            f"energy {r['energy_ratio']:6.1f}x floor  mode-move {100 * r['mode_closure']:6.1f}%  "
            f"mass TV {r['mass_tv']:.3f}  [{_masses(r)}]  ({r['train_s']:.0f} s)")


def format_summary(method: str, s: dict[str, Any]) -> str:
    return (f"{method}: {s['worlds']} worlds  closure median {100 * s['closure_median']:.1f}% worst "
            f"{100 * s['closure_worst']:.1f}%  |  energy/floor median {s['energy_ratio_median']:.1f}x worst "
            f"{s['energy_ratio_worst']:.1f}x  |  mode-move median {100 * s['mode_closure_median']:.1f}% worst "
            f"{100 * s['mode_closure_worst']:.1f}%  |  mass TV median {s['mass_tv_median']:.3f} worst "
            f"{s['mass_tv_worst']:.3f}")


def write_results(out: Path, method: str, args: dict[str, Any], rows: list[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    import csv

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"method": method, "args": args, "summary": summary,
                                                  "worlds": rows}, indent=1))
    keys = ["world", "family", "reward_kind", "K", "beta", "steps", "train_s", "closure", "energy_ratio", "energy",
            "energy_floor", "mode_closure", "mass_tv", "reward", "reward_teacher", "reward_target"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "masses"])
        for r in rows:
            w.writerow([r[k] for k in keys] + [_masses(r)])


# ---------------------------------------------------------------------------------------------------------- CLI
FLAGS = {"method": "value", "worlds": "value", "seed": "value", "family": "value", "reward": "value",
         "steps": "value", "jobs": "value", "eval_samples": "value", "config": "list", "out": "value", "only": "value", "help": "bool"}


def _int(opts: dict, key: str, default: int, minimum: int) -> int:
    v = opts.get(key)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"--{key} must be an integer >= {minimum}, got {v!r}") from None
    if n < minimum:
        raise ConfigError(f"--{key} must be an integer >= {minimum}, got {v!r}")
    return n


def main(argv: list[str], parse: Any) -> int:
    """``fewstep-rl validate`` (``parse`` is the CLI's flag parser)."""
    from fewstep_rl import registry
    from fewstep_rl.worlds.toy2d_problems import FAMILIES, REWARD_KINDS, make_problems

    opts, over = parse(argv, FLAGS)
    if opts.get("help"):
        print(__doc__.split("::")[1].split("Every world")[0])
        return 0
    if over:
        raise ConfigError(f"validate takes no dotted overrides (got {sorted(over)}); put method keys in --config FILE")
    names = registry.names("methods")
    methods = [m.strip() for m in str(opts.get("method") or "").split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"validate needs --method NAME[,NAME...] (reward-driven: {', '.join(REWARD_DRIVEN)})")
    for m in methods:
        if m not in names:
            raise ConfigError(f"unknown method {m!r} (installed: {', '.join(names)})")
    n = _int(opts, "worlds", 10, 1)
    seed = _int(opts, "seed", 0, 0)
    jobs = _int(opts, "jobs", 1, 1)
    eval_samples = _int(opts, "eval_samples", 4000, 16)
    steps = _int(opts, "steps", 0, 1) if opts.get("steps") is not None else None
    family = opts.get("family") or "all"
    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    kind_opt = opts.get("reward") or "auto"
    if kind_opt not in (*REWARD_KINDS, "auto"):
        raise ConfigError(f"--reward must be one of auto, {', '.join(REWARD_KINDS)}, got {kind_opt!r}")
    for c in opts["config"]:
        if not Path(c).is_file():
            raise ConfigError(f"config file not found: {c}")
    pick = None
    if opts.get("only"):
        try:
            pick = sorted({int(i) for i in str(opts["only"]).split(",")})
        except ValueError:
            pick = []
        if not pick or pick[0] < 0 or pick[-1] >= n:
            raise ConfigError(f"--only takes world indices like 0,3 (below --worlds {n}), got {opts['only']!r}")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(opts.get("out") or f"runs/validate-{'-'.join(methods)}-{stamp}")
    plan: dict[str, dict[str, Any]] = {}
    for m in methods:
        kind = default_reward_kind(m) if kind_opt == "auto" else kind_opt
        problems = make_problems(n, seed, family, kind)
        if pick is not None:
            problems = [problems[i] for i in pick]
        out = root if len(methods) == 1 else root / m
        # fail on a bad --config before any training: resolve the first world once
        resolve_world_run(m, problems[0], opts["config"], steps, seed, out / "worlds" / problems[0].name)
        meta = {"worlds": n, "seed": seed, "family": family, "reward": kind, "steps": steps,
                "eval_samples": eval_samples, "config": list(opts["config"]), "only": opts.get("only")}
        plan[m] = {"problems": problems, "out": out, "meta": meta, "rows": []}
        print(f"validate {m} on {len(problems)} of {n} worlds (seed {seed}, family {family}, rewards {kind}, "
              f"jobs {jobs}) → {out}", flush=True)
    # interleaved by world index, so a run cut short has the first worlds of every method
    args = [(m, plan[m]["problems"][i].to_dict(), list(opts["config"]), steps, seed, eval_samples,
             str(plan[m]["out"] / "worlds" / plan[m]["problems"][i].name))
            for i in range(len(plan[methods[0]]["problems"])) for m in methods]

    def done(m: str, row: dict[str, Any]) -> None:  # print and rewrite the results files after every world
        plan[m]["rows"].append(row)
        print(f"{m:<6} {format_row(row)}", flush=True)
        write_results(plan[m]["out"], m, plan[m]["meta"], plan[m]["rows"], summarise(plan[m]["rows"]))

    if jobs == 1:
        for a in args:
            done(a[0], train_and_score(*a))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(train_and_score, *a): a[0] for a in args}
            for f in as_completed(futs):
                done(futs[f], f.result())
    for m in methods:
        p = plan[m]
        order = {q.name: i for i, q in enumerate(p["problems"])}
        p["rows"].sort(key=lambda r: order[r["world"]])
        summary = summarise(p["rows"])
        write_results(p["out"], m, p["meta"], p["rows"], summary)
        print(format_summary(m, summary))
        print(f"results: {p['out'] / 'results.json'}, {p['out'] / 'results.csv'}", file=sys.stderr)
    return 0
