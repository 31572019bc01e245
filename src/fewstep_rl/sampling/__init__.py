"""Sampling math: flow parameterisation, σ grids, transitions, noise, trajectories (methods.md §1.1, §1.2, §7.4, §7.5).

Pure torch; randomness only from explicit ``torch.Generator`` arguments.
"""

from fewstep_rl.sampling.noise import NoiseSource, group_noise, randn, stable_hash
from fewstep_rl.sampling.param import (
    eps_from_v,
    expand_sigma,
    forward_noise,
    score_from_v,
    v_from_eps,
    v_from_x0,
    x0_from_v,
)
from fewstep_rl.sampling.sigmas import flux2_mu, flux_mu, shift_dynamic, shift_static, sigma_grid, unshift_static
from fewstep_rl.sampling.timesteps import (
    ambient_renoise_levels,
    sample_interval,
    sample_logit_normal,
    sample_uniform,
)
from fewstep_rl.sampling.trajectory import (
    Trajectory,
    VelocityFn,
    random_stop,
    recompute_log_prob,
    sample,
)
from fewstep_rl.sampling.transitions import (
    LogProbMode,
    Transition,
    TransitionKind,
    as_transition,
    step_log_prob,
    transition_mean_std,
    transition_step,
)

__all__ = [
    "LogProbMode",
    "NoiseSource",
    "Trajectory",
    "Transition",
    "TransitionKind",
    "VelocityFn",
    "ambient_renoise_levels",
    "as_transition",
    "eps_from_v",
    "expand_sigma",
    "flux_mu",
    "flux2_mu",
    "forward_noise",
    "group_noise",
    "random_stop",
    "randn",
    "recompute_log_prob",
    "sample",
    "sample_interval",
    "sample_logit_normal",
    "sample_uniform",
    "score_from_v",
    "shift_dynamic",
    "shift_static",
    "sigma_grid",
    "stable_hash",
    "step_log_prob",
    "transition_mean_std",
    "transition_step",
    "unshift_static",
    "v_from_eps",
    "v_from_x0",
    "x0_from_v",
]
