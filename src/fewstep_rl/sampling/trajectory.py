"""Few-step sampling with a recorded trajectory, and log-prob recomputation (methods.md §7.4, §2.3, §2.4).

:func:`sample` runs the transitions of §1.2 over a σ grid and records, per step ``j``, the input ``x_j``, output
``x_{j+1}``, levels, velocity, transition mean/std and the rollout log-prob. :func:`recompute_log_prob` recomputes
a step's log-prob under the current weights from the stored ``(x_j, σ_j, σ_{j+1}, x_{j+1})``; with unchanged
weights it reproduces the rollout value bit for bit, so the PPO ratio is exactly 1 before any update.

Gradient modes: ``none`` (everything under no-grad), ``last`` (only the last executed step's velocity has a graph,
with a detached input: "gradient through the last executed step", RTDMD AC-DMD §2.3 and DRaFT-1 §6.5), ``all``
(backprop through the whole chain). Random stop (§2.3): run only steps ``0..stop-1``.

Deviations: the trajectory also stores ``sigma_max`` (needed to recompute ``flow_sde`` log-probs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fewstep_rl.sampling.noise import NoiseSource, randn
from fewstep_rl.sampling.transitions import LogProbMode, Transition, as_transition, step_log_prob, transition_mean_std

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``(x, sigma) -> v`` with ``sigma`` of shape ``(B,)``."""

NoiseFn = Callable[[int, tuple[int, ...], Tensor], Tensor]
"""``(step, shape, like) -> noise``, e.g. a :class:`~fewstep_rl.sampling.noise.NoiseSource`."""

GradMode = Literal["none", "last", "all"]


@dataclass
class Trajectory:
    """Record of a few-step rollout; list index = step ``j`` (methods.md §7.4).

    Attributes:
        x_in: Step inputs ``x_j`` (detached).
        x_out: Step outputs ``x_{j+1}`` (with graph on gradient steps, detached otherwise).
        sigma: Levels σ_j, shape ``(B,)``, as fed to the velocity function.
        sigma_next: Levels σ_{j+1}, shape ``(B,)``.
        v: Velocities at ``(x_j, σ_j)`` (with graph on gradient steps).
        mean: Transition means (with graph on gradient steps).
        std: Per-sample transition stds, shape ``(B, 1, ..., 1)`` (detached; zero on deterministic steps).
        log_prob: Rollout log-probs, shape ``(B,)`` (detached).
        final: The last ``x_out`` (with graph if the last step had one).
        transition: Transition used at every step.
        log_prob_mode: ``gaussian`` or ``cps_mse``.
        stop: Number of executed steps.
        sigma_max: ``flow_sde`` σ = 1 replacement used during the rollout.
    """

    x_in: list[Tensor] = field(default_factory=list)
    x_out: list[Tensor] = field(default_factory=list)
    sigma: list[Tensor] = field(default_factory=list)
    sigma_next: list[Tensor] = field(default_factory=list)
    v: list[Tensor] = field(default_factory=list)
    mean: list[Tensor] = field(default_factory=list)
    std: list[Tensor] = field(default_factory=list)
    log_prob: list[Tensor] = field(default_factory=list)
    final: Tensor | None = None
    transition: Transition = field(default_factory=lambda: Transition("euler"))
    log_prob_mode: LogProbMode = "gaussian"
    stop: int = 0
    sigma_max: Tensor | float | None = None


def _sigma_at(sigmas: Tensor, j: int, x: Tensor) -> Tensor:
    """Level ``j`` of a grid ``(K+1,)`` or per-sample grids ``(B, K+1)`` as a ``(B,)`` tensor on ``x``'s device."""
    s = sigmas[j].expand(x.shape[0]) if sigmas.ndim == 1 else sigmas[:, j]
    return s.to(x.device).contiguous()


def _validate(sigmas: Tensor, noise: Tensor, grad: str, stop: int | None, log_prob_mode: str) -> int:
    if sigmas.ndim not in (1, 2) or sigmas.shape[-1] < 2:
        raise ValueError(f"sigmas must have shape (K+1,) or (B, K+1) with K >= 1, got {tuple(sigmas.shape)}")
    if sigmas.ndim == 2 and sigmas.shape[0] != noise.shape[0]:
        raise ValueError(f"per-sample sigmas have batch {sigmas.shape[0]} but noise has batch {noise.shape[0]}")
    if grad not in ("none", "last", "all"):
        raise ValueError(f"grad must be 'none', 'last' or 'all', got {grad!r}")
    if log_prob_mode not in ("gaussian", "cps_mse"):
        raise ValueError(f"log_prob_mode must be 'gaussian' or 'cps_mse', got {log_prob_mode!r}")
    num_steps = sigmas.shape[-1] - 1
    stop = num_steps if stop is None else stop
    if not 1 <= stop <= num_steps:
        raise ValueError(f"stop must be in 1..{num_steps} (number of grid steps), got {stop}")
    return stop


def sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    transition: Transition | str,
    *,
    grad: GradMode = "none",
    stop: int | None = None,
    noise_source: NoiseFn | NoiseSource | None = None,
    generator: torch.Generator | None = None,
    log_prob_mode: LogProbMode = "gaussian",
    sigma_max: Tensor | float | None = None,
) -> Trajectory:
    """Run steps ``0..stop-1`` of the grid with one transition kind, recording the trajectory (methods.md §7.4).

    Injected noise is drawn only for stochastic steps (std ≠ 0), from ``noise_source(step, shape, like)`` if
    given, else from ``generator``.

    Args:
        velocity_fn: ``(x, sigma[B]) -> v``.
        noise: Initial sample at level ``sigmas[0]`` (usually pure noise at σ = 1).
        sigmas: Decreasing grid ``(K+1,)`` (or per-sample ``(B, K+1)``), e.g. :func:`sigma_grid`.
        transition: Transition or spec string (``"cps(0.9)"``).
        grad: ``none`` | ``last`` | ``all`` (see module docstring).
        stop: Number of steps to run (default K); e.g. :func:`random_stop`.
        noise_source: Per-step noise provider (e.g. group-shared noise at some steps).
        generator: Fresh-noise generator when ``noise_source`` is None.
        log_prob_mode: ``gaussian`` or ``cps_mse``.
        sigma_max: ``flow_sde`` σ = 1 replacement (default: the step's σ', i.e. the grid's second value).

    Returns:
        The :class:`Trajectory`.

    Raises:
        ValueError: On invalid arguments, or a stochastic step with neither ``noise_source`` nor ``generator``.

    Shapes:
        noise: (B, ...); sigmas: (K+1,) or (B, K+1).
    """
    tr = as_transition(transition)
    stop = _validate(sigmas, noise, grad, stop, log_prob_mode)
    traj = Trajectory(transition=tr, log_prob_mode=log_prob_mode, stop=stop, sigma_max=sigma_max)
    x = noise
    for j in range(stop):
        is_last = j == stop - 1
        with_grad = grad == "all" or (grad == "last" and is_last)
        if grad == "last" and is_last:
            x = x.detach()
        sigma, sigma_next = _sigma_at(sigmas, j, x), _sigma_at(sigmas, j + 1, x)
        with torch.set_grad_enabled(with_grad):
            v = velocity_fn(x, sigma)
            mean, std = transition_mean_std(tr, x, sigma, sigma_next, v, sigma_max)
        if bool((std != 0).any()):
            if noise_source is not None:
                z = noise_source(j, tuple(x.shape), mean)
            elif generator is not None:
                z = randn(x.shape, generator, mean)
            else:
                raise ValueError(f"step {j} of {tr} is stochastic: pass a generator or a noise_source")
            with torch.set_grad_enabled(with_grad):
                x_next = mean + std * z
        else:
            x_next = mean
        log_prob = step_log_prob(x_next.detach(), mean.detach(), std, log_prob_mode)
        traj.x_in.append(x.detach())
        traj.x_out.append(x_next if with_grad else x_next.detach())
        traj.sigma.append(sigma)
        traj.sigma_next.append(sigma_next)
        traj.v.append(v if with_grad else v.detach())
        traj.mean.append(mean if with_grad else mean.detach())
        traj.std.append(std.detach())
        traj.log_prob.append(log_prob)
        x = x_next
    traj.final = traj.x_out[-1]
    return traj


def recompute_log_prob(velocity_fn: VelocityFn, traj: Trajectory, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of a recorded step under the current weights (methods.md §2.4 step 6, §7.4 ``recompute_step``).

    Runs in the caller's grad mode (normally enabled, so the result carries the policy gradient). With unchanged
    weights the result equals ``traj.log_prob[step]`` exactly.

    Args:
        velocity_fn: ``(x, sigma[B]) -> v`` with the current weights.
        traj: A trajectory from :func:`sample`.
        step: Step index in ``0..traj.stop-1``.

    Returns:
        ``(log_prob[B], mean, v)`` under the current weights.

    Raises:
        IndexError: If ``step`` was not executed.
    """
    if not 0 <= step < traj.stop:
        raise IndexError(f"step {step} not in the executed steps 0..{traj.stop - 1}")
    x, sigma = traj.x_in[step], traj.sigma[step]
    v = velocity_fn(x, sigma)
    mean, std = transition_mean_std(traj.transition, x, sigma, traj.sigma_next[step], v, traj.sigma_max)
    log_prob = step_log_prob(traj.x_out[step].detach(), mean, std, traj.log_prob_mode)
    return log_prob, mean, v


def random_stop(num_steps: int, generator: torch.Generator) -> int:
    """Random stop index, uniform in ``1..num_steps`` (methods.md §2.3 "Backward simulation with random stop").

    Identical on every rank when ``generator`` is seeded identically.

    Args:
        num_steps: Number of grid steps K ≥ 1.
        generator: Rank-synchronised generator.

    Returns:
        Number of steps to execute.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return int(torch.randint(1, num_steps + 1, (1,), generator=generator, device=generator.device).item())
