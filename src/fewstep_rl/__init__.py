"""fewstep-rl: reward alignment and distillation of few-step flow generators."""

__version__ = "0.1.0"
