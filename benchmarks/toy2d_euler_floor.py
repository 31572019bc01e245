"""The sampler's own floor on `fewstep-rl validate`'s worlds: the *exact* tilted flow sampled with N-step Euler.

    python benchmarks/toy2d_euler_floor.py [--seeds 0,1] [--steps 16,32,64,128] [--n 4000]

A method whose samples come from integrating a learned velocity field (CRD's toy2d preset: ``transition: euler``,
``num_steps``) cannot score better on the energy metric than the exact flow of its target integrated with the same
chain. This script builds, for every linear-reward world of ``validate --worlds 10 --seed S`` (their tilted target is
again a Gaussian mixture: means moved by s²w/β, masses reweighted), the analytic velocity of that target and samples
it with N Euler steps on the shift-1 σ-grid. Printed per world and N: energy over the noise floor and closure (the
validate scorer, 4000 samples by default), and the width of the components (``std``: RMS distance of 50 000 samples
from their component's exact mean in units of its std, per dimension; 1 = exact). Euler on a flow contracts the components at coarse N; a learned field trained
on its own Euler samples (CRD's self-consistency term) inherits that contraction, so N sets part of the method's
floor. Region-reward worlds are skipped (their tilt is not a mixture of Gaussians).
"""

from __future__ import annotations

import argparse

import torch

from fewstep_rl.backbones.toy2d import GaussianMixtureBackbone
from fewstep_rl.sampling.sigmas import sigma_grid
from fewstep_rl.validate import eval_prompts, score_samples
from fewstep_rl.worlds.toy2d_problems import Problem, component_responsibilities, make_problems


def euler_tilted_samples(problem: Problem, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    """Samples of the exact tilted target's flow, ``steps`` Euler steps from σ = 1 to 0, one per prompt (float64)."""
    mu = problem.tilted_means()
    x = torch.zeros(len(prompts), problem.dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    sig = sigma_grid(steps, shift=1.0).double()
    for p in sorted(problem.prompts):
        rows = [i for i, q in enumerate(prompts) if q == p]
        w = [max(float(v), 1e-300) for v in problem.tilted_weights(p)]
        flow = GaussianMixtureBackbone(mu.tolist(), problem.stds, w, {"p": problem.prompts[p]}, hidden=8, layers=1)
        flow = flow.double()
        cond = flow.encode_prompts(["p"] * len(rows), dtype=torch.float64)
        xx = torch.randn(len(rows), problem.dim, generator=g, dtype=torch.float64)
        for a, b in zip(sig[:-1], sig[1:]):
            xx = xx + (b - a) * flow.analytic_velocity(xx, a, cond)
        x[rows] = xx
    return x


def pooled_std_ratio(problem: Problem, x: torch.Tensor, prompts: list[str]) -> float:
    """Std of the samples about their own component's exact mean, in units of its exact std, pooled over every
    prompt and component (1 = exact width; < 1: the chain contracts the components)."""
    mu, sd = problem.tilted_means(), torch.tensor(problem.stds, dtype=torch.float64)
    z = []
    for p in sorted(problem.prompts):
        xs = x[[i for i, q in enumerate(prompts) if q == p]]
        k = component_responsibilities(xs, mu, sd, problem.prompts[p]).argmax(1)
        z.append((xs - mu[k]) / sd[k, None])
    return float(torch.cat(z).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1", help="validate world seeds")
    ap.add_argument("--steps", default="16,32,64,128", help="Euler step counts")
    ap.add_argument("--n", type=int, default=4000, help="samples per world (validate's eval_samples)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in a.steps.split(",")]
    for seed in [int(s) for s in a.seeds.split(",")]:
        for problem in make_problems(10, seed):
            if problem.reward["name"] != "linear":
                continue
            prompts = eval_prompts(problem, a.n)
            many = eval_prompts(problem, 50_000)
            cells = []
            for n_steps in steps:
                x = euler_tilted_samples(problem, prompts, n_steps, seed=7)
                m = score_samples(problem, x, prompts, seed=3)
                width = pooled_std_ratio(problem, euler_tilted_samples(problem, many, n_steps, seed=8), many)
                cells.append(f"N={n_steps}: {m['energy_ratio']:4.1f}x clos {100 * m['closure']:5.1f}% std {width:.3f}")
            print(f"{problem.name:16s} beta {problem.beta:5.3g}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
