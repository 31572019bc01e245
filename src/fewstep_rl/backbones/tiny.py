"""Tiny diffusers/transformers components built in code (no hub): tokenizers, CLIP/T5 encoders, SD3 parts.

Used by the tests (random tiny models saved with ``save_pretrained`` and loaded back through the real loading
code) and by the built-in ``shapes`` world's teacher. Recipes follow infra.md appendix A. Freshly built modules
are put in ``eval()`` (built modules start in train mode with dropout on; ``from_pretrained`` returns eval mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"


def word_tokenizer(words: Sequence[str], max_length: int = 16) -> Any:
    """A word-level tokenizer (whitespace split, lower-case) with CLIP's BOS/EOS; pads with EOS.

    Token ids: 0 = BOS, 1 = EOS (also padding), 2 = unknown word, then ``words`` in order.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK, model_max_length=max_length
    )


def char_tokenizer(chars: str, max_length: int = 8) -> Any:
    """A character-level tokenizer (one token per character, whitespace dropped) with CLIP's BOS/EOS; pads with EOS.

    Token ids: 0 = BOS, 1 = EOS (also padding), 2 = unknown character, then ``chars`` in order. Case-sensitive.
    """
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK, model_max_length=max_length
    )


def clip_byte_tokenizer(max_length: int = 77) -> Any:
    """A character-level CLIP BPE tokenizer (byte alphabet, no merges): 514 tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {BOS: 0, EOS: 1}
    for s in alphabet:
        vocab[s] = len(vocab)
    for s in alphabet:
        vocab[s + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_char_tokenizer(max_length: int = 256) -> Any:
    """A character-level T5 (Unigram) tokenizer: 72 tokens."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -2.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(
    vocab_size: int = 1000, hidden: int = 32, layers: int = 2, heads: int = 4, projection_dim: int = 32,
    intermediate: int = 37, max_positions: int = 77, seed: int = 0,
) -> Any:
    """A random ``CLIPTextModelWithProjection`` (BOS 0, EOS 1, pad 1), in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=intermediate,
        layer_norm_eps=1e-5, num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab_size,
        hidden_act="gelu", projection_dim=projection_dim, max_position_embeddings=max_positions,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def t5_text_encoder(seed: int = 0) -> Any:
    """A random tiny ``T5EncoderModel`` (width 32), in eval mode."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def sd3_transformer(seed: int = 0, **overrides: Any) -> Any:
    """A random ``SD3Transformer2DModel`` (diffusers' fast-test config unless overridden), in eval mode."""
    from diffusers import SD3Transformer2DModel

    cfg = dict(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**cfg).eval()


def vae(latent_channels: int = 4, seed: int = 0) -> Any:
    """A random one-block ``AutoencoderKL`` (vae_scale_factor 1), in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()


def sd3_pipeline_components(seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny ``StableDiffusion3Pipeline`` (two CLIPs, T5, VAE), random, built offline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": vae(4, seed),
        "transformer": sd3_transformer(seed),
        "text_encoder": clip_text_encoder(seed=seed),
        "text_encoder_2": clip_text_encoder(seed=seed + 1),
        "text_encoder_3": t5_text_encoder(seed),
        "tokenizer": clip_byte_tokenizer(),
        "tokenizer_2": clip_byte_tokenizer(),
        "tokenizer_3": t5_char_tokenizer(),
    }


def flux_pipeline_components(seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny ``FluxPipeline`` (CLIP, T5, 4-channel VAE, guidance embedding), random."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8)).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=1000, hidden_act="gelu", max_position_embeddings=77)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return {"scheduler": scheduler, "vae": vae(4, seed), "transformer": transformer, "text_encoder": clip,
            "text_encoder_2": t5_text_encoder(seed), "tokenizer": clip_byte_tokenizer(),
            "tokenizer_2": t5_char_tokenizer()}


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen_byte_tokenizer(max_length: int = 64) -> Any:
    """A byte-level ``Qwen2TokenizerFast`` (no merges) with Qwen3's chat tokens and a Qwen3-style chat template."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def flux2_pipeline_components(seed: int = 0) -> dict[str, Any]:
    """Every component of a tiny ``Flux2KleinPipeline`` (3-layer Qwen3, Flux2 VAE with random batch-norm
    statistics, no guidance embedding), random, built offline."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False).eval()
    text = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=264, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)).eval()
    vae_ = AutoencoderKLFlux2(
        block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=1, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False).eval()
    with torch.no_grad():  # random batch-norm statistics; a text projection strong enough for CFG to matter
        attn = transformer.transformer_blocks[0].attn
        for m in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
            m.weight.mul_(3.0)
        attn.add_v_proj.weight.mul_(4.0)
        vae_.bn.running_mean.normal_(0, 0.5)
        vae_.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    return {"scheduler": scheduler, "vae": vae_, "transformer": transformer, "text_encoder": text,
            "tokenizer": qwen_byte_tokenizer()}
