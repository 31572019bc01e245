"""The ``toy2d`` world: an exact Gaussian-mixture teacher in R^d with exact reward-tilted targets (architecture.md §4).

Teacher: ``p(x | c) = Σ_{k ∈ c} w̃_k N(x; μ_k, s_k² I)`` with the prompt's weights renormalised (``w̃_k ∝ w_k``),
served by :class:`~fewstep_rl.backbones.toy2d.GaussianMixtureBackbone` with a closed-form velocity at every σ.

Reward-tilted target. Every reward-driven method targets ``p_β(x | c) = p(x | c) exp(r(x)/β) / Z(c)``. For a linear
reward ``r(x) = w·x + b`` (or any weighted sum of linear rewards, ``w = Σ_j λ_j w_j``) completing the square gives

    N(x; μ, s² I) · exp(w·x/β) = N(x; μ + s² w/β, s² I) · exp(w·μ/β + s² ‖w‖² / (2β²)),

so ``p_β`` is again a Gaussian mixture: every mean moves by ``s_k² w/β``, the stds are unchanged, and every weight is
multiplied by ``exp(w·μ_k/β + s_k² ‖w‖²/(2β²))`` and renormalised (the offset ``b`` cancels in ``Z``). Rewards
that are bounded, ``r ≤ r_max`` (the region indicator), are sampled exactly by rejection from the linear-tilted
mixture with acceptance probability ``exp((r_b(x) − r_max)/β) ≤ 1``; mixtures of linear and bounded rewards are
handled by the same two steps. Nothing else has an exact target here (``NotImplementedError``).

Guidance. ``teacher_guidance = 1``: the closed forms are the targets of the *unguided* teacher. With CFG
(``guidance > 1``) a method's effective teacher is the guided flow, whose law is not this mixture (nor the
``p(x|c)^ω p(x)^{1−ω}`` product), so the exact targets here no longer apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.backbones.toy2d import GaussianMixtureBackbone, sample_gaussian_mixture
from fewstep_rl.config import build, knob
from fewstep_rl.eval.metrics import energy_distance
from fewstep_rl.rewards.base import Reward
from fewstep_rl.rewards.toy2d import LinearReward, RegionReward
from fewstep_rl.worlds.base import World

_MAX_REJECTION_ROUNDS = 1000
_MAX_PROPOSALS = 1 << 20


@dataclasses.dataclass
class Toy2DConfig:
    """Public ``world.*`` keys of the ``toy2d`` world."""

    means: list[list[float]] = knob(
        help="component means μ_k, one list of d floats per component", factory=lambda: [[-2.0, 0.0], [2.0, 0.0]]
    )
    stds: list[float] = knob(help="isotropic standard deviation s_k > 0 per component", factory=lambda: [0.5, 0.5])
    weights: list[float] = knob(help="mixture weights w_k > 0 (renormalised)", factory=lambda: [0.5, 0.5])
    prompts: dict[str, list[int]] = knob(
        help='prompt → component indices; "" is always the full mixture (empty mapping: train unconditionally on "")',
        factory=lambda: {"left": [0], "right": [1]},
    )
    hidden: int = knob(128, "hidden width of the residual-MLP role adapters")
    layers: int = knob(3, "number of linear layers of each role adapter")
    eval_samples: int = knob(2000, "samples generated per metric evaluation (exact reference sets match this size)")

    def __post_init__(self) -> None:
        k = len(self.means)
        if k == 0:
            raise ValueError("toy2d: means needs at least one component")
        d = len(self.means[0])
        if d == 0 or any(len(m) != d for m in self.means):
            raise ValueError(
                f"toy2d: every mean needs the same non-zero dimension; got lengths {[len(m) for m in self.means]}"
            )
        if len(self.stds) != k or len(self.weights) != k:
            raise ValueError(
                f"toy2d: {k} means but {len(self.stds)} stds and {len(self.weights)} weights; give one each"
            )
        if any(not s > 0 for s in self.stds):
            raise ValueError(f"toy2d: every std must be > 0, got {self.stds}")
        if any(not w > 0 for w in self.weights):
            raise ValueError(f"toy2d: every weight must be > 0, got {self.weights}")
        for name, idx in self.prompts.items():
            if name == "":
                raise ValueError('toy2d: prompt "" is reserved for the full mixture; remove it from prompts')
            if not idx or any(not 0 <= i < k for i in idx):
                raise ValueError(
                    f"toy2d: prompt {name!r} has component indices {idx}; need a non-empty subset of 0..{k - 1}"
                )
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"toy2d: hidden and layers must be >= 1, got hidden={self.hidden}, layers={self.layers}")
        if self.eval_samples < 2:
            raise ValueError(f"toy2d: eval_samples must be >= 2, got {self.eval_samples}")


RewardsLike = Any  # MultiReward, a Reward, or a sequence of Rewards


class Toy2DWorld(World):
    """Exact Gaussian-mixture teacher, linear/region rewards and exact (tilted) targets; see the module docstring."""

    name = "toy2d"
    Config = Toy2DConfig
    sample_kind = "points"
    teacher_guidance = 1.0

    def __init__(self, cfg: Toy2DConfig | Mapping[str, Any] | None = None) -> None:
        if cfg is None:
            cfg = Toy2DConfig()
        elif isinstance(cfg, Mapping):
            cfg = build(Toy2DConfig, cfg, "world")
        super().__init__(cfg)
        self._exact = self.build_backbone()  # CPU, float64 buffers; used for exact reference samples only

    # ---------------------------------------------------------------- world contract
    @property
    def dim(self) -> int:
        """Data dimension d."""
        return len(self.cfg.means[0])

    @classmethod
    def check_roles(cls, roles: Any) -> None:
        """toy2d's roles are residual MLPs (sized by ``world.hidden``/``world.layers``): only ``roles.mode: lora``."""
        if roles.mode != "lora":
            raise ValueError(f"toy2d roles are residual-MLP adapters on the analytic teacher; roles.mode must be "
                             f"'lora', got {roles.mode!r}")
        for key in ("rank", "alpha", "targets", "activation_checkpointing"):
            if getattr(roles, key):
                raise ValueError(f"roles.{key} does not apply to toy2d (its adapters are residual MLPs sized by "
                                 "world.hidden and world.layers)")

    def build_backbone(self) -> GaussianMixtureBackbone:
        """A fresh analytic teacher with no roles."""
        c = self.cfg
        return GaussianMixtureBackbone(c.means, c.stds, c.weights, c.prompts, hidden=c.hidden, layers=c.layers)

    @property
    def train_prompts(self) -> list[str]:
        """The configured prompt names (``[""]`` when none are configured)."""
        return list(self.cfg.prompts) or [""]

    def default_rewards(self) -> list[dict]:
        return [{"name": "linear", "w": [1.0, 0.0]}]

    # ---------------------------------------------------------------- exact distributions
    def sample_teacher(self, prompts: Sequence[str], generator: torch.Generator | None = None) -> Tensor:
        """Exact teacher samples, one per prompt, (N, d) float32 on the CPU."""
        return self._exact.sample_exact(prompts, generator)

    def tilted_mixture(self, prompt: str, w: Sequence[float] | Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
        """Closed-form ``p(x|prompt) exp(w·x/β)/Z`` as a mixture (float64, all K components, zeros if unselected).

        Returns:
            ``(means (K, d), stds (K,), weights (K,))`` with ``μ'_k = μ_k + s_k² w/β`` and
            ``w'_k ∝ w̃_k exp(w·μ_k/β + s_k² ‖w‖²/(2β²))``.
        """
        mu, sd, wt = self._exact.prompt_mixture(prompt)
        means, weights = self._tilt(mu, sd, wt[None], self._as_direction(w), beta)
        return means, sd.clone(), weights[0]

    @staticmethod
    def _tilt(mu: Tensor, sd: Tensor, wt: Tensor, w: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        """Tilted means (K, d) and per-row tilted weights (N, K) for prompt weights ``wt`` (N, K)."""
        _check_beta(beta)
        means = mu + (sd**2)[:, None] * w[None] / beta
        log_gain = mu @ w / beta + sd**2 * (w @ w) / (2 * beta**2)  # (K,)
        logw = torch.log(wt.clamp_min(0)) + log_gain[None]
        return means, torch.softmax(logw, dim=1)

    def check_reward(self, reward: Reward) -> None:
        """Raise ValueError when a configured reward does not fit this world's dimension."""
        if isinstance(reward, LinearReward):
            self._as_direction(reward.cfg.w)
        elif isinstance(reward, RegionReward) and not len(reward.cfg.low) == len(reward.cfg.high) == self.dim:
            raise ValueError(f"toy2d: region low/high need {self.dim} entries each, got {reward.cfg.low}, {reward.cfg.high}")
        elif reward.name == "proxy" or reward.name == "gold":
            raise ValueError("this reward scores images; toy2d samples are points (use linear or region)")

    def _as_direction(self, w: Sequence[float] | Tensor) -> Tensor:
        wv = torch.as_tensor(w, dtype=torch.float64).reshape(-1)
        if wv.numel() != self.dim:
            raise ValueError(f"toy2d: linear reward direction has {wv.numel()} entries but the world has d={self.dim}")
        return wv

    def _split_rewards(self, terms: list[tuple[Reward, float]]) -> tuple[Tensor, list[tuple[Reward, float]], float]:
        """``(Σ λ_j w_j over linear rewards, [(bounded reward, λ)], r_max of the bounded part)``."""
        w = torch.zeros(self.dim, dtype=torch.float64)
        bounded, r_max = [], 0.0
        for r, lam in terms:
            if isinstance(r, LinearReward):
                w = w + lam * self._as_direction(r.cfg.w)
            elif callable(getattr(r, "bounds", None)):
                lo, hi = r.bounds()  # type: ignore[operator]
                bounded.append((r, lam))
                r_max += max(lam * lo, lam * hi)
            else:
                raise NotImplementedError(
                    f"toy2d: no exact tilted target for reward {r.name!r}: the closed form needs linear rewards and "
                    "rejection sampling needs bounded rewards (with a bounds() method, e.g. 'region')"
                )
        return w, bounded, r_max

    def sample_tilted(
        self,
        prompts: Sequence[str],
        rewards: RewardsLike,
        weights: Sequence[float] | None,
        beta: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact samples of ``p(x|c) exp(r(x)/β)/Z(c)`` for ``r = Σ_j λ_j r_j``, one per prompt, (N, d) float32, CPU.

        Linear parts tilt the mixture in closed form; bounded parts are then applied by rejection with acceptance
        ``exp((r_b(x) − r_max)/β)``.

        Args:
            prompts: one prompt per sample.
            rewards: a ``MultiReward`` (its own weights are used), a ``Reward`` or a list of ``Reward``.
            weights: λ_j for a list of rewards (default 1 each); ignored for a ``MultiReward``.
            beta: temperature β > 0.
            generator: the only source of randomness.

        Raises:
            NotImplementedError: a reward that is neither linear nor bounded.
        """
        _check_beta(beta)
        terms = reward_terms(rewards, weights)
        w, bounded, r_max = self._split_rewards(terms)
        mu, sd = self._exact.means, self._exact.stds
        means, per_row = self._tilt(mu, sd, self._exact.encode_prompts(prompts, dtype=torch.float64), w, beta)
        if not bounded:
            return sample_gaussian_mixture(means, sd, per_row, generator).float()
        out = torch.empty(len(prompts), self.dim, dtype=torch.float64)
        pending = torch.arange(len(prompts))
        per_slot = 1
        dev = generator.device if generator is not None else torch.device("cpu")
        for _ in range(_MAX_REJECTION_ROUNDS):
            rows = pending.repeat_interleave(per_slot)
            x = sample_gaussian_mixture(means, sd, per_row[rows], generator)
            rb = self._combined(bounded, x.float(), [prompts[i] for i in rows.tolist()]).double().cpu()
            u = torch.rand(len(rows), generator=generator, device=dev, dtype=torch.float64).cpu()
            accept = (u < torch.exp((rb - r_max) / beta)).reshape(len(pending), per_slot)
            hit = accept.any(dim=1)
            first = accept.float().argmax(dim=1)
            picked = x.reshape(len(pending), per_slot, self.dim)[torch.arange(len(pending)), first]
            out[pending[hit]] = picked[hit]
            rate = float(accept.float().mean())
            pending = pending[~hit]
            if len(pending) == 0:
                return out.float()
            per_slot = int(min(max(math.ceil(2.0 / max(rate, 1e-12)), 1), max(_MAX_PROPOSALS // len(pending), 1)))
        raise RuntimeError(
            f"toy2d: rejection sampling of the tilted target did not finish after {_MAX_REJECTION_ROUNDS} rounds "
            f"(acceptance too small; β={beta} is too small for the bounded reward)"
        )

    def tilted_mean_reward(
        self,
        prompts: Sequence[str],
        rewards: RewardsLike,
        weights: Sequence[float] | None,
        beta: float,
        generator: torch.Generator | None = None,
    ) -> float:
        """Monte-Carlo ``E_{p_β}[r]`` of the exact tilted target from one exact sample per prompt."""
        x = self.sample_tilted(prompts, rewards, weights, beta, generator)
        return float(self._combined(reward_terms(rewards, weights), x, prompts).mean())

    def _combined(self, terms: list[tuple[Reward, float]], x: Tensor, prompts: Sequence[str]) -> Tensor:
        """``Σ_j λ_j r_j(x)`` (B,), evaluated on ``x``'s device without gradients."""
        meta = [self.prompt_meta(p) for p in prompts]
        with torch.no_grad():
            total = torch.zeros(x.shape[0], device=x.device)
            for r, lam in terms:
                total = total + lam * r(x, list(prompts), meta).to(total)
        return total

    # ---------------------------------------------------------------- evaluation
    def evaluate(
        self,
        samples: Tensor,
        prompts: Sequence[str],
        rewards: RewardsLike = None,
        beta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Energy distances to exact references and reward statistics.

        Keys: ``energy_teacher`` (samples vs. an equal-size exact teacher set for the same prompts) and
        ``energy_noise_floor`` (two independent exact teacher sets of that size: the value a perfect sampler
        reaches). With ``rewards`` and ``beta``: ``energy_tilted`` / ``energy_tilted_floor`` (same against the exact
        tilted target), ``reward_mean``, ``tilted_reward_mean`` and ``teacher_reward_mean`` (combined reward
        ``Σ λ_j r_j``), and for each region reward ``<name>_mass``, ``tilted_<name>_mass``, ``teacher_<name>_mass``
        (fraction of samples in the box). ``generator=None`` uses a fixed seed (0), so evaluation is repeatable.
        """
        if samples.shape[0] != len(prompts):
            raise ValueError(f"toy2d evaluate: {samples.shape[0]} samples but {len(prompts)} prompts")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        x = samples.detach().reshape(samples.shape[0], -1)
        xc = x.float().cpu()
        teacher = self.sample_teacher(prompts, generator)
        out = {
            "energy_teacher": energy_distance(xc, teacher),
            "energy_noise_floor": energy_distance(self.sample_teacher(prompts, generator), teacher),
        }
        if rewards is None or beta is None:
            return out
        terms = reward_terms(rewards, None)
        tilted = self.sample_tilted(prompts, rewards, None, beta, generator)
        out["energy_tilted"] = energy_distance(xc, tilted)
        out["energy_tilted_floor"] = energy_distance(
            self.sample_tilted(prompts, rewards, None, beta, generator), tilted
        )
        sets = {"": x, "tilted_": tilted.to(x.device, x.dtype), "teacher_": teacher.to(x.device, x.dtype)}
        for tag, pts in sets.items():
            out[f"{tag}reward_mean"] = float(self._combined(terms, pts, prompts).mean())
            for r, _ in terms:
                if isinstance(r, RegionReward) and r.cfg.value != 0:
                    out[f"{tag}{r.name}_mass"] = float(self._combined([(r, 1.0 / r.cfg.value)], pts, prompts).mean())
        return out


def reward_terms(rewards: RewardsLike, weights: Sequence[float] | None = None) -> list[tuple[Reward, float]]:
    """``[(reward, λ)]`` from a ``MultiReward`` (its weights), a single ``Reward`` or a list with ``weights``."""
    if hasattr(rewards, "rewards") and hasattr(rewards, "weights"):
        return [(r, float(w)) for r, w in zip(rewards.rewards, rewards.weights)]
    if isinstance(rewards, Reward):
        return [(rewards, 1.0 if weights is None else float(weights[0]))]
    rs = list(rewards)
    ws = [1.0] * len(rs) if weights is None else [float(w) for w in weights]
    if len(ws) != len(rs):
        raise ValueError(f"toy2d: {len(rs)} rewards but {len(ws)} weights")
    if not rs:
        raise ValueError("toy2d: no rewards given")
    return list(zip(rs, ws))


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
