"""Loss library: pure functions of tensors returning scalar losses (methods.md §1.3–§1.5, §6.2, §7.8).

No ``.backward()``, no optimizers, no config objects.
"""

from fewstep_rl.objectives.advantages import (
    advantages_to_unit,
    group_advantages,
    loo_advantages,
    multi_reward_advantages,
    nonzero_mask,
    regime_advantages,
)
from fewstep_rl.objectives.ambient import (
    ambient_coeffs,
    ambient_dsm_loss,
    ambient_renoise,
    ambient_velocity_target,
    anchored_target,
    cps_transport,
)
from fewstep_rl.objectives.consistency import consistency_loss, consistency_mse
from fewstep_rl.objectives.direction import direction_loss
from fewstep_rl.objectives.dmd import dmd_grad_direction, dmd_loss
from fewstep_rl.objectives.fake_score import flow_matching_loss
from fewstep_rl.objectives.ppo import mean_kl, ppo_clip_loss
from fewstep_rl.objectives.reward import reward_hinge

__all__ = [
    "advantages_to_unit",
    "ambient_coeffs",
    "ambient_dsm_loss",
    "ambient_renoise",
    "ambient_velocity_target",
    "anchored_target",
    "consistency_loss",
    "consistency_mse",
    "cps_transport",
    "direction_loss",
    "dmd_grad_direction",
    "dmd_loss",
    "flow_matching_loss",
    "group_advantages",
    "loo_advantages",
    "mean_kl",
    "multi_reward_advantages",
    "nonzero_mask",
    "ppo_clip_loss",
    "regime_advantages",
    "reward_hinge",
]
