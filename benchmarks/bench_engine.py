"""Throughput of RoutedLM against PEFT on the same prompts, one markdown table per run.

Configurations (each at every batch size):
    base            the base model alone (HF generate)
    peft_single     PEFT with one adapter active for the whole batch
    peft_mixed      PEFT mixed batch: a different adapter per row (``adapter_names=``)
    routed_single   RoutedLM, RoutingPlan.single(one adapter) for every row
    hilora_k        RoutedLM, HiLoRA plans with k adapters per sequence (k = 1, 3, 8), ROCs from
                    allocate_rocs(random scores, ranks, gamma) -- a mixed batch, every row its own plan

Every configuration runs in its own subprocess so that peak memory (max RSS on CPU, max
allocated on CUDA) is its own. Prefill tokens/s = prompt tokens / time of a 1-token
generation; decode tokens/s = B * (N - 1) / (time of an N-token generation - that time).
EOS is ignored so every row makes N tokens.

    .venv/bin/python benchmarks/bench_engine.py --threads 2 --batch-sizes 8 32 --new-tokens 32
    .venv/bin/python benchmarks/bench_engine.py --threads 1 --interleave --repeats 3
    .venv/bin/python benchmarks/bench_engine.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table

CONFIGS = ("base", "peft_single", "peft_mixed", "routed_single", "hilora_1", "hilora_3", "hilora_8")
PROMPT_TEXTS = [
    "Write a short review of a film you enjoyed and explain why.",
    "Is the following sentence positive or negative? The food was cold and the waiter rude.",
    "Translate to French: The weather is nice today and we will go to the park.",
    "Question: what is the capital of Italy, and what is it famous for?",
    "Summarise: The committee met on Tuesday to discuss the budget for next year.",
    "Does the premise entail the hypothesis? Premise: A man plays guitar. Hypothesis: A person makes music.",
    "Give three tips for staying focused while studying for exams.",
    "Classify the topic of this headline: Stocks rally as inflation cools in March.",
]


def _prompts(n: int) -> list[str]:
    return [PROMPT_TEXTS[i % len(PROMPT_TEXTS)] + ("" if i < len(PROMPT_TEXTS) else f" ({i})") for i in range(n)]


def make_random_adapters(base_dir: str, out: Path, n: int, rank: int, seed: int) -> list[Path]:
    """n randomly initialised PEFT LoRA adapters (rank ``rank`` on q_proj, v_proj) saved under ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths = []
    for i in range(n):
        torch.manual_seed(seed + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pm = get_peft_model(base, cfg)
        pm.save_pretrained(out / f"adapter{i}", safe_serialization=True)
        base = pm.unload()
        paths.append(out / f"adapter{i}")
    return paths


def _peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Setups:
    """Builds a ``gen(n_new_tokens)`` callable per configuration, sharing loaded models."""

    def __init__(self, args) -> None:
        import torch

        from hilora_core.models.base_model import resolve_base

        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.adapters = sorted(p for p in Path(args.adapters).iterdir() if (p / "adapter_config.json").exists())
        self.names = [p.name for p in self.adapters]
        self.base_dir = resolve_base(args.base)
        self._peft = None
        self._lm = None

    def peft(self):
        """(model, tokenizer): PEFT with every adapter loaded; ``disable_adapter()`` gives the base."""
        if self._peft is None:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.base_dir)
            tok.padding_side = "left"
            model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.dtype).to(self.device).eval()
            model = PeftModel.from_pretrained(model, str(self.adapters[0]), adapter_name=self.names[0]).eval()
            for path, name in zip(self.adapters[1:], self.names[1:], strict=True):
                model.load_adapter(str(path), adapter_name=name)
            model.set_adapter(self.names[0])
            self._peft = (model, tok)
        return self._peft

    def lm(self):
        if self._lm is None:
            from hilora_core import RoutedLM

            self._lm = RoutedLM.from_pretrained(self.args.base, device=self.device, dtype=self.dtype,
                                                max_slots=max(16, len(self.names)))
            for name, path in zip(self.names, self.adapters, strict=True):
                self._lm.add_adapter(name, str(path))
        return self._lm

    def build(self, config: str, batch: int):
        """(gen(n) callable, prompt token count) for one configuration."""
        import contextlib

        import numpy as np
        import torch

        from hilora_core import RoutingPlan, allocate_rocs

        prompts = _prompts(batch)
        if config in ("base", "peft_single", "peft_mixed"):
            model, tok = self.peft()
            kwargs = {}
            if config == "peft_mixed":
                kwargs["adapter_names"] = [self.names[i % len(self.names)] for i in range(batch)]
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)

            def gen(n: int) -> None:
                ctx = model.disable_adapter() if config == "base" else contextlib.nullcontext()
                with ctx, torch.inference_mode():
                    model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tok.pad_token_id, **kwargs)

            return gen, int(enc.attention_mask.sum())
        lm = self.lm()
        ranks = np.array([lm.adapter_info(n)["rank"] for n in self.names])
        rng = np.random.default_rng(self.args.seed)
        if config == "routed_single":
            plans = [RoutingPlan.single(self.names[0])] * batch
        else:
            k = min(int(config.split("_")[1]), len(self.names))
            plans = []
            for _ in range(batch):
                chosen = rng.permutation(len(self.names))[:k]
                rocs = allocate_rocs(rng.normal(size=k), ranks[chosen], self.args.gamma)
                keep = rocs > 0
                plans.append(RoutingPlan(adapters=tuple(self.names[i] for i in chosen[keep]),
                                         rocs=tuple(int(o) for o in rocs[keep])))

        def gen(n: int) -> None:
            lm.generate(prompts, plans=plans, max_new_tokens=n, ignore_eos=True)

        return gen, int(sum(len(lm.tokenizer(p).input_ids) for p in prompts))

    def time_once(self, gen) -> tuple[float, float]:
        """(seconds of a 1-token generation, seconds of an N-token generation)."""
        import torch

        def sync():
            if self.device.type == "cuda":
                torch.cuda.synchronize()

        sync()
        t0 = time.perf_counter()
        gen(1)
        sync()
        t1 = time.perf_counter()
        gen(self.args.new_tokens)
        sync()
        return t1 - t0, time.perf_counter() - t1


def _rates(batch: int, n_new: int, prompt_tokens: int, timings) -> dict:
    prefill = min(t for t, _ in timings)
    full = min(t for _, t in timings)
    return {"prefill_tok_s": prompt_tokens / prefill, "decode_tok_s": batch * (n_new - 1) / max(full - prefill, 1e-9)}


def run_worker(args) -> dict:
    """One configuration at one batch size in this process; returns the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    setups = Setups(args)
    gen, prompt_tokens = setups.build(args.worker, args.batch)
    gen(2)  # warm-up (also loads adapters into their slots)
    timings = [setups.time_once(gen) for _ in range(args.repeats)]
    return {"config": args.worker, "batch": args.batch, "peak_mib": _peak_memory_mib(setups.device),
            **_rates(args.batch, args.new_tokens, prompt_tokens, timings)}


def run_interleaved(args) -> dict:
    """Every configuration in one process, round-robin for ``repeats`` rounds, best round kept.

    Load from other processes then hits every configuration alike; peak memory is not per config.
    """
    import torch

    torch.set_num_threads(args.threads)
    setups = Setups(args)
    built = {(c, b): setups.build(c, b) for b in args.batch_sizes for c in args.configs}
    for gen, _ in built.values():
        gen(2)
    timings: dict = {key: [] for key in built}
    for _ in range(args.repeats):
        for key, (gen, _) in built.items():
            timings[key].append(setups.time_once(gen))
    return {key: {"config": key[0], "batch": key[1], "peak_mib": float("nan"),
                  **_rates(key[1], args.new_tokens, built[key][1], timings[key])} for key in built}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapters", default=None, help="folder of PEFT adapter folders (default: random r=8 q,v)")
    ap.add_argument("--n-adapters", type=int, default=8, help="random adapters to create when --adapters is unset")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gamma", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions per config (best is kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interleave", action="store_true",
                    help="run all configs in one process, round-robin (fairer under load; no per-config memory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return

    import torch

    from hilora_core.models.base_model import resolve_base

    tmp = None
    if args.adapters is None:
        torch.set_num_threads(args.threads)
        tmp = tempfile.TemporaryDirectory(prefix="bench_engine_")
        make_random_adapters(resolve_base(args.base), Path(tmp.name), args.n_adapters, args.rank, args.seed)
        args.adapters = tmp.name
    load_before = os.getloadavg()
    results = {}
    forwarded = ["--adapters", args.adapters, "--new-tokens", str(args.new_tokens), "--gamma", str(args.gamma),
                 "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
                 "--dtype", args.dtype, "--seed", str(args.seed)]
    if args.base:
        forwarded += ["--base", args.base]
    if args.interleave:
        results = run_interleaved(args)
    for batch in args.batch_sizes if not args.interleave else []:
        for config in args.configs:
            cmd = [sys.executable, __file__, "--worker", config, "--batch", str(batch), *forwarded]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{config} batch {batch} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[(config, batch)] = json.loads(line[0][len("RESULT "):])
            print(f"done {config} batch {batch}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    print(f"\nbase={args.base or 'SmolLM2-135M-Instruct'} device={args.device} dtype={args.dtype} "
          f"threads={args.threads} adapters={args.n_adapters if tmp else args.adapters} rank={args.rank} "
          f"new_tokens={args.new_tokens} gamma={args.gamma} repeats={args.repeats} "
          f"mode={'interleaved' if args.interleave else 'one process per config'} "
          f"load_avg(1m) before={load_before[0]:.2f} "
          f"after={load_after[0]:.2f}\n")
    rows = []
    for batch in args.batch_sizes:
        ref = results.get(("peft_single", batch))
        mixed = results.get(("peft_mixed", batch))
        for config in args.configs:
            r = results.get((config, batch))
            if r is None:
                continue
            ratio_p = f"{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}" if ref else "-"
            ratio_d = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else "-"
            ratio_m = f"{r['decode_tok_s'] / mixed['decode_tok_s']:.2f}" if mixed else "-"
            peak = "-" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
            rows.append([config, batch, f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", peak, ratio_p, ratio_d,
                         ratio_m])
    print_table(["config", "batch", "prefill tok/s", "decode tok/s", "peak MiB", "prefill / peft_single",
                 "decode / peft_single", "decode / peft_mixed"], rows, align="lrrrrrrr")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
