"""The DMD-family recipe steps shared by ``dmd2``, ``didr`` and ``di_star`` (methods.md §1.4, §3, DMD2 §4.2).

Every DMD-style method repeats three steps around its own generator loss:

1. *rollout*: the generator's own few-step chain from keyed noise, with DMD2's backward simulation (a random stop
   index k: the chain runs k steps and its last executed step carries the gradient) —
   :func:`generator_rollout`;
2. *the teacher/fake pair*: re-noise the generator's ``x0`` to ``x_t = (1−t)x0 + tε``, ``t ~ U[t_min, t_max]``, and
   read the frozen teacher's (CFG ω) and the fake score's denoised estimates ``x̂0 = x_t − t·v`` there (no
   gradient) — :func:`renoised_teacher_fake_x0`; the method turns them into its generator loss;
3. *the fake-score update*: flow matching ``‖v_ψ(x_t, t) − (ε − x0)‖²`` on the detached generator samples,
   ``t ~ U(0, 1]`` clamped at 1e-3, one optimiser step — :func:`fake_score_flow_matching_step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fewstep_rl.objectives import flow_matching_loss
from fewstep_rl.sampling import Trajectory, forward_noise, random_stop, sample, x0_from_v
from fewstep_rl.sampling.trajectory import GradMode

if TYPE_CHECKING:
    from fewstep_rl.method import FewStepMethod


def generator_rollout(
    method: FewStepMethod, cond: Any, n: int, *, num_steps: int, backward_simulation: bool, grad: GradMode
) -> Trajectory:
    """The generator's chain on ``n`` prompts from the method's keyed noise (tags ``stop``, ``rollout``).

    ``backward_simulation``: DMD2's random stop index k ∈ 1..``num_steps`` (rank-synchronised), else the full chain.
    ``grad``: the sampler's gradient mode (``none``, ``last``: the last executed step, ``all``: the whole chain).
    """
    stop = random_stop(num_steps, method.rng("stop", per_rank=False)) if backward_simulation else None
    g = method.rng("rollout")
    return sample(
        method.velocity_fn("generator", cond),
        method.randn(method.sample_shape(n), g),
        method.sampling_sigmas().to(method.device),
        method.sampling_transition(),
        grad=grad,
        stop=stop,
        generator=g,
    )


def renoised_teacher_fake_x0(
    method: FewStepMethod, x0: Tensor, cond: Any, *, tag: str, t_min: float, t_max: float, guidance: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-noise ``x0`` (detached) at ``t ~ U[t_min, t_max]`` and read teacher and fake score there (no gradient).

    Draws ``t`` then ``ε`` from the keyed generator ``tag``. Returns ``(x_t, t, x̂0_teacher, x̂0_fake)``, shapes
    ``x0.shape``, ``[B]``, ``x0.shape``, ``x0.shape``; the teacher is queried with CFG scale ``guidance``.
    """
    g = method.rng(tag)
    t = t_min + (t_max - t_min) * method.rand(x0.shape[0], g)
    x_t = forward_noise(x0.detach(), method.randn(x0.shape, g), t)
    with torch.no_grad():
        x0_teacher = x0_from_v(x_t, t, method.backbone.velocity(x_t, t, cond, "teacher", guidance))
        x0_fake = x0_from_v(x_t, t, method.backbone.velocity(x_t, t, cond, "fake_score"))
    return x_t, t, x0_teacher, x0_fake


def fake_score_flow_matching_step(
    method: FewStepMethod, x0: Tensor, cond: Any, *, grad_clip: float, tag: str = "fake"
) -> dict[str, Any]:
    """One fake-score step: flow matching on the detached samples ``x0`` (keyed generator ``tag``: ``t`` then ``ε``).

    Returns the metrics ``fake_score/loss`` and ``fake_score/grad_norm``.
    """
    g = method.rng(tag)
    x0_d = x0.detach()
    t = method.rand(x0_d.shape[0], g).clamp_min(1e-3)
    eps = method.randn(x0_d.shape, g)
    v = method.backbone.velocity(forward_noise(x0_d, eps, t), t, cond, "fake_score")
    loss = flow_matching_loss(v, x0_d, eps)
    return {"fake_score/loss": loss.detach(), "fake_score/grad_norm": method.update("fake_score", loss, grad_clip)}
