"""One-step transition kernels σ → σ' and their per-step log-likelihoods (methods.md §1.2).

With ``v`` the velocity at ``(x, σ)``, ``x̂0 = x - σv``, ``ε̂ = x + (1-σ)v``, ``d = σ' - σ < 0``:

| kind        | mean μ                                                     | std                 |
|-------------|------------------------------------------------------------|---------------------|
| ``euler``   | ``x + d·v``                                                | 0                   |
| ``cps``     | ``(1-σ')x̂0 + σ' cos θ ε̂``, θ = ηπ/2                        | ``σ' sin θ``        |
| ``flow_sde``| ``x(1 + s²d/(2σ)) + v(1 + s²(1-σ)/(2σ))d``, s = η√(σ/(1-σ)) | ``s√(-d)``          |
| ``dance_sde``| ``x + d·v - ½η²·score·d``, score = -(x-(1-σ)x̂0)/σ²        | ``η√(-d)``          |

and ``x' = μ + std·z``. Log-likelihood modes: ``gaussian`` (Flow-GRPO / DanceGRPO, mean over latent dims) and
``cps_mse`` (RTDMD's surrogate ``-mean_d (x'-μ)²``).

Deviations / conventions:

* Flow-GRPO replaces σ = 1 in the denominator of ``s`` by the grid's second value (``sigma_max``); when
  ``sigma_max`` is None we use ``σ'`` of the same step, which is the grid's second value for the first step.
* Transition arithmetic runs in at least float32 (as Flow-GRPO's ``sde_step_with_logprob``); outputs are in the
  promoted dtype of ``x``, ``v`` and float32.
* The Gaussian log-prob of a deterministic step (std = 0) is defined as 0 (the density is a point mass); no NaN
  is produced and no gradient flows through it.
* DPM-Solver++(2M) is multistep and lives outside this one-step API.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from fewstep_rl.sampling.param import eps_from_v, expand_sigma, score_from_v, x0_from_v

TransitionKind = Literal["euler", "cps", "flow_sde", "dance_sde"]
LogProbMode = Literal["gaussian", "cps_mse"]

_ALLOWED_FORMS = '"euler", "cps(ETA)", "flow_sde(ETA)", "dance_sde(ETA)" (e.g. "cps(0.9)", "flow_sde(0.7)")'
_SPEC_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*([^()]*?)\s*\))?\s*$")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Transition:
    """A one-step transition kernel (methods.md §1.2).

    Attributes:
        kind: ``euler`` (deterministic), ``cps`` (coefficient-preserving, η ∈ [0, 1]), ``flow_sde`` (Flow-GRPO SDE,
            η ≥ 0) or ``dance_sde`` (DanceGRPO SDE, η ≥ 0).
        eta: Stochasticity η; must be 0 for ``euler``.
    """

    kind: TransitionKind
    eta: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in get_args(TransitionKind):
            raise ValueError(f"unknown transition kind {self.kind!r}; allowed forms: {_ALLOWED_FORMS}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"transition eta must be finite and >= 0, got {self.eta!r}")
        if self.kind == "euler" and self.eta != 0:
            raise ValueError(f"euler is deterministic and takes no eta, got eta={self.eta}")
        if self.kind == "cps" and self.eta > 1:
            raise ValueError(f"cps eta must be in [0, 1] (θ = ηπ/2), got {self.eta}")

    @classmethod
    def parse(cls, spec: str) -> Transition:
        """Parse ``"euler"``, ``"cps(0.9)"``, ``"flow_sde(0.7)"`` or ``"dance_sde(0.3)"``.

        Args:
            spec: Transition spec string.

        Returns:
            The parsed transition.

        Raises:
            ValueError: If ``spec`` is not one of the allowed forms.
        """
        m = _SPEC_RE.match(spec) if isinstance(spec, str) else None
        if m is None or m.group(1) not in get_args(TransitionKind):
            raise ValueError(f"cannot parse transition {spec!r}; allowed forms: {_ALLOWED_FORMS}")
        kind, arg = m.group(1), m.group(2)
        if kind == "euler":
            if arg not in (None, ""):
                raise ValueError(
                    f"cannot parse transition {spec!r}: euler takes no eta; allowed forms: {_ALLOWED_FORMS}"
                )
            return cls("euler")
        if arg in (None, ""):
            raise ValueError(f"cannot parse transition {spec!r}: {kind} needs an eta; allowed forms: {_ALLOWED_FORMS}")
        try:
            eta = float(arg)
        except ValueError:
            raise ValueError(
                f"cannot parse transition {spec!r}: bad eta {arg!r}; allowed forms: {_ALLOWED_FORMS}"
            ) from None
        return cls(kind, eta)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return "euler" if self.kind == "euler" else f"{self.kind}({self.eta:g})"


def as_transition(transition: Transition | str) -> Transition:
    """Return ``transition`` itself, or parse it if it is a spec string."""
    return transition if isinstance(transition, Transition) else Transition.parse(transition)


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a scalar/per-sample tensor to ``(B, 1, ..., 1)`` (contiguous)."""
    return torch.broadcast_to(t, (x.shape[0],) + (1,) * (x.ndim - 1)).contiguous()


def transition_mean_std(
    tr: Transition | str,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    v: Tensor,
    sigma_max: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of one transition σ → σ' (methods.md §1.2 table).

    Args:
        tr: Transition (or spec string).
        x: Current sample at level ``sigma``.
        sigma: Current level σ (scalar or per-sample).
        sigma_next: Next level σ' < σ (scalar or per-sample).
        v: Velocity at ``(x, σ)``.
        sigma_max: ``flow_sde`` only: value replacing σ = 1 in the denominator of ``s_t`` (Flow-GRPO uses the
            grid's second value). None → ``sigma_next``.

    Returns:
        ``(mean, std)``: mean shaped like ``x``; std per-sample, shape ``(B, 1, ..., 1)``, zero for deterministic
        steps. Both in at least float32.

    Shapes:
        x, v: (B, ...); sigma, sigma_next, sigma_max: () or (B,).
    """
    tr = as_transition(tr)
    dtype = _compute_dtype(x, v)
    x, v = x.to(dtype), v.to(dtype)
    s = expand_sigma(sigma, x).to(dtype)
    s_next = expand_sigma(sigma_next, x).to(dtype)
    d = s_next - s
    if tr.kind == "euler":
        mean = x + d * v
        std = torch.zeros_like(s_next)
    elif tr.kind == "cps":
        theta = tr.eta * math.pi / 2
        mean = (1 - s_next) * x0_from_v(x, s, v) + s_next * math.cos(theta) * eps_from_v(x, s, v)
        std = s_next * math.sin(theta)
    elif tr.kind == "flow_sde":
        s_max = s_next if sigma_max is None else expand_sigma(sigma_max, x).to(dtype)
        denom_sigma = torch.where(s == 1, s_max, s)
        st2 = tr.eta**2 * s / (1 - denom_sigma)  # s_t²
        mean = x * (1 + st2 / (2 * s) * d) + v * (1 + st2 * (1 - s) / (2 * s)) * d
        std = torch.sqrt(st2) * torch.sqrt(-d)
    else:  # dance_sde
        score = score_from_v(x, s, v)  # = -(x - (1-σ)x̂0)/σ²
        mean = x + d * v - 0.5 * tr.eta**2 * score * d
        std = tr.eta * torch.sqrt(-d)
    return mean, _per_sample(std, x)


def transition_step(
    tr: Transition | str,
    x: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    v: Tensor,
    noise: Tensor | None,
    sigma_max: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One transition ``x' = μ + std·z`` (methods.md §1.2).

    Args:
        tr: Transition (or spec string).
        x: Current sample at level ``sigma``.
        sigma: Current level σ.
        sigma_next: Next level σ'.
        v: Velocity at ``(x, σ)``.
        noise: Standard normal ``z`` shaped like ``x``; may be None when the step is deterministic (std = 0).
        sigma_max: See :func:`transition_mean_std`.

    Returns:
        ``(x_next, mean, std)``; for a deterministic step ``x_next`` is ``mean`` itself.

    Raises:
        ValueError: If ``noise`` is None for a stochastic step.
    """
    mean, std = transition_mean_std(tr, x, sigma, sigma_next, v, sigma_max)
    if noise is None:
        if bool((std != 0).any()):
            raise ValueError(f"transition {as_transition(tr)} is stochastic at this step; noise is required")
        return mean, mean, std
    return mean + std * noise.to(mean.dtype), mean, std


def step_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, mode: LogProbMode = "gaussian") -> Tensor:
    """Per-sample log-likelihood of one transition (methods.md §1.2 "Per-step log-likelihood").

    * ``gaussian``: ``mean_d[-(x'-μ)²/(2 std²) - log std - ½ log 2π]`` (mean over all non-batch dims). Samples with
      std = 0 (deterministic steps) get log-prob 0 by definition, without NaN in value or gradient.
    * ``cps_mse``: RTDMD's surrogate ``-mean_d (x'-μ)²`` (no variance scaling, no constants).

    Args:
        x_next: Observed next sample x'.
        mean: Transition mean μ (carries the gradient).
        std: Per-sample std, broadcastable to ``x_next``.
        mode: ``gaussian`` or ``cps_mse``.

    Returns:
        Log-prob per sample, shape ``(B,)``, in at least float32.

    Raises:
        ValueError: On an unknown mode.
    """
    dtype = _compute_dtype(x_next, mean)
    diff2 = (x_next.to(dtype) - mean.to(dtype)) ** 2
    dims = tuple(range(1, diff2.ndim))
    if mode == "cps_mse":
        return -diff2.mean(dim=dims)
    if mode != "gaussian":
        raise ValueError(f"unknown log-prob mode {mode!r}; allowed: 'gaussian', 'cps_mse'")
    std = std.to(dtype)
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    lp = -diff2 / (2 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    lp = torch.where(stochastic, lp, torch.zeros_like(lp))
    return lp.mean(dim=dims)
