"""Seeded random toy2d problems with multimodal, mass-moving reward tilts (issue 13, item 2).

A :class:`Problem` is a toy2d world config (means, stds, weights, prompts), one reward (``linear`` or ``region``) and
the temperature β of the target ``p(x|c)·exp(r(x)/β)/Z(c)``. :func:`make_problem` draws one from ``(seed, index)``
alone (``random.Random``, no global state), so the same ``(seed, index, family, reward)`` is the same problem on every
machine and for every method.

Generator (``family``):
    * ``2d``: K ∈ {2, 3, 4} components in R², means uniform in [−3, 3]² with pairwise distance ≥ 2.5 (≥ 4 of the
      largest std), stds uniform in [0.3, 0.6], weights uniform in [0.5, 1.5] (renormalised).
    * ``8d``: the same in R⁸ (means in [−3, 3]⁸, so components are farther apart).
    * Prompts: two prompts ``p0``, ``p1``; ``p0`` covers 2..K components, ``p1`` a different non-empty subset (when
      K = 2, both components again or one of them). A prompt's law is its components with renormalised weights.
    * Rewards: ``linear`` — ``r(x) = w·x`` with ``w`` a random unit vector; ``region`` — ``r(x) = 1[x ∈ box]``, a box
      of half-width 1–2 stds (∞ in the other coordinates is avoided: every side is finite) around one component of
      ``p0`` with a random offset of ≤ 0.5 std.
    * β: the tilt moves ``move(β) = max_c ½ Σ_k |w̃_k(c) − w'_k(c)|`` of some prompt's mass between components
      (total variation of the per-component masses). A target move is drawn from U[0.35, 0.55] (≥ 0.30 as the issue
      asks, with margin, and not a near-total move); β is the largest value in [0.1, 20] with ``move(β) ≥`` that
      target (descending log grid, then bisection; rounded down). When no β in that range moves enough (e.g. a
      linear direction almost orthogonal to every mean difference), the reward is redrawn and the target lowered
      by 0.01 per draw, down to 0.32.

Per-component tilted mass (closed form, float64):
    * linear: ``w'_k ∝ w̃_k exp(w·μ_k/β + s_k² ‖w‖²/(2β²))`` (toy2d module docstring);
    * region with value v: ``w'_k ∝ w̃_k E_k[e^{r/β}] = w̃_k (1 + (e^{v/β} − 1) P_k(box))`` with the Gaussian box
      probability ``P_k(box) = Π_i [Φ((h_i − μ_ki)/s_k) − Φ((l_i − μ_ki)/s_k)]``.

Exact mean rewards (used for the reward-gap closure, so it carries no Monte-Carlo error of the references):
    * linear: ``E[r] = Σ_k w_k w·m_k`` with the (tilted) weights and means;
    * region: ``E_{p_β}[r] = v Σ_k w̃_k e^{v/β} P_k / Σ_k w̃_k (1 + (e^{v/β} − 1) P_k)``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

FAMILIES = ("2d", "8d", "all")
REWARD_KINDS = ("linear", "region", "mixed")
MIN_MOVE = 0.30
_MOVE_RANGE = (0.35, 0.55)
_BETA_RANGE = (0.1, 20.0)
_MAX_DRAWS = 100


@dataclasses.dataclass
class Problem:
    """One random toy2d problem: world config, one reward spec and β."""

    name: str
    family: str
    means: list[list[float]]
    stds: list[float]
    weights: list[float]
    prompts: dict[str, list[int]]
    reward: dict[str, Any]
    beta: float

    @property
    def dim(self) -> int:
        return len(self.means[0])

    def world_config(self) -> dict[str, Any]:
        """``world.*`` keys for :class:`~fewstep_rl.worlds.toy2d.Toy2DConfig`."""
        return {"means": self.means, "stds": self.stds, "weights": self.weights, "prompts": self.prompts}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ closed forms
    def prompt_weights(self, prompt: str) -> Tensor:
        """Renormalised teacher weights w̃(c) over all K components (0 for the unselected ones), float64."""
        w = torch.zeros(len(self.weights), dtype=torch.float64)
        idx = self.prompts[prompt]
        w[idx] = torch.tensor([self.weights[i] for i in idx], dtype=torch.float64)
        return w / w.sum()

    def tilted_weights(self, prompt: str, beta: float | None = None) -> Tensor:
        """Per-component mass of the tilted target ``p(x|c)e^{r/β}/Z`` (see the module docstring), float64 (K,)."""
        return tilted_component_mass(self, self.prompt_weights(prompt), self.beta if beta is None else beta)

    def tilted_means(self, beta: float | None = None) -> Tensor:
        """Component means of the tilted target's components (moved by s_k² w/β for linear rewards), (K, d)."""
        mu = torch.tensor(self.means, dtype=torch.float64)
        if self.reward["name"] != "linear":
            return mu
        sd = torch.tensor(self.stds, dtype=torch.float64)
        w = torch.tensor(self.reward["w"], dtype=torch.float64)
        return mu + (sd**2)[:, None] * w[None] / (self.beta if beta is None else beta)

    def mass_moved(self, prompt: str, beta: float | None = None) -> float:
        """Total variation ½ Σ_k |w̃_k − w'_k| between the teacher's and the tilt's component masses of ``prompt``."""
        return 0.5 * float((self.prompt_weights(prompt) - self.tilted_weights(prompt, beta)).abs().sum())

    def max_mass_moved(self, beta: float | None = None) -> float:
        return max(self.mass_moved(p, beta) for p in self.prompts)

    def mean_reward(self, prompt: str, tilted: bool) -> float:
        """Exact ``E[r]`` of the teacher (``tilted=False``) or of the tilted target for ``prompt``."""
        wt = self.prompt_weights(prompt)
        if self.reward["name"] == "linear":
            w = torch.tensor(self.reward["w"], dtype=torch.float64)
            b = float(self.reward.get("b", 0.0))
            if tilted:
                return float(self.tilted_weights(prompt) @ (self.tilted_means() @ w)) + b
            return float(wt @ (torch.tensor(self.means, dtype=torch.float64) @ w)) + b
        v = float(self.reward.get("value", 1.0))
        p = box_probabilities(self)
        if not tilted:
            return v * float(wt @ p)
        g = math.exp(v / self.beta)
        return v * float((wt * g * p).sum() / (wt * (1 + (g - 1) * p)).sum())


def _phi(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))


def box_probabilities(problem: Problem) -> Tensor:
    """``P_k(box)`` for every component of a region-reward problem (product of 1-D normal CDF differences), (K,)."""
    mu = torch.tensor(problem.means, dtype=torch.float64)
    sd = torch.tensor(problem.stds, dtype=torch.float64)[:, None]
    lo = torch.tensor(problem.reward["low"], dtype=torch.float64)[None]
    hi = torch.tensor(problem.reward["high"], dtype=torch.float64)[None]
    return (_phi((hi - mu) / sd) - _phi((lo - mu) / sd)).prod(dim=1)


def tilted_component_mass(problem: Problem, wt: Tensor, beta: float) -> Tensor:
    """``w'_k ∝ w̃_k E_k[e^{r/β}]`` for the problem's reward (linear: Gaussian MGF; region: box probability)."""
    if problem.reward["name"] == "linear":
        mu = torch.tensor(problem.means, dtype=torch.float64)
        sd = torch.tensor(problem.stds, dtype=torch.float64)
        w = torch.tensor(problem.reward["w"], dtype=torch.float64)
        log_gain = mu @ w / beta + sd**2 * (w @ w) / (2 * beta**2)
        logw = torch.where(wt > 0, torch.log(wt.clamp_min(1e-300)) + log_gain, torch.full_like(wt, -math.inf))
        return torch.softmax(logw, dim=0)
    v = float(problem.reward.get("value", 1.0))
    gain = 1 + math.expm1(v / beta) * box_probabilities(problem)
    m = wt * gain
    return m / m.sum()


# ---------------------------------------------------------------------------------------------------------- generator
def _draw_means(rng: random.Random, k: int, d: int, min_dist: float) -> list[list[float]]:
    for _ in range(10_000):
        means = [[rng.uniform(-3.0, 3.0) for _ in range(d)] for _ in range(k)]
        if all(math.dist(a, b) >= min_dist for i, a in enumerate(means) for b in means[i + 1:]):
            return [[round(x, 4) for x in m] for m in means]
    raise RuntimeError("toy2d_problems: could not place separated means")  # pragma: no cover (K ≤ 4 in [−3, 3]^d)


def _move_fn(problem: Problem) -> Any:
    """``β ↦ max_mass_moved(β)`` in plain floats (the solver calls it a few hundred times per problem)."""
    rows = [problem.prompt_weights(p).tolist() for p in problem.prompts]
    if problem.reward["name"] == "linear":
        w = problem.reward["w"]
        a = [sum(m_i * w_i for m_i, w_i in zip(m, w)) for m in problem.means]
        b = [s * s * sum(w_i * w_i for w_i in w) / 2 for s in problem.stds]

        def gains(beta: float) -> list[float]:
            lg = [ak / beta + bk / beta**2 for ak, bk in zip(a, b)]
            top = max(lg)
            return [math.exp(v - top) for v in lg]
    else:
        pb = box_probabilities(problem).tolist()
        v = float(problem.reward.get("value", 1.0))

        def gains(beta: float) -> list[float]:
            return [1 + math.expm1(v / beta) * q for q in pb]

    def move(beta: float) -> float:
        g = gains(beta)
        best = 0.0
        for wt in rows:
            m = [x * y for x, y in zip(wt, g)]
            z = sum(m)
            best = max(best, 0.5 * sum(abs(x - y / z) for x, y in zip(wt, m)))
        return best

    return move


def _solve_beta(problem: Problem, move: float) -> float | None:
    """The largest β in [0.1, 20] with ``max_mass_moved(β) ≥ move`` (log grid, then bisection), or None."""
    moved = _move_fn(problem)
    grid = [math.exp(math.log(_BETA_RANGE[1]) + i * (math.log(_BETA_RANGE[0]) - math.log(_BETA_RANGE[1])) / 120)
            for i in range(121)]
    prev = None
    for b in grid:  # descending β: the first hit is the largest β (the gentlest tilt) that moves enough
        if moved(b) >= move:
            if prev is None:
                return b
            lo, hi = math.log(b), math.log(prev)
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                if moved(math.exp(mid)) >= move:
                    lo = mid
                else:
                    hi = mid
            return math.exp(lo)
        prev = b
    return None


def make_problem(seed: int, index: int, family: Literal["2d", "8d"] = "2d",
                 reward: Literal["linear", "region"] = "linear") -> Problem:
    """The random problem number ``index`` of stream ``seed`` (deterministic; see the module docstring).

    Raises:
        ValueError: an unknown family or reward kind, or a problem whose tilt cannot move ≥ 30 % of a prompt's mass
            for any β in [0.02, 50] (not observed; the check keeps the contract honest).
    """
    if family not in ("2d", "8d"):
        raise ValueError(f"family must be 2d or 8d, got {family!r}")
    if reward not in ("linear", "region"):
        raise ValueError(f"reward must be linear or region, got {reward!r}")
    d = 2 if family == "2d" else 8
    # one stream per (seed, index, family, reward kind); the string seed hashes deterministically (random's own sha512)
    rng = random.Random(f"toy2d-problem/{seed}/{index}/{family}/{reward}")
    k = rng.randint(2, 4)
    stds = [round(rng.uniform(0.3, 0.6), 4) for _ in range(k)]
    means = _draw_means(rng, k, d, 2.5)
    weights = [round(rng.uniform(0.5, 1.5), 4) for _ in range(k)]
    p0 = sorted(rng.sample(range(k), rng.randint(2, k)))
    p1 = p0
    while p1 == p0:
        p1 = sorted(rng.sample(range(k), rng.randint(1, k)))
        if k == 2 and p1 == p0:
            p1 = [rng.randrange(2)]
    prompts = {"p0": p0, "p1": p1}
    target = rng.uniform(*_MOVE_RANGE)
    for attempt in range(_MAX_DRAWS):  # redraw the reward (lowering the target to 0.32) until some β moves enough
        goal = max(MIN_MOVE + 0.02, target - 0.01 * attempt)
        if reward == "linear":
            g = [rng.gauss(0.0, 1.0) for _ in range(d)]
            n = math.sqrt(sum(x * x for x in g))
            spec: dict[str, Any] = {"name": "linear", "w": [round(x / n, 6) for x in g]}
        else:
            j = rng.choice(p0)
            half = [rng.uniform(1.0, 2.0) * stds[j] for _ in range(d)]
            centre = [means[j][i] + rng.uniform(-0.5, 0.5) * stds[j] for i in range(d)]
            spec = {"name": "region", "low": [round(c - h, 4) for c, h in zip(centre, half)],
                    "high": [round(c + h, 4) for c, h in zip(centre, half)], "value": 1.0}
        prob = Problem(f"{family}-{reward}-s{seed}-{index}", family, means, stds, weights, prompts, spec, 1.0)
        beta = _solve_beta(prob, goal)
        if beta is not None:
            prob.beta = math.floor(beta * 1e5) / 1e5  # round down: the move only grows
            break
    else:  # pragma: no cover - not observed
        raise ValueError(f"{family}-{reward}-s{seed}-{index}: no reward draw moves {target:.2f} of a prompt's mass")
    if prob.max_mass_moved() < MIN_MOVE:
        raise ValueError(f"{prob.name}: the tilt moves only {prob.max_mass_moved():.3f} of any prompt's mass")
    return prob


def make_problems(n: int, seed: int, family: str = "all", reward: str = "mixed") -> list[Problem]:
    """``n`` problems of stream ``seed``. ``family: all`` makes every fifth world (index 4, 9, …) 8-D;
    ``reward: mixed`` alternates linear (even index) and region (odd index) rewards."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if reward not in REWARD_KINDS:
        raise ValueError(f"reward must be one of {', '.join(REWARD_KINDS)}, got {reward!r}")
    out = []
    for i in range(n):
        fam = family if family != "all" else ("8d" if i % 5 == 4 else "2d")
        kind = reward if reward != "mixed" else ("linear" if i % 2 == 0 else "region")
        out.append(make_problem(seed, i, fam, kind))  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------------------------------------- metrics
def component_responsibilities(x: Tensor, means: Tensor, stds: Tensor, members: Sequence[int]) -> Tensor:
    """Soft assignment of points to the components ``members`` (equal priors), (N, K) with zeros elsewhere.

    Equal priors keep the assignment neutral between the teacher's and the target's weights; with components ≥ 4
    stds apart (the generator's separation) it is practically hard.
    """
    x = x.double()
    d = x.shape[1]
    logp = torch.full((x.shape[0], means.shape[0]), -math.inf, dtype=torch.float64)
    for k in members:
        s = float(stds[k])
        logp[:, k] = -((x - means[k]) ** 2).sum(1) / (2 * s * s) - d * math.log(s)
    return torch.softmax(logp, dim=1)
