"""Training-step building blocks over a method's roles, shared by several methods' numbered recipes.

Pure math lives in :mod:`fewstep_rl.objectives` and :mod:`fewstep_rl.sampling`; the blocks here call a
:class:`~fewstep_rl.method.FewStepMethod`'s backbone, keyed generators and optimiser steps, so that a recipe step
that several methods share is written once (style: shared logic moves down into the library, not up into a base
class). Each block draws its randomness from the method's keyed generators under the tag it is given, in a fixed
order, so a method that composes them resumes bit-exactly.
"""

from fewstep_rl.steps.dmd import fake_score_flow_matching_step, generator_rollout, renoised_teacher_fake_x0

__all__ = ["fake_score_flow_matching_step", "generator_rollout", "renoised_teacher_fake_x0"]
