"""The reward zoo (installed as ``fewstep_rl.rewards``): one file per reward family, registered through the
``fewstep_rl.rewards`` entry-point group."""

from fewstep_rl.rewards.base import MultiReward, Reward, RolloutScores

__all__ = ["MultiReward", "Reward", "RolloutScores"]
