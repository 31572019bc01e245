"""Paired gold comparison of shapes checkpoints: same prompts, same sampling noise, per-sample differences.

    python docs/results/paired_gold.py A.ckpt B.ckpt [C.ckpt ...] --n 2048 [--labels a b c] [--seed 0] [--device cuda]

Every checkpoint generates ``n`` samples for the world's evaluation prompts (cycled) from one seed, so sample i
starts from the same noise (and, for stochastic chains, draws the same step noise) under every checkpoint. The gold
verifier scores each sample; the script prints each checkpoint's mean gold ± its standard error and, for each later
checkpoint, the paired differences to the first and to the previous one ± the standard error of the per-sample
differences (much smaller than the unpaired one: the prompt and the noise explain most of a sample's score).
Used for the issue-4 shapes comparison (RTDMD stage 2 vs stage 1 vs the teacher's 4-step chain: ``--teacher`` adds it first).
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def gold_scores(samples: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from fewstep_rl.rewards.shapes import GoldReward

    return GoldReward()(samples.cpu(), prompts).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpts", nargs="*", help="fewstep-rl checkpoints of shapes runs")
    ap.add_argument("--labels", nargs="*")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", action="store_true", help="add the teacher's 4-step Euler + CFG chain first")
    ap.add_argument("--device", default="cpu", help="where the samples are generated (the noise is drawn on the CPU)")
    args = ap.parse_args()
    from fewstep_rl.cli import load_checkpoint
    from fewstep_rl.eval.generate import cycle_prompts, generate
    from fewstep_rl.sampling import Transition, sigma_grid

    labels = list(args.labels or [])
    if args.teacher:
        labels = ["teacher 4-step"] + labels
    names = (["teacher"] if args.teacher else []) + list(args.ckpts)
    labels += names[len(labels):]
    scores: dict[str, torch.Tensor] = {}
    prompts: list[str] | None = None
    for name, label in zip(names, labels):
        g = torch.Generator().manual_seed(args.seed)
        if name == "teacher":
            from fewstep_rl.worlds.shapes.world import ShapesWorld

            world = ShapesWorld()
            bb = world.build_backbone().to(args.device).eval()
            prompts = cycle_prompts(world.eval_prompts, args.n)
            with torch.no_grad():
                x = generate(bb, "teacher", prompts, g, sigma_grid(4), Transition("euler"), world.teacher_guidance)
        else:
            method = load_checkpoint(name, args.device)
            prompts = cycle_prompts(method.world.eval_prompts, args.n)
            with torch.no_grad():
                x = method.generate(prompts, g)
        scores[label] = gold_scores(x, prompts)
    base_label = labels[0]
    prev = None
    for label in labels:
        s = scores[label]
        row = {"label": label, "gold": float(s.mean()), "se": float(s.std() / math.sqrt(len(s)))}
        for other in dict.fromkeys([base_label, prev]):
            if other is not None and other != label:
                d = s - scores[other]
                row[f"minus {other}"] = f"{float(d.mean()):+.4f} ± {float(d.std() / math.sqrt(len(d))):.4f}"
        prev = label
        print(json.dumps(row))


if __name__ == "__main__":
    main()
