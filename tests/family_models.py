"""Tiny random models of every served family, built from each family's own config class (no download).

Two decoder layers, hidden size 64 and a sliding window of 8 positions wherever the family has one, so
that a 20-token prompt crosses the window; hybrid families get one sliding and one full layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WINDOW = 8
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
_HYBRID_QWEN = dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 1 slides
# model_type -> its config overrides (what makes the family itself: windows, multipliers, experts)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": _HYBRID_QWEN,
    "qwen3": _HYBRID_QWEN,
    "gemma": {},
    "gemma2": dict(sliding_window=WINDOW, final_logit_softcapping=5.0, attn_logit_softcapping=10.0),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(sliding_window=WINDOW),
    "granite": dict(embedding_multiplier=4.0, residual_multiplier=0.5, logits_scaling=2.0, attention_multiplier=0.2),
    "olmo2": {},
    "starcoder2": dict(sliding_window=WINDOW),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
}


def family_config(model_type: str, tokenizer):
    """The tiny config of ``model_type`` for ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **_COMMON, **ids,
                                **FAMILY_CONFIGS[model_type])


def make_family_model(model_type: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random ``*ForCausalLM`` of ``model_type`` saved with ``tokenizer`` in ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(model_type, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def attention_targets(model) -> list[str]:
    """The attention projections PEFT can target in ``model`` (fused ``qkv_proj`` where the family fuses)."""
    leaves = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    return ["qkv_proj"] if "qkv_proj" in leaves else ["q_proj", "v_proj"]


def linear_targets(model) -> list[str]:
    """Every ``nn.Linear`` leaf name inside the decoder layers: ``"all-linear"`` without the raw expert parameters
    PEFT adds for MoE families (``target_parameters``, which the engine refuses)."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, nn.Linear) and ".layers." in name})
