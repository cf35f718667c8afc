"""Write a synthetic pool of N LoRA adapters for the embedded base (SmolLM2-135M), for many-adapter benchmarks.

    .venv/bin/python -m benchmarks.make_pool var/pool1000 --n 1000

Each adapter is a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, float16) with random
weights, a realistic mix of ranks (8: 50 %, 16: 30 %, 32: 15 %, 64: 5 %) and target sets (q/v: 50 %,
q/k/v/o: 30 %, every linear layer: 20 %). Its sample texts are one task each, a (domain, action) pair
with the adapter's own keyword, so that the pool spreads apart in embedding space. ``manifest.json``
lists them in the pool-manifest format (``hilora_core/manifest.py``), for ``hilora registry import`` or
the admin API. The generated pool is not committed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# SmolLM2-135M: hidden 576, intermediate 1536, 9 heads of 64, 3 key/value heads, 30 layers
LAYERS = 30
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # (d_in, d_out)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
RANKS, RANK_P = (8, 16, 32, 64), (0.5, 0.3, 0.15, 0.05)
TARGETS, TARGET_P = (("q_proj", "v_proj"), ATTN, tuple(SHAPES)), (0.5, 0.3, 0.2)
DOMAINS = ("recipe", "contract", "poem", "tweet", "invoice", "email", "headline", "review", "lyric", "diagnosis",
           "weather report", "sports score", "stock summary", "legal clause", "chess move", "SQL query",
           "python function", "haiku", "travel plan", "workout", "movie plot", "news story", "product listing",
           "bug report", "meeting note", "physics problem", "chemistry equation", "math proof", "history essay",
           "job posting", "cover letter", "restaurant menu", "bird call", "star chart", "garden plan",
           "knitting pattern", "wine label", "tax form", "road sign", "bus timetable")
ACTIONS = ("summarise", "translate to German", "classify the sentiment of", "extract the dates from",
           "rewrite formally", "count the nouns in", "answer a question about", "list the entities in",
           "correct the spelling of", "give a title to", "turn into bullet points", "find the main claim of",
           "rate the difficulty of", "simplify for a child", "detect the language of", "shorten",
           "convert to JSON", "name the author style of", "write a reply to", "score the toxicity of",
           "explain", "continue", "paraphrase", "critique", "outline")
FILLERS = ("It arrived on Monday and nobody expected it.", "The numbers were lower than last year.",
           "She wrote it in a hurry before the train left.", "Three people signed it in blue ink.",
           "Everything changed after the second paragraph.", "The last line is the most important one.",
           "It mentions a river, a bridge and an old mill.", "Most readers found it confusing at first.",
           "The draft was shared with the whole team.", "It is about two hundred words long.")


def adapter_task(i: int) -> tuple[str, str, str]:
    """(domain, action, keyword) of adapter ``i``: distinct pairs first, then a keyword sets them apart."""
    domain = DOMAINS[i % len(DOMAINS)]
    action = ACTIONS[(i // len(DOMAINS)) % len(ACTIONS)]
    return domain, action, f"code-{i:05d}"


def samples(i: int, n: int, rng: np.random.Generator) -> list[str]:
    domain, action, keyword = adapter_task(i)
    return [f"Please {action} this {domain} ({keyword}): {FILLERS[int(k)]}"
            for k in rng.choice(len(FILLERS), size=n, replace=n > len(FILLERS))]


def write_adapter(folder: Path, rank: int, targets: tuple[str, ...], seed: int) -> int:
    """One PEFT LoRA folder with random float16 weights; returns its weights file's size in bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in targets:
            d_in, d_out = SHAPES[module]
            part = "self_attn" if module in ATTN else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in ** 0.5).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.02).half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
              "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return (folder / "adapter_model.safetensors").stat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the pool's folder (adapters/ and manifest.json are written there)")
    ap.add_argument("--n", type=int, default=1000, help="adapters")
    ap.add_argument("--samples", type=int, default=20, help="sample texts per adapter")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    entries, total = [], 0
    for i in range(args.n):
        name = f"syn-{i:05d}"
        rank = int(rng.choice(RANKS, p=RANK_P))
        targets = TARGETS[int(rng.choice(len(TARGETS), p=TARGET_P))]
        total += write_adapter(args.out / "adapters" / name, rank, targets, args.seed * 1_000_003 + i)
        domain, action, _ = adapter_task(i)
        entries.append({"model_name": name, "cluster": domain, "adapter": f"adapters/{name}", "rank": rank,
                        "sample": [{"inputs": t, "targets": ""} for t in samples(i, args.samples, rng)],
                        "targets": list(targets), "task": action})
    (args.out / "manifest.json").write_text(json.dumps(entries))
    print(f"{args.n} adapters, {total / 2**30:.2f} GiB of weights, in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
