"""Tiny random components of the Qwen-text families, built in code (no hub): a word-level tokenizer with Qwen's
chat special tokens and a Qwen3-style chat template, and every component of a ``ZImagePipeline`` and a
``QwenImagePipeline`` (the real classes, tiny configs). Used by the conformance cases, which save them with
``save_pretrained`` and load them back through the backbones' real loading code.
"""

from __future__ import annotations

from typing import Any

import torch

from fewstep_rl.backbones import tiny

#: Qwen3's template for one user turn, with the ``enable_thinking`` switch (``<think>`` block when off).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
_TEXT = ("a red green blue cube cone ball balls two three circle square triangle above below system user assistant "
         "describe the image by detailing color shape size texture quantity text spatial relationships of objects "
         "and background , : .")
WORDS = tuple(_TEXT.split(" "))


def qwen_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` with ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` (pad), a
    newline token and :data:`CHAT_TEMPLATE`; ids below 64. Qwen-Image's template prefix is 34 tokens, as with the
    real tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<think>", "</think>"]
    vocab = {w: i for i, w in enumerate(special)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=special[1:3] + special[4:],
                                   model_max_length=2048)
    fast.add_tokens(["\n"])  # a newline is a token (as in Qwen's BPE): Qwen-Image's template prefix is 34 tokens
    fast.chat_template = CHAT_TEMPLATE
    return fast


def zimage_pipeline_components(seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny ``ZImagePipeline``: DiT width 32 (1 refiner + 1 main layer), Qwen3 width 16,
    a one-block 16-channel VAE (factor 1), scheduler shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]).eval()
    with torch.no_grad():  # zero-initialised pad tokens and final layer would hide bugs: make them random
        for p in transformer.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    torch.manual_seed(seed)
    te = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=1024)).eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "vae": tiny.vae(16, seed),
            "text_encoder": te, "tokenizer": qwen_tokenizer(), "transformer": transformer}


def qwen_image_pipeline_components(seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny ``QwenImagePipeline``: MMDiT width 32 (1 block), Qwen2.5-VL width 16, a 4-channel
    ``AutoencoderKLQwenImage`` (factor 4), Qwen-Image's dynamic-shift scheduler config."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 0.8, 1.0, 2.0]).eval()
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": 64, "rope_theta": 1000000.0,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=64, bos_token_id=1, eos_token_id=2, vision_start_token_id=60, vision_end_token_id=61, vision_token_id=62,
        image_token_id=63, video_token_id=59)
    te = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    sched = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True)
    return {"scheduler": sched, "vae": vae, "text_encoder": te, "tokenizer": qwen_tokenizer(),
            "transformer": transformer}
