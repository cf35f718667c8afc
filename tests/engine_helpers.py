"""Helpers shared by the engine tests: tiny random Llama bases and real PEFT adapters on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file


def make_tiny_llama(folder: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random LlamaForCausalLM (vocab of ``tokenizer``) saved with the tokenizer; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base_model, folder: Path, seed: int, **lora_kwargs) -> Path:
    """Save a randomly initialised PEFT LoRA adapter for ``base_model`` (left unchanged) to ``folder``."""
    torch.manual_seed(seed)
    lora_kwargs.setdefault("lora_alpha", 2 * lora_kwargs.get("r", 8))
    peft_model = get_peft_model(base_model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(folder, safe_serialization=True)
    peft_model.unload()  # removes the LoRA layers again, restoring the plain base modules
    return folder


def scale_first_roc(folder: Path, factor: float) -> None:
    """Multiply ROC 0 (row 0 of every A, column 0 of every B) by ``factor``: a clear top singular direction."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key, t in tensors.items():
        if "lora_A" in key:
            t[0] *= factor
        elif "lora_B" in key:
            t[:, 0] *= factor
    save_file(tensors, str(path))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())
