"""``fewstep-rl eval --paired CKPT ... [--teacher] [--nfe]``: the command-line side of :mod:`fewstep_rl.eval.paired`.

Prints the markdown table on stderr and, as the last stdout line, one JSON object ``{"n", "seed", "rows"}`` (rows
of :func:`~fewstep_rl.eval.paired.paired_rows`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fewstep_rl.cli import UsageError, _num, _parse, _reward_by_name, _teacher, load_checkpoint
from fewstep_rl.eval.paired import STUDENT_NFE, TEACHER_NFE, format_rows, paired_rows, run_paired

PAIRED_FLAGS = {"teacher": "bool", "world": "value", "config": "list", "labels": "value", "n": "value",
                "rewards": "value", "seed": "value", "nfe": "bool", "steps": "value", "teacher_steps": "value",
                "student_nfe": "value", "teacher_nfe": "value", "guidance": "value", "help": "bool"}

HELP = """usage: fewstep-rl eval --paired CKPT [CKPT ...] [--teacher] [--labels a,b,...] [--n N] [--rewards a,b]
                         [--seed S] [--steps S] [--teacher_steps S] [--nfe [--student_nfe 1,2,4,8]
                         [--teacher_nfe 4,8,25,50]]

Every checkpoint (and with --teacher the frozen teacher, first, as the reference) generates N samples (default 1024)
for the world's evaluation prompts from the same noise; each reward scores every sample; rows give mean ± se and
the paired differences to the first and to the previous source ± their standard error. --nfe sweeps step counts
(students 1,2,4,8; teacher 4,8,25,50) with the same pinned noise. The teacher samples with Euler at
--teacher_steps (default 4) and the world's teacher guidance."""


def _split_paired(argv: list[str]) -> tuple[list[str], list[str]]:
    """(checkpoint paths after ``--paired``, the remaining options)."""
    i = argv.index("--paired")
    ckpts, j = [], i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        ckpts.append(argv[j])
        j += 1
    return ckpts, argv[:i] + argv[j:]


def _int_list(opts: dict, key: str, default: tuple[int, ...]) -> list[int]:
    if opts.get(key) is None:
        return list(default)
    try:
        vals = [int(v) for v in str(opts[key]).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{key} expects comma-separated integers like 1,2,4,8, got {opts[key]!r}") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"--{key} expects step counts >= 1, got {opts[key]!r}")
    return vals


def cmd_paired(argv: list[str]) -> int:
    ckpts, rest = _split_paired(argv)
    opts, over = _parse(rest, PAIRED_FLAGS)
    if opts.get("help"):
        print(HELP)
        return 0
    if not ckpts and not opts.get("teacher"):
        raise UsageError("eval --paired needs checkpoint files (--paired A.ckpt B.ckpt ...) and/or --teacher")
    labels = [s.strip() for s in (opts.get("labels") or "").split(",") if s.strip()]
    n_sources = len(ckpts) + (1 if opts.get("teacher") else 0)
    if labels and len(labels) != n_sources:
        raise UsageError(f"--labels has {len(labels)} names for {n_sources} sources (teacher first when --teacher)")
    n = _num(opts, "n", int, 1024)
    seed = _num(opts, "seed", int, 0)
    if n < 2:
        raise UsageError("--n must be >= 2 (a standard error needs two samples)")
    student_steps: list[int | None] = (_int_list(opts, "student_nfe", STUDENT_NFE) if opts.get("nfe")
                                       else [_num(opts, "steps", int)])
    teacher_steps: list[int | None] = (_int_list(opts, "teacher_nfe", TEACHER_NFE) if opts.get("nfe")
                                       else [_num(opts, "teacher_steps", int, _num(opts, "steps", int, 4))])
    import torch

    sources: list[tuple[str, Any, list]] = []
    world = rewards = None
    methods = []
    for path in ckpts:
        method = load_checkpoint(path)
        if world is not None and method.world.name != world.name:
            raise UsageError(f"{path} is a {method.world.name!r} run, the first checkpoint a {world.name!r} run")
        world = world or method.world
        rewards = rewards or method.eval_rewards
        methods.append((path, method))
    if opts.get("teacher"):
        from fewstep_rl.eval.generate import generate
        from fewstep_rl.sampling import Transition, sigma_grid

        if world is not None:
            if over or opts.get("world"):
                raise UsageError("with checkpoints the teacher is their world's; drop --world and overrides")
            backbone = world.build_backbone().eval()
        else:
            world, backbone, rewards = _teacher(opts, over)
        guidance = _num(opts, "guidance", float, float(world.teacher_guidance))

        def teacher_gen(prompts, g, steps, bb=backbone, gd=guidance):
            return generate(bb, "teacher", prompts, g, sigma_grid(steps or 4), Transition("euler"), gd)

        sources.append(("teacher", teacher_gen, teacher_steps))
    elif over:
        raise UsageError(f"overrides {sorted(over)} are only accepted with --teacher")
    for path, method in methods:
        def gen(prompts, g, steps, m=method):
            return m.generate(prompts, g, steps=steps)

        sources.append((path, gen, student_steps))
    if labels:
        sources = [(lab, g, s) for lab, (_, g, s) in zip(labels, sources)]
    if opts.get("rewards"):
        from fewstep_rl.rewards import MultiReward

        rewards = MultiReward([_reward_by_name(r.strip(), rewards) for r in opts["rewards"].split(",") if r.strip()])
    if rewards is None or not len(rewards):
        raise UsageError("no reward to score with: give --rewards a,b")
    from fewstep_rl.eval.generate import cycle_prompts

    prompts = cycle_prompts(world.eval_prompts, n)
    with torch.no_grad():
        scores = run_paired(sources, world, rewards, prompts, seed=seed)
    rows = paired_rows(scores)
    print(format_rows(rows), file=sys.stderr)
    print(json.dumps({"n": n, "seed": seed, "rows": rows}))
    return 0
