"""Few-step generation from any role of a backbone (used by methods, ``sample`` and ``eval``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.sampling import Transition, sample


@torch.no_grad()
def generate(
    backbone: Any, role: str | None, prompts: Sequence[str], generator: torch.Generator, sigmas: Tensor,
    transition: Transition, guidance: float = 1.0, batch_size: int = 256,
) -> Tensor:
    """Decoded samples of ``role`` (``"teacher"`` = frozen base) for ``prompts`` on the σ-grid ``sigmas``.

    Noise comes from ``generator`` (on its own device, moved to the backbone's); samples are produced in chunks of
    ``batch_size``.
    """
    device = next((b.device for b in backbone.buffers()), None) or next(backbone.parameters()).device
    dtype = next((p.dtype for p in backbone.parameters()), torch.float32)
    outs = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        cond = backbone.encode_prompts(chunk)
        noise = torch.randn((len(chunk), *backbone.sample_shape), generator=generator, device=generator.device)
        noise = noise.to(device, dtype)

        def fn(x: Tensor, sigma: Tensor, cond: Any = cond) -> Tensor:
            return backbone.velocity(x, sigma, cond, role=role, guidance=guidance)

        traj = sample(fn, noise, sigmas.to(device), transition, generator=generator)
        outs.append(backbone.decode(traj.final).float())
    return torch.cat(outs)


def cycle_prompts(prompts: Sequence[str], n: int) -> list[str]:
    """``n`` prompts cycling through ``prompts`` (every prompt equally often when ``n`` is a multiple)."""
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    return [prompts[i % len(prompts)] for i in range(n)]
