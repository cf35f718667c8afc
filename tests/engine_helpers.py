"""Helpers shared by the engine tests: tiny random Llama bases and real PEFT adapters on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from hilora_core.engine import load_adapter
from hilora_core.routing.token_routing import route_rocs


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


def peft_greedy(peft, ids: list[int], adapter: str | None, n: int) -> list[int]:
    """PEFT's greedy ``generate`` of exactly ``n`` tokens past EOS (as the engine's ``ignore_eos``); None: the base."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with peft.disable_adapter():
                out = peft.generate(input_ids=x, max_new_tokens=n, do_sample=False, eos_token_id=None)
        else:
            peft.set_adapter(adapter)
            out = peft.generate(input_ids=x, max_new_tokens=n, do_sample=False, eos_token_id=None)
    new = out[0, len(ids):].tolist()
    assert len(new) == n
    return new


def looped_hilora_reference(lm, peft, ids: torch.Tensor, names: list[str], rocs: list[int],
                            scale: float) -> torch.Tensor:
    """HiLoRA through forward hooks on PEFT's base layers calling the single-sequence ``route_rocs`` at every
    adapted layer (the looped reference of the token rule)."""
    adapters = [load_adapter(lm._source(n)) for n in names]
    modules = {m for ad in adapters for m in ad.layers}
    ranks = [lm.adapter_info(n)["rank"] for n in names]
    base = peft.get_base_model()
    hooks = []

    def hook_for(module_name):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            # an adapter without weights here adds nothing, but its nominal rank still counts in the plan's
            # normalisation: zero factors of that rank
            los = [ad.layers.get(module_name) for ad in adapters]
            a = [lo.a if lo else torch.zeros(r, x.shape[1]) for lo, r in zip(los, ranks, strict=True)]
            b = [lo.b if lo else torch.zeros(output.shape[-1], r) for lo, r in zip(los, ranks, strict=True)]
            delta = route_rocs(x, a, b, [lo.scaling if lo else 1.0 for lo in los], rocs)
            return output + scale * delta.view(output.shape)
        return hook

    with peft.disable_adapter():
        for name, mod in base.named_modules():
            if name in modules:
                hooks.append(mod.base_layer.register_forward_hook(hook_for(name)))
        assert len(hooks) == len(modules)
        try:
            with torch.no_grad():
                return peft(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
