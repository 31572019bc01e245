"""SD3 prompt encoding (the CLIP and T5 halves), shared by the ``sd3`` backbone and the shapes teacher trainer.

Follows ``diffusers.StableDiffusion3Pipeline.encode_prompt``:

* each CLIP encoder: tokens padded to ``max_length`` (77 for real CLIP), sequence embeddings = the penultimate
  hidden state (``hidden_states[-2]``, clip_skip = 0), pooled = the projected ``text_embeds``;
* CLIP sequence embeddings of the encoders are concatenated on the feature axis, pooled ones likewise;
* with a T5 encoder: CLIP sequence embeddings are zero-padded to T5's width and concatenated with T5's
  ``last_hidden_state`` along the sequence axis.

Departure (documented where used): without T5 the pipeline appends ``max_sequence_length`` zero tokens; we append
none when the transformer's ``joint_attention_dim`` equals the CLIP width (the built-in ``shapes`` teacher), since
zero tokens only cost attention FLOPs there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def clip_embeds(tokenizer: Any, encoder: Any, prompts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """(sequence embeddings = penultimate hidden state (B, L, D), pooled text_embeds (B, P)) of one CLIP encoder."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds


def t5_embeds(tokenizer: Any, encoder: Any, prompts: Sequence[str], max_length: int = 256) -> Tensor:
    """T5 ``last_hidden_state`` (B, L, D) of tokens padded to ``max_length``."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.to(encoder.device)
    return encoder(ids)[0]


def sd3_prompt_embeds(
    clips: Sequence[tuple[Any, Any]], t5: tuple[Any, Any] | None, prompts: Sequence[str], joint_dim: int,
    t5_max_length: int = 256,
) -> tuple[Tensor, Tensor]:
    """(encoder_hidden_states (B, L, joint_dim), pooled_projections (B, P)) for an SD3 transformer."""
    seqs, pooled = zip(*(clip_embeds(tok, enc, prompts) for tok, enc in clips))
    seq = torch.cat(seqs, dim=-1)
    pool = torch.cat(pooled, dim=-1)
    if t5 is not None:
        t5_seq = t5_embeds(t5[0], t5[1], prompts, t5_max_length)
        seq = torch.nn.functional.pad(seq, (0, t5_seq.shape[-1] - seq.shape[-1]))
        return torch.cat([seq, t5_seq], dim=-2), pool
    if seq.shape[-1] < joint_dim:
        seq = torch.nn.functional.pad(seq, (0, joint_dim - seq.shape[-1]))
    return seq, pool
