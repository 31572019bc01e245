"""How far RTDMD's β-calibrated PPO branch *can* move mode masses: the optimum within its policy family, 1-D.

    python benchmarks/rtdmd_family_ceiling.py [--steps 4] [--eta 0.9] [--beta 1.67] [--sep 3.0] [--std 0.4]
                                              [--iters 3000] [--batch 4096] [--seed 0]

The question (issue 13): RTDMD's toy2d preset under-moves mode masses on every random world (median 76 % of the
move). Its PPO branch (``ppo_advantage: beta``, ``ppo_kl: 1``) is the policy gradient of

    J(π) = E_π[r(x0)]/β − KL(π ‖ π_ref)        (π over the chain's stochastic steps, π_ref = the stage-1 chain)

whose optimum over *all* chains is π_ref tilted by exp(r/β) — the exact target. RTDMD's chain is not all chains:
K−1 CPS(η) steps whose transition is a Gaussian of fixed std ``s_k = σ_{k+1} sin(ηπ/2)`` around a learned mean, then
one deterministic step. This script finds the optimum *within that family* on a 1-D problem where everything but
the per-step mean shift (a small MLP, ample in 1-D) is exact, so the ceiling is a property of the family, not of the
validate runs' networks, policy-gradient noise or run length:

* teacher: ``½N(−sep/2, std²) + ½N(sep/2, std²)``, exact posterior-mean velocity; reward ``r(x) = x``;
* π_ref: the CPS(η) chain on the toy2d σ-grid (shift 1) with the teacher's velocity, last step the teacher's exact
  ODE map from σ_{K−1} to 0 (a sharp decider, as a distilled generator's last step is);
* policy: the same chain with each stochastic step's mean shifted by a free function ``δ_k(x)`` (an MLP per step;
  ``--learn-std``: its std scaled by a free ``exp(λ_k(x))`` as well, a wider family than CPS), KL(π‖π_ref) the
  exact per-step Gaussian KL summed over the steps; J maximised by reparameterised gradients (the same objective the PPO
  branch ascends, with far less variance);
* target: π_ref's own x0-law reweighted by exp(r/β) (self-normalised, 60 000 samples).

Printed: the mass of the right-hand mode under π_ref, the exact tilt and the in-family optimum, the fraction of the
mass move and of the reward gain it reaches, and J's KL at the optimum vs the tilt's. More CPS steps do not approach
the unrestricted optimum here (``--steps 16``: 78 % of the move): at η = 0.9 each step re-draws almost all of its
noise, so smaller steps are not closer to a diffusion.
"""

from __future__ import annotations

import argparse
import math

import torch

from fewstep_rl.sampling.transitions import transition_mean_std


def posterior_x0(x: torch.Tensor, t: float, mu: torch.Tensor, std: float) -> torch.Tensor:
    """Exact ``E[x0 | x_t]`` of an equal-weight 1-D Gaussian mixture, ``x_t = (1−t)x0 + t n``. Written out rather
    than derived from ``objectives.diffused_reward.gmm_score``: that route divides by ``1 − t``, and the chain starts
    at t = 1."""
    a = 1 - t
    var = a * a * std**2 + t * t
    resp = torch.softmax(-0.5 * (x[:, None] - a * mu) ** 2 / var, dim=1)
    return (resp * (mu + a * std**2 / var * (x[:, None] - a * mu))).sum(1)


def velocity(x: torch.Tensor, t: float, mu: torch.Tensor, std: float) -> torch.Tensor:
    return (x - posterior_x0(x, t, mu, std)) / t


def ode_map(x: torch.Tensor, t0: float, mu: torch.Tensor, std: float, n: int) -> torch.Tensor:
    """The teacher's probability-flow ODE from ``t0`` to 0 (``n`` Euler steps): the deterministic last step."""
    ts = torch.linspace(t0, 0.0, n + 1).tolist()
    for t, tn in zip(ts[:-1], ts[1:]):
        x = x + (tn - t) * velocity(x, t, mu, std)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="generator steps K (K−1 stochastic CPS steps)")
    ap.add_argument("--eta", type=float, default=0.9, help="CPS η (RTDMD: 0.9)")
    ap.add_argument("--beta", type=float, default=1.67, help="tilt temperature β")
    ap.add_argument("--sep", type=float, default=3.0, help="distance between the two modes")
    ap.add_argument("--std", type=float, default=0.4, help="std of each mode")
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learn-std", action="store_true",
                    help="widen the family: each step's std is a learned function of x as well (not RTDMD's CPS)")
    a = ap.parse_args()
    if a.steps < 2 or not 0 < a.eta <= 1 or a.beta <= 0 or a.sep <= 0 or a.std <= 0:
        ap.error("need --steps >= 2, 0 < --eta <= 1, --beta > 0, --sep > 0, --std > 0")
    torch.manual_seed(a.seed)
    mu = torch.tensor([-a.sep / 2, a.sep / 2])
    grid = [1 - i / a.steps for i in range(a.steps + 1)]
    tr = f"cps({a.eta})"
    nets = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                            torch.nn.Linear(64, 2)) for _ in range(a.steps - 1))
    for net in nets:  # δ = 0: the policy starts at π_ref
        torch.nn.init.zeros_(net[-1].weight)
        torch.nn.init.zeros_(net[-1].bias)

    def chain(n: int, policy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, kl = torch.randn(n), torch.zeros(n)
        for k in range(a.steps - 1):
            mean, s = transition_mean_std(tr, x[:, None], grid[k], grid[k + 1],
                                          velocity(x, grid[k], mu, a.std)[:, None])
            mean, s = mean[:, 0], float(s.reshape(-1)[0])
            if policy:
                out = nets[k](x[:, None])
                d = out[:, 0]
                s_pol = s * (out[:, 1].exp() if a.learn_std else torch.ones_like(d))
                # KL(N(m + d, s_pol²) ‖ N(m, s²)), exact
                kl = kl + torch.log(s / s_pol) + (s_pol**2 + d**2) / (2 * s * s) - 0.5
                mean, s = mean + d, s_pol
            x = mean + s * torch.randn(n)
        return x, kl

    opt = torch.optim.Adam(nets.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.iters)
    for _ in range(a.iters):
        x, kl = chain(a.batch, True)
        x0 = ode_map(x, grid[-2], mu, a.std, 20)
        loss = -(x0.mean() / a.beta - kl.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        xr, _ = chain(60000, False)
        x0r = ode_map(xr, grid[-2], mu, a.std, 60)
        logw = x0r / a.beta
        w = torch.softmax(logw, 0)
        xp, klp = chain(60000, True)
        x0p = ode_map(xp, grid[-2], mu, a.std, 60)
    right = lambda x: (x > 0).float()  # noqa: E731
    m_ref, m_tilt, m_pol = float(right(x0r).mean()), float((w * right(x0r)).sum()), float(right(x0p).mean())
    r_ref, r_tilt, r_pol = float(x0r.mean()), float((w * x0r).sum()), float(x0p.mean())
    kl_tilt = r_tilt / a.beta - float(torch.logsumexp(logw, 0) - math.log(len(logw)))
    family = "learned std, " if a.learn_std else ""
    print(f"{family}K={a.steps} eta={a.eta} beta={a.beta} sep={a.sep} std={a.std}: right-mode mass ref {m_ref:.3f}, "
          f"tilt {m_tilt:.3f}, in-family optimum {m_pol:.3f} -> mode move {100 * (m_pol - m_ref) / (m_tilt - m_ref):.1f} %, "
          f"reward gain {100 * (r_pol - r_ref) / (r_tilt - r_ref):.1f} %; KL(policy||ref) {float(klp.mean()):.3f} "
          f"vs the tilt's {kl_tilt:.3f} nats")


if __name__ == "__main__":
    main()
