"""Where CRD's remaining error sits on one of validate's random worlds: the ELBO implicit reward vs the exact log-ratio.

    python benchmarks/crd_elbo_gap.py --seed 1 --world 6 [--steps N] [--config extra.yaml ...] [--n 600]
                                      [--draws 256] [--ode 200]

Trains ``crd`` with its packaged toy2d preset on world ``--world`` of ``fewstep-rl validate --seed S`` (the same
run as validate's, 1 thread, ~5–10 min), then, per prompt, on ``--n`` samples of the trained generator:

* ``β·r̂ − r`` — the implicit reward ``r̂`` (``objectives.crd.implicit_reward``, ``elbo``) averaged over ``--draws``
  stratified noise levels in (0, 1) against the frozen reference (the teacher), minus the reward; centred per prompt.
  This is what CRD's regression drives to a constant, so a component-level offset means the regression is not
  solved there;
* ``β·log(p_θ/p_ref) − r`` — the same with the generator field's *exact* ODE log-density (RK4 with ``--ode`` steps
  and the exact divergence) against the teacher's. The teacher's ODE log-density is checked against its closed-form
  Gaussian-mixture density first (printed). The difference between the two rows is the ELBO gap: the ELBO equals the
  log-density only for a field that is the exact flow of its own law.

Printed per mixture component (the samples assigned by the largest responsibility): the sample count and both
centred residuals, overall and for the inner/outer half by distance to the component's tilted mean. Methods
``crd``-only; linear and region rewards. Used for the record in ``methods/crd.py`` (session 30).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

from fewstep_rl.objectives.crd import implicit_reward
from fewstep_rl.validate import default_reward_kind, eval_prompts, reward_values, score_samples, train_world
from fewstep_rl.worlds.toy2d_problems import component_responsibilities, make_problems


def ode_log_density(velocity, x0: torch.Tensor, n: int) -> torch.Tensor:
    """``log p(x0)`` of the probability-flow ODE ``dx/dt = v(x, t)``, t: 0 → 1, prior N(0, I) at t = 1:
    ``log p_0(x0) = log N(x_1) + ∫_0^1 div v(x_t, t) dt`` (instantaneous change of variables), RK4 with ``n`` steps
    and the exact divergence (one autograd pass per dimension)."""
    h = 1.0 / n
    x = x0.double().clone()
    acc = torch.zeros(x.shape[0], dtype=torch.float64)

    def f(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        xr = x.detach().float().requires_grad_(True)
        v = velocity(xr, max(t, 1e-4))
        div = torch.zeros(x.shape[0])
        for d in range(x.shape[1]):
            div = div + torch.autograd.grad(v[:, d].sum(), xr, retain_graph=d < x.shape[1] - 1)[0][:, d]
        return v.detach().double(), div.detach().double()

    for i in range(n):
        t = i * h
        k1, d1 = f(x, t)
        k2, d2 = f(x + h / 2 * k1, t + h / 2)
        k3, d3 = f(x + h / 2 * k2, t + h / 2)
        k4, d4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        acc = acc + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    return -0.5 * (x**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi) + acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="validate's --seed (worlds and training seed)")
    ap.add_argument("--world", type=int, default=6, help="world index among validate's 10")
    ap.add_argument("--steps", type=int, default=None, help="training iterations (default: the preset's)")
    ap.add_argument("--config", nargs="*", default=[], help="extra config files, as validate --config")
    ap.add_argument("--n", type=int, default=600, help="samples per prompt")
    ap.add_argument("--draws", type=int, default=256, help="noise draws per sample for the implicit reward")
    ap.add_argument("--ode", type=int, default=200, help="RK4 steps of the ODE log-density")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    a = ap.parse_args()
    if not 0 <= a.world < 10 or a.n < 10 or a.draws < 1 or a.ode < 1:
        ap.error("need 0 <= --world < 10, --n >= 10, --draws >= 1, --ode >= 1")
    problem = make_problems(10, a.seed, "all", default_reward_kind("crd"))[a.world]
    rd = Path(a.out or tempfile.mkdtemp(prefix="crd-elbo-gap-"))
    module, _, _ = train_world("crd", problem, a.config, a.steps, a.seed, rd)
    prompts = eval_prompts(problem, 4000)
    with torch.no_grad():
        x = module.generate(prompts, torch.Generator().manual_seed(a.seed + 1)).cpu()
    m = score_samples(problem, x, prompts, seed=a.seed + 2)
    beta = problem.beta
    print(f"{problem.name} β={beta:.4g}: closure {100 * m['closure']:.1f}%  energy {m['energy_ratio']:.1f}x floor  "
          f"mode-move {100 * m['mode_closure']:.1f}%  (validate's figures)")

    bb = module.backbone
    means, stds = problem.tilted_means(), torch.tensor(problem.stds, dtype=torch.float64)
    base = torch.tensor(problem.means, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    for q in sorted(problem.prompts):
        with torch.no_grad():
            x0 = module.generate([q] * a.n, torch.Generator().manual_seed(11)).cpu().reshape(a.n, -1).float()
        cond = bb.encode_prompts([q] * a.n)

        def vel(role: str, cond=cond):
            return lambda x, s: bb.velocity(x, torch.full((x.shape[0],), float(s)), cond, role)

        r = reward_values(problem, x0)
        with torch.no_grad():
            r_hat = torch.zeros(a.n, dtype=torch.float64)
            for k in range(a.draws):
                t = ((k + torch.rand(a.n, generator=g)) / a.draws).clamp(1e-3, 1 - 1e-6)
                eps = torch.randn(x0.shape, generator=g)
                xt = (1 - t[:, None]) * x0 + t[:, None] * eps
                v = bb.velocity(xt, t, cond, "generator")
                v_ref = bb.velocity(xt, t, cond, "teacher")
                r_hat += implicit_reward(v, v_ref, eps - x0, t, "elbo").double()
            r_hat /= a.draws
        lp_gen = ode_log_density(vel("generator"), x0, a.ode)
        lp_ref = ode_log_density(vel("teacher"), x0, a.ode)
        w = problem.prompt_weights(q).double()
        d = x0.shape[1]
        comp = torch.stack([
            -0.5 * (((x0.double() - base[j]) / stds[j]) ** 2).sum(1) - d * torch.log(stds[j])
            - 0.5 * d * math.log(2 * math.pi) + torch.log(w[j].clamp_min(1e-300)) for j in range(len(w))], 1)
        closed = torch.logsumexp(comp, 1)
        print(f" prompt {q}: teacher ODE log-density − closed form: max |.| {float((lp_ref - closed).abs().max()):.2e}")
        res_elbo = beta * r_hat - r
        res_exact = beta * (lp_gen - lp_ref) - r
        res_elbo, res_exact = res_elbo - res_elbo.mean(), res_exact - res_exact.mean()
        members = problem.prompts[q]
        owner = component_responsibilities(x0.double(), means, stds, members).argmax(1)
        for j in members:
            sel = owner == j
            if int(sel.sum()) < 3:
                continue
            z = ((x0.double()[sel] - means[j]) / stds[j]).norm(dim=1)
            inner = z < z.median()
            e, x_ = res_elbo[sel], res_exact[sel]
            print(f"  component {j} (n={int(sel.sum())}): β·r̂ − r {float(e.mean()):+.3f} "
                  f"(inner {float(e[inner].mean()):+.3f}, outer {float(e[~inner].mean()):+.3f});  "
                  f"β·log(p_θ/p_ref) − r {float(x_.mean()):+.3f} "
                  f"(inner {float(x_[inner].mean()):+.3f}, outer {float(x_[~inner].mean()):+.3f})")


if __name__ == "__main__":
    main()
