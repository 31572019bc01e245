"""Reward serving: the JSON wire protocol (:mod:`.protocol`) and ``fewstep-rl reward-server`` (:mod:`.server`)."""
