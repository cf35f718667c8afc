"""The GPU check: the engine's correctness, throughput, load test and host syncs on one device, in one call.

    python -m benchmarks.gpu_check --out $OUT                          # CUDA, bfloat16, under 8 minutes
    python -m benchmarks.gpu_check --out var/gpu-check --device cpu --quick   # tiny shapes, float32, seconds
    make gpu-check                                                     # the first, into $(OUT) or var/gpu-check

Nothing is downloaded and no model file travels: the models are random-weight Llama models built from
configs on the device, one shaped like SmolLM2-135M ("small") and one like Llama-3-8B ("large"; with
``--quick`` two tiny shapes); the tokenizer is a word-level one over the tokens ``t0 .. t{V-1}`` (every id
decodes); the three LoRA adapters are random PEFT-format folders written to a temporary folder. Random
weights time the same as trained ones. Only torch, transformers, peft, safetensors, tokenizers and
pydantic are needed (no Ray, Redis or FAISS).

Parts, each with a time budget (a part over it stops and says so; the whole run has ``--budget-s``):

1. correctness (small shape): the logits of the base plan and of a single-adapter plan (``lm.logits``)
   against transformers and PEFT on the same weights, in the run's dtype and in float32; greedy
   generation through the loop, with requests of different lengths joining a running batch, against
   each request run alone; seeded sampling alone against in a batch. The token checks run in float32
   (TF32 off): bfloat16 kernels are not batch-invariant, so there a divergence at a near-tie says
   nothing about the engine; the bfloat16 greedy check is reported as information.
2. bench (both shapes): prefill and decode tokens/s through the loop (driven step by step) for the
   base model, an explicit single-adapter plan and a HiLoRA plan over three adapters, at batch 1 to 64,
   with each plan's ratio to the base model.
3. load (both shapes): Poisson arrivals into the running loop (its own thread), streamed through the
   handles' sinks as the service does: req/s, tok/s, TTFT and inter-token latency p50/p99.
4. syncs (CUDA only): ``torch.cuda.set_sync_debug_mode("warn")`` around steady-state decode steps;
   every host sync's site in our code and how often per step. The expected one is the read-back of the
   chosen tokens in ``hilora_core/engine/output.py``.

Writes ``OUT/results.json`` (everything), ``OUT/results.md`` (one table per part) after every part, and
``OUT/progress.log`` (the timestamped progress also printed). Exit status 1 when a correctness check
failed or a part raised.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import random
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import ROOT, fmt, percentile, table_head, table_row
from hilora_core.engine.generation import StreamEvent, TokenLogprob
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import Item, SequenceHandle, SequenceRequest
from hilora_core.engine.routed_lm import RoutedLM
from hilora_core.engine.settings import EngineSettings, LoopSettings
from hilora_core.plan import RoutingPlan

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# name -> (rank, target modules): one adapter on every linear layer, one on attention, one on the MLP.
ADAPTERS: dict[str, tuple[int, tuple[str, ...]]] = {"a": (16, ATTENTION + MLP), "b": (8, ATTENTION), "c": (8, MLP)}
PLANS: dict[str, RoutingPlan] = {
    "base": RoutingPlan(),
    "explicit": RoutingPlan.single("a"),
    "hilora": RoutingPlan(adapters=("a", "b", "c"), rocs=(4, 2, 1)),
}
ADAPTER_STRENGTH = 0.2  # an adapted layer's LoRA output is about this fraction of the base layer's (norms)
FIRST_ID = 2  # prompts use ids from here: 0 is EOS and padding, 1 the unknown token


# ---- shapes and run profiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A Llama-architecture model shape; random weights are built from it (dimensions in elements)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie: bool
    rope_theta: float

    def config(self) -> Any:
        """The ``LlamaConfig`` (sdpa attention, EOS and padding id 0)."""
        from transformers import LlamaConfig

        return LlamaConfig(  # type: ignore[call-arg]  # rope_theta, attn_implementation: **kwargs in v5
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=8192, rope_theta=self.rope_theta, rms_norm_eps=1e-5,
            tie_word_embeddings=self.tie, bos_token_id=None, eos_token_id=0, pad_token_id=0,
            attn_implementation="sdpa",
        )


SMOLLM2 = Shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True, 100000.0)
LLAMA3_8B = Shape("llama3-8b", 4096, 14336, 32, 32, 8, 128256, False, 500000.0)
TINY_A = Shape("tiny-64", 64, 128, 2, 4, 2, 256, True, 10000.0)
TINY_B = Shape("tiny-96", 96, 192, 2, 4, 2, 384, False, 500000.0)


@dataclass(frozen=True)
class Profile:
    """Sizes and time budgets (seconds) of one run: full (a GPU) or quick (tiny, CPU)."""

    shapes: dict[str, Shape]
    batches: tuple[int, ...]
    prompt_tokens: int  # per row in the benchmark
    new_tokens: int  # per row in the benchmark's decode run
    check_prompts: tuple[int, ...]  # prompt lengths of the correctness requests
    check_new: tuple[int, ...]  # their new tokens
    check_joins: tuple[int, ...]  # the step at which each joins the batched run
    logits_tokens: int  # sequence length of the logits check
    load_requests: int
    load_prompt: tuple[int, int]  # prompt tokens, uniform in [lo, hi]
    load_new: tuple[int, int]  # new tokens, uniform in [lo, hi]
    max_rows: int
    sync_rows: int
    default_rate: float  # load-test arrivals per second, unless derived from the benchmark
    derive_rate: bool  # offer 70 % of the benchmark's explicit decode capacity instead
    budgets: dict[str, float]
    total_s: float


FULL = Profile(
    shapes={"small": SMOLLM2, "large": LLAMA3_8B}, batches=(1, 8, 32, 64), prompt_tokens=128, new_tokens=32,
    check_prompts=(5, 40, 17, 64, 9, 23), check_new=(16, 12, 20, 8, 16, 12), check_joins=(0, 0, 2, 3, 3, 6),
    logits_tokens=48, load_requests=128, load_prompt=(32, 256), load_new=(32, 96), max_rows=64, sync_rows=8,
    default_rate=8.0, derive_rate=True,
    budgets={"setup small": 30, "correctness": 60, "bench small": 60, "load small": 60, "syncs": 25,
             "setup large": 45, "bench large": 90, "load large": 75},
    total_s=420,
)
QUICK = Profile(
    shapes={"small": TINY_A, "large": TINY_B}, batches=(1, 4), prompt_tokens=8, new_tokens=4,
    check_prompts=(3, 7, 5, 9), check_new=(4, 3, 5, 4), check_joins=(0, 0, 1, 2),
    logits_tokens=8, load_requests=8, load_prompt=(4, 12), load_new=(3, 6), max_rows=4, sync_rows=4,
    default_rate=50.0, derive_rate=False,
    budgets={"setup small": 20, "correctness": 30, "bench small": 20, "load small": 20, "syncs": 10,
             "setup large": 20, "bench large": 20, "load large": 20},
    total_s=150,
)


# ---- time and progress ---------------------------------------------------------------------------------------


class Clock:
    """Elapsed time of the run (seconds), its total budget, and the progress log (printed and in a file)."""

    def __init__(self, total_s: float, log_file: Path) -> None:
        self.t0 = time.perf_counter()
        self.total_s = total_s
        self.log_file = log_file

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        with self.log_file.open("a") as f:
            f.write(line + "\n")


class PartTimer:
    """One part's time against its budget (seconds) and the run's."""

    def __init__(self, clock: Clock, budget_s: float) -> None:
        self.clock, self.budget_s = clock, budget_s
        self.t0 = time.perf_counter()
        self.stopped: str | None = None  # why the part stopped early

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        """Seconds left to this part: its own budget or the run's, whichever ends first."""
        return min(self.budget_s - self.elapsed(), self.clock.left())

    def over(self, what: str = "") -> bool:
        """True (and the reason recorded) once the part or the run is out of time."""
        if self.left() > 0:
            return False
        if self.stopped is None:
            self.stopped = f"over budget ({self.budget_s:.0f} s) at {self.elapsed():.1f} s" + (
                f", before {what}" if what else "")
        return True


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- models, tokenizer, adapters -----------------------------------------------------------------------------


def make_tokenizer(vocab: int) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``t0 .. t{vocab-1}`` (id i is ``t{i}``; EOS and padding
    ``t0``, unknown ``t1``): exactly the model's vocabulary, so every sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t0", unk_token="t1")


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-weight ``LlamaForCausalLM`` of ``shape`` made directly on ``device`` in ``dtype`` (eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(shape.config())
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def cast_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` in ``dtype``; the rotary ``inv_freq`` buffers stay float32, as when a model is
    loaded in that dtype."""
    out = copy.deepcopy(model)
    keep = {n: b.detach().clone() for n, b in out.named_buffers() if n.endswith("inv_freq")}
    out.to(dtype)
    for name, buf in keep.items():
        owner, _, leaf = name.rpartition(".")
        out.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    return out.eval()


def write_adapter(folder: Path, model: nn.Module, rank: int, targets: Sequence[str], seed: int,
                  dtype: torch.dtype, base_name: str) -> Path:
    """A random PEFT LoRA adapter for ``model`` saved in ``folder`` (``adapter_config.json`` and
    ``adapter_model.safetensors``: A (r, d_in), B (d_out, r) per targeted linear layer, alpha = 2r).

    A ~ N(0, 1/d_in) and B is scaled so that the scaled LoRA output of a layer is about
    ``ADAPTER_STRENGTH`` times its base output (base weights have std ``initializer_range``)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    alpha = 2 * rank
    scaling = alpha / rank
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets):
            continue
        d_in, d_out = mod.in_features, mod.out_features
        a = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
        b = torch.randn(d_out, rank, generator=gen) * (ADAPTER_STRENGTH * std * math.sqrt(d_in / rank) / scaling)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": f"random/{base_name}"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass
class Engine:
    """One shape's engine: a :class:`RoutedLM` with the adapters ``a``, ``b``, ``c`` registered."""

    shape: Shape
    lm: RoutedLM
    adapters: dict[str, Path]
    params: int
    base32: nn.Module | None = None  # a float32 copy of the same weights (the correctness part's reference)


def setup_engine(shape: Shape, device: torch.device, dtype: torch.dtype, tmp: Path, seed: int,
                 keep_fp32: bool) -> Engine:
    """Build ``shape``'s model, tokenizer and adapters, and the engine over them (``keep_fp32``: also keep a
    float32 copy of the base weights for the correctness part)."""
    base32 = None
    if keep_fp32:
        base32 = build_model(shape, device, torch.float32, seed)
        model = base32 if dtype == torch.float32 else cast_copy(base32, dtype)
        if model is base32:
            base32 = copy.deepcopy(base32)
    else:
        model = build_model(shape, device, dtype, seed)
    adapter_dtype = torch.float32 if keep_fp32 else dtype
    adapters = {name: write_adapter(tmp / shape.name / name, model, rank, targets, seed + 1 + i, adapter_dtype,
                                    shape.name)
                for i, (name, (rank, targets)) in enumerate(ADAPTERS.items())}
    params = sum(p.numel() for p in model.parameters())
    max_rank = max(rank for rank, _ in ADAPTERS.values())
    lm = RoutedLM(model, make_tokenizer(shape.vocab), EngineSettings(max_slots=4, max_rank=max_rank))
    for name, folder in adapters.items():
        lm.add_adapter(name, folder)
    return Engine(shape, lm, adapters, params, base32)


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """``length`` token ids drawn uniformly from the ordinary ids (no EOS, no unknown token)."""
    return [rng.randrange(FIRST_ID, vocab) for _ in range(length)]


# ---- driving a loop by hand ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request produced: its token ids, text, per-token logprobs (when asked) or its error."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    error: str | None = None


def collect(handle: SequenceHandle, timeout: float = 5.0) -> Outcome:
    """Read a handle's queued events (waiting at most ``timeout`` s for each) into an :class:`Outcome`."""
    text: list[str] = []
    lps: list[TokenLogprob] = []
    ids: list[int] = []
    try:
        for ev in handle.events(timeout=timeout):
            text.append(ev.delta)
            lps.extend(ev.logprobs or [])
            if ev.finished:
                ids = list(ev.token_ids or [])
    except Exception as err:  # noqa: BLE001 - the request's error is a result here
        return Outcome(ids, "".join(text), lps, repr(err))
    return Outcome(ids, "".join(text), lps)


def drive(loop: GenerationLoop, handles: Sequence[SequenceHandle], device: torch.device,
          timer: PartTimer | None = None,
          before_step: Callable[[int], None] | None = None, pending: Callable[[], bool] | None = None,
          ) -> list[float]:
    """Run ``loop.step()`` until every handle has finished (``before_step(k)`` runs before step k; the run
    goes on while ``pending()`` says more requests are to come). Returns each step's wall time (s, device
    synchronised). Out of time: the requests are cancelled and drained."""
    times: list[float] = []
    k = 0
    while True:
        if before_step is not None:
            before_step(k)
        if all(h.finished for h in handles) and not (pending is not None and pending()):
            return times
        if timer is not None and timer.over("the requests finished"):
            for h in handles:
                h.cancel()
            while any(not h.finished for h in handles):
                loop.step()
            return times
        sync(device)
        t = time.perf_counter()
        loop.step()
        sync(device)
        times.append(time.perf_counter() - t)
        k += 1


def hand_loop(lm: RoutedLM, rows: int, columns: int, prefill_tokens: int = 1 << 20) -> GenerationLoop:
    """A loop with no thread of its own (driven by :func:`drive`), no request timeout."""
    settings = LoopSettings(max_rows=rows, max_waiting=1 << 16, max_tokens_per_sequence=columns,
                            prefill_tokens_per_step=prefill_tokens, request_timeout_s=None)
    return GenerationLoop(lm, settings, start=False)


# ---- 1. correctness ------------------------------------------------------------------------------------------


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max |ours - ref| and that over max |ref| (both as float32)."""
    a, b = ours.float(), ref.float()
    max_abs = float((a - b).abs().max())
    return {"max_abs": max_abs, "rel": max_abs / float(b.abs().max())}


def logits_checks(eng: Engine, lm32: RoutedLM, device: torch.device, dtype: torch.dtype, tokens: int,
                  seed: int) -> list[dict]:
    """The base plan against transformers and a single-adapter plan against PEFT, on the same weights and
    inputs (2 rows of ``tokens`` random ids): ``eng.lm`` in ``dtype`` and, when that is not float32, ``lm32``
    (the same weights in float32).

    Tolerance (on max |ours - ref| / max |ref|): 1e-4 in float32. In a 16-bit dtype, ours and the
    reference are both compared with the float32 reference: ours passes when its error is at most
    1.5 times the reference's own error plus 1e-3 (the same rounding, applied in another order)."""
    from peft import PeftModel

    assert eng.base32 is not None
    rng = random.Random(seed)
    ids = torch.tensor([random_prompt(rng, tokens, eng.shape.vocab) for _ in range(2)], device=device)
    mask = torch.ones_like(ids)
    results: list[dict] = []

    def peft_logits(model: Any, adapter: bool) -> torch.Tensor:
        with torch.inference_mode():
            if adapter:
                return model(input_ids=ids, attention_mask=mask).logits.float()
            with model.disable_adapter():
                return model(input_ids=ids, attention_mask=mask).logits.float()

    peft32 = PeftModel.from_pretrained(copy.deepcopy(eng.base32), str(eng.adapters["a"])).eval()
    ref = {"base": peft_logits(peft32, False), "explicit": peft_logits(peft32, True)}
    effect = compare(ref["explicit"], ref["base"])["rel"]
    engines: list[tuple[str, RoutedLM]] = []
    ref_lo: dict[str, torch.Tensor] = {}
    if dtype != torch.float32:
        engines.append(("float32", lm32))
        peft_lo = PeftModel.from_pretrained(cast_copy(eng.base32, dtype), str(eng.adapters["a"])).eval()
        ref_lo = {"base": peft_logits(peft_lo, False), "explicit": peft_logits(peft_lo, True)}
        del peft_lo
    engines.append((str(dtype).removeprefix("torch."), eng.lm))
    for dname, lm in engines:
        for kind, ref_name in (("base", "transformers"), ("explicit", "PEFT")):
            plans = [PLANS[kind]] * 2
            ours = lm.logits(ids, mask, plans=plans).float()
            row: dict[str, Any] = {"check": f"logits {kind} plan = {ref_name}", "dtype": dname,
                                   "adapter_effect_rel": effect}
            if dname == "float32":
                row.update(compare(ours, ref[kind]), tolerance="rel <= 1e-4")
                row["passed"] = row["rel"] <= 1e-4
            else:
                row.update(compare(ours, ref_lo[kind]))
                ours_err = compare(ours, ref[kind])["rel"]
                ref_err = compare(ref_lo[kind], ref[kind])["rel"]
                row.update(ours_vs_fp32_rel=ours_err, ref_vs_fp32_rel=ref_err,
                           tolerance="rel to fp32 <= 1.5 x reference's + 1e-3")
                row["passed"] = ours_err <= 1.5 * ref_err + 1e-3
            results.append(row)
    del peft32
    return results


def check_requests(prof: Profile, vocab: int, sampled: bool, seed: int) -> list[SequenceRequest]:
    """The correctness part's requests: different prompt lengths, the three plans in turn; greedy ones ask
    for the top-2 logprobs (to tell a near-tie), sampled ones (temperature 0.8, top_p 0.95) are seeded."""
    rng = random.Random(seed)
    kinds = list(PLANS)
    reqs = []
    for i, (p, n) in enumerate(zip(prof.check_prompts, prof.check_new, strict=True)):
        plan = PLANS[kinds[i % len(kinds)]]
        if sampled:
            reqs.append(SequenceRequest(random_prompt(rng, p, vocab), plan, max_new_tokens=n, temperature=0.8,
                                        top_p=0.95, seed=1000 + i, ignore_eos=True))
        else:
            reqs.append(SequenceRequest(random_prompt(rng, p, vocab), plan, max_new_tokens=n, ignore_eos=True,
                                        logprobs=2))
    return reqs


def join_check(lm: RoutedLM, prof: Profile, device: torch.device, sampled: bool, tie_tol: float,
               seed: int, timer: PartTimer) -> dict[str, Any]:
    """Each request run alone against the same requests joining a running batch at ``prof.check_joins``.

    A greedy request passes when its tokens are identical, or when they first differ where the alone run's
    top two logprobs are within ``tie_tol`` (a near-tie: the two runs' rounding differs, not the engine).
    A sampled request passes only when its tokens are identical."""
    reqs = check_requests(prof, lm.model.config.vocab_size, sampled, seed)
    columns = max(prof.check_prompts) + max(prof.check_new) + 8
    loop = hand_loop(lm, rows=len(reqs), columns=columns)
    try:
        alone = []
        for r in reqs:
            h = loop.submit(r, bounded=False)
            drive(loop, [h], device, timer)
            alone.append(collect(h))
        handles: dict[int, SequenceHandle] = {}
        live: list[SequenceHandle] = []  # drive() reads it at every step

        def join(k: int) -> None:
            for i, (r, at) in enumerate(zip(reqs, prof.check_joins, strict=True)):
                if at <= k and i not in handles:
                    handles[i] = loop.submit(r, bounded=False)
                    live.append(handles[i])

        drive(loop, live, device, timer, before_step=join, pending=lambda: len(handles) < len(reqs))
        batched = [collect(handles[i]) if i in handles else Outcome([], "", [], "never submitted")
                   for i in range(len(reqs))]
    finally:
        loop.close()
    rows = []
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        row: dict[str, Any] = {"request": i, "prompt_tokens": len(reqs[i].prompt_ids), "new_tokens": len(a.token_ids),
                               "joins_at_step": prof.check_joins[i], "identical": a.token_ids == b.token_ids,
                               "text_identical": a.text == b.text, "error": a.error or b.error}
        row["passed"] = row["identical"] and row["error"] is None and len(a.token_ids) == reqs[i].max_new_tokens
        if not row["identical"] and row["error"] is None:
            k = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                     min(len(a.token_ids), len(b.token_ids)))
            row["first_difference"] = k
            if not sampled and k < len(a.logprobs):
                top = dict(a.logprobs[k].top)
                other = b.token_ids[k] if k < len(b.token_ids) else None
                gap = a.logprobs[k].logprob - top[other] if other in top else math.inf
                row["gap_at_difference"] = gap
                row["near_tie"] = gap <= tie_tol
                row["passed"] = row["near_tie"]
        rows.append(row)
    return {"requests": rows, "identical": sum(r["identical"] for r in rows), "n": len(rows),
            "near_ties": sum(bool(r.get("near_tie")) for r in rows), "passed": all(r["passed"] for r in rows)}


def run_correctness(eng: Engine, prof: Profile, device: torch.device, dtype: torch.dtype, seed: int,
                    clock: Clock, timer: PartTimer) -> dict[str, Any]:
    """Part 1 (see the module docstring): a list of checks, each with ``passed`` (informational ones do not
    count toward the part's verdict)."""
    assert eng.base32 is not None
    lm32 = eng.lm
    if dtype != torch.float32:
        lm32 = RoutedLM(copy.deepcopy(eng.base32), make_tokenizer(eng.shape.vocab), eng.lm.settings)
        for name, folder in eng.adapters.items():
            lm32.add_adapter(name, folder)
    checks = logits_checks(eng, lm32, device, dtype, prof.logits_tokens, seed)
    for c in checks:
        clock.log(f"  {c['check']} ({c['dtype']}): rel {c['rel']:.2e}, {'ok' if c['passed'] else 'FAILED'}")
    runs = [("greedy: joining a running batch = alone", lm32, "float32", False, 1e-3, False),
            ("seeded sampling: in a batch = alone", lm32, "float32", True, 0.0, False)]
    if dtype != torch.float32:
        runs.append(("greedy: joining a running batch = alone", eng.lm, str(dtype).removeprefix("torch."),
                     False, 0.25, True))
    for name, lm, dname, sampled, tol, info in runs:
        if timer.over(name):
            break
        res = join_check(lm, prof, device, sampled, tol, seed + 7, timer)
        row = {"check": name, "dtype": dname, "identical": f"{res['identical']}/{res['n']}",
               "near_ties": res["near_ties"], "tie_tolerance": tol if not sampled else None,
               "passed": res["passed"], "informational": info, "requests": res["requests"]}
        if timer.stopped:  # cut short: its requests did not finish, which says nothing about the engine
            row.update(passed=None, informational=True, note=timer.stopped)
        checks.append(row)
        clock.log(f"  {name} ({dname}): {row['identical']} identical, {res['near_ties']} near-ties, "
                  f"{_verdict(row)}")
    if lm32 is not eng.lm:
        del lm32
    eng.base32 = None  # not needed any more
    gc.collect()
    return {"checks": checks, "passed": all(c["passed"] for c in checks if not c.get("informational")),
            "complete": not timer.stopped}


# ---- 2. the engine benchmark ---------------------------------------------------------------------------------


def bench_shape(eng: Engine, prof: Profile, device: torch.device, seed: int, clock: Clock,
                timer: PartTimer) -> dict[str, Any]:
    """Part 2 for one shape: per batch size and plan, prefill tokens/s (B x P prompt tokens over the time
    of the step that prefills them, best of 2) and decode tokens/s (B x steps over the time of the decode
    steps of an N-token run; its first step, which also prefills, is left out)."""
    lm, shape = eng.lm, eng.shape
    p, n = prof.prompt_tokens, prof.new_tokens
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    top = max(prof.batches)
    loop = hand_loop(lm, rows=top, columns=p + n + 8, prefill_tokens=top * p)

    def run(plan: RoutingPlan, batch: int, new: int) -> list[float]:
        hs = [loop.submit(SequenceRequest(random_prompt(rng, p, shape.vocab), plan, max_new_tokens=new,
                                          ignore_eos=True), bounded=False) for _ in range(batch)]
        times = drive(loop, hs, device, timer)
        errors = [o.error for o in map(collect, hs) if o.error]
        if errors:
            raise RuntimeError(errors[0])
        return times

    def fresh_loop() -> GenerationLoop:
        """A new loop after an out-of-memory error (the old one's requests fail and give their slots back)."""
        loop.close()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return hand_loop(lm, rows=top, columns=p + n + 8, prefill_tokens=top * p)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        try:  # warm-up: adapters resident, KV memory at its largest, kernels chosen
            for plan in PLANS.values():
                run(plan, top, n)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"{shape.name}: the warm-up at batch {top} ran out of device memory; warmed up at "
                         f"batch {prof.batches[0]}")
            loop = fresh_loop()
            for plan in PLANS.values():
                run(plan, prof.batches[0], n)
        for batch in prof.batches:
            for kind, plan in PLANS.items():
                if timer.over(f"{kind} at batch {batch}"):
                    notes.append(f"{shape.name}: stopped {timer.stopped}; the rest not run")
                    return _with_ratios(rows, notes, device)
                prefill = min(run(plan, batch, 1)[0] for _ in range(2))
                steps = run(plan, batch, n)[1:]
                row = {"shape": shape.name, "plan": kind, "batch": batch, "prompt_tokens": p, "new_tokens": n,
                       "prefill_s": prefill, "prefill_tok_s": batch * p / prefill,
                       "decode_steps": len(steps), "decode_s": sum(steps),
                       "decode_tok_s": batch * len(steps) / sum(steps) if steps else float("nan"),
                       "decode_step_ms_p50": 1000 * sorted(steps)[len(steps) // 2] if steps else float("nan")}
                rows.append(row)
                clock.log(f"  {shape.name} {kind:8s} batch {batch:3d}: prefill {row['prefill_tok_s']:10.0f} "
                          f"tok/s, decode {row['decode_tok_s']:9.1f} tok/s")
    except torch.cuda.OutOfMemoryError:
        last = f" (last measured: {rows[-1]['plan']} at batch {rows[-1]['batch']})" if rows else ""
        notes.append(f"{shape.name}: out of device memory{last}; the rest not run")
        loop = fresh_loop()
    finally:
        loop.close()
    return _with_ratios(rows, notes, device)


def _with_ratios(rows: list[dict[str, Any]], notes: list[str], device: torch.device) -> dict[str, Any]:
    """The benchmark's rows with each plan's prefill and decode rates over the base model's at that batch."""
    base = {(r["batch"]): r for r in rows if r["plan"] == "base"}
    for r in rows:
        b = base.get(r["batch"])
        r["prefill_vs_base"] = r["prefill_tok_s"] / b["prefill_tok_s"] if b else None
        r["decode_vs_base"] = r["decode_tok_s"] / b["decode_tok_s"] if b else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"rows": rows, "notes": notes, "peak_gib": peak}


# ---- 3. the loop's load test ---------------------------------------------------------------------------------


class Trace:
    """One load-test request's timeline: the sink its handle delivers to (called on the loop's thread).
    Times are ``time.perf_counter()`` seconds."""

    def __init__(self) -> None:
        self.submitted = 0.0
        self.times: list[float] = []
        self.tokens: list[int] = []  # completion tokens so far, at each event
        self.error: str | None = None
        self.done = threading.Event()

    def __call__(self, item: Item) -> None:
        now = time.perf_counter()
        if isinstance(item, BaseException):
            self.error = repr(item)
            self.done.set()
            return
        assert isinstance(item, StreamEvent)
        self.times.append(now)
        self.tokens.append(item.completion_tokens)
        if item.finished:
            self.done.set()

    def itls(self) -> list[float]:
        """Inter-token latencies (s): each gap between events split evenly over the tokens it brought."""
        out = []
        for k in range(1, len(self.times)):
            n = self.tokens[k] - self.tokens[k - 1]
            out.extend([(self.times[k] - self.times[k - 1]) / n] * n if n > 0 else [])
        return out


def load_test(lm: RoutedLM, kind: str, prof: Profile, rate: float, seed: int, timer: PartTimer) -> dict[str, Any]:
    """Part 3 for one plan: ``prof.load_requests`` requests with Poisson arrivals at ``rate`` per second into
    the running loop (``lm.loop``, its own thread), every one streamed to a :class:`Trace`. Latencies in ms."""
    rng = random.Random(seed)
    loop = lm.loop
    vocab = lm.model.config.vocab_size
    reqs = [SequenceRequest(random_prompt(rng, rng.randint(*prof.load_prompt), vocab), PLANS[kind],
                            max_new_tokens=rng.randint(*prof.load_new), ignore_eos=True)
            for _ in range(prof.load_requests)]
    arrivals, t = [], 0.0
    for _ in reqs:
        arrivals.append(t)
        t += rng.expovariate(rate)
    traces = [Trace() for _ in reqs]
    handles: list[SequenceHandle] = []
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], loop.stats().running)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rejected = 0
    t0 = time.perf_counter()
    try:
        for req, at, tr in zip(reqs, arrivals, traces, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if timer.over("every request was submitted"):
                break
            tr.submitted = time.perf_counter()
            try:
                handles.append(loop.submit(req, sink=tr, bounded=True))
            except Exception as err:  # noqa: BLE001 - a refusal is a result of the load test
                tr.error = repr(err)
                tr.done.set()
                rejected += 1
        for tr in traces[:len(handles)]:
            if not tr.done.wait(timeout=max(timer.left(), 0.0)):
                timer.over("every request finished")
                break
    finally:
        for h in handles:
            h.cancel()
        stop.set()
        watcher.join()
    done = [tr for tr in traces[:len(handles)] if tr.done.is_set() and tr.error is None and tr.times]
    end = max((tr.times[-1] for tr in done), default=time.perf_counter())
    duration = end - t0
    ttft = sorted(1000 * (tr.times[0] - tr.submitted) for tr in done)
    itl = sorted(1000 * x for tr in done for x in tr.itls())
    tokens = sum(tr.tokens[-1] for tr in done)

    events = sorted([(tr.submitted, 1) for tr in done] + [(tr.times[-1], -1) for tr in done])
    in_flight, peak_in_flight = 0, 0
    for _, change in events:
        in_flight += change
        peak_in_flight = max(peak_in_flight, in_flight)

    def pct(xs: list[float], q: float) -> float:
        return percentile(xs, q) if xs else float("nan")

    return {"plan": kind, "requests": len(reqs), "submitted": len(handles), "completed": len(done),
            "rejected": rejected, "errors": sum(tr.error is not None for tr in traces) - rejected,
            "offered_rate": rate, "duration_s": duration, "req_s": len(done) / duration,
            "tok_s": tokens / duration, "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
            "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99), "peak_running": peak[0],
            "peak_in_flight": peak_in_flight,
            "stopped": timer.stopped}


def load_shape(eng: Engine, prof: Profile, bench_rows: list[dict], rate: float | None, seed: int,
               clock: Clock, timer: PartTimer) -> dict[str, Any]:
    """Part 3 for one shape: a warm-up, then the load test for the explicit and the HiLoRA plan. The arrival
    rate (requests/s) is ``rate``, else 70 % of what the benchmark's explicit decode rate at its largest batch
    serves (when the profile derives it), else the profile's default."""
    lm = eng.lm
    mean_new = sum(prof.load_new) / 2
    how = "given"
    if rate is None:
        explicit = [r for r in bench_rows if r["plan"] == "explicit" and r["shape"] == eng.shape.name]
        if explicit and prof.derive_rate:
            best = max(explicit, key=lambda r: r["batch"])
            rate = min(max(0.7 * best["decode_tok_s"] / mean_new, 0.5), 500.0)
            how = f"70 % of explicit decode at batch {best['batch']} / {mean_new:.0f} tokens per request"
        else:
            rate, how = prof.default_rate, "the profile's default"
    columns = prof.load_prompt[1] + prof.load_new[1] + 8
    lm.start_loop(LoopSettings(max_rows=prof.max_rows, max_waiting=prof.load_requests,
                               max_tokens_per_sequence=columns, request_timeout_s=None))
    rows = []
    try:
        warm = [lm.loop.submit(SequenceRequest([FIRST_ID] * 8, PLANS[k], max_new_tokens=2, ignore_eos=True),
                               bounded=False) for k in ("explicit", "hilora")]
        for h in warm:
            collect(h, timeout=120)
        for kind in ("explicit", "hilora"):
            if timer.over(f"the {kind} load test"):
                break
            row = load_test(lm, kind, prof, rate, seed, timer)
            row.update(shape=eng.shape.name, rate_from=how)
            rows.append(row)
            clock.log(f"  {eng.shape.name} {kind:8s}: {row['completed']}/{row['requests']} done, "
                      f"{row['req_s']:.2f} req/s, {row['tok_s']:.0f} tok/s, TTFT p50 {row['ttft_ms_p50']:.1f} ms, "
                      f"ITL p50 {row['itl_ms_p50']:.1f} ms, peak running {row['peak_running']}")
    finally:
        lm.close()
    return {"rows": rows, "rate": rate, "rate_from": how}


# ---- 4. host syncs -------------------------------------------------------------------------------------------


@contextmanager
def captured_syncs() -> Iterator[list[list[traceback.FrameSummary]]]:
    """CUDA sync debug mode "warn" for the block; yields the Python stack of every synchronizing operation
    (outermost frame first), gathered as the warnings are raised."""
    stacks: list[list[traceback.FrameSummary]] = []

    def hook(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if "synchroniz" in str(message):
            stacks.append(traceback.extract_stack()[:-1])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield stacks
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _short(path: str) -> str:
    """A file path relative to the project, or from ``site-packages/`` on."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return path.split("site-packages/", 1)[-1]


def sync_sites(stacks: Sequence[Sequence[traceback.FrameSummary]], steps: int) -> list[dict[str, Any]]:
    """Each distinct sync site: the innermost frame in ``hilora_core`` (``ours``), the innermost frame of all
    (``where``, when it is elsewhere, e.g. in transformers), syncs per step, and whether it is the expected
    one (the ``.tolist()`` read-back of the chosen tokens in ``engine/output.py``)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for stack in stacks:
        frames = [f for f in stack if not f.filename.endswith(("warnings.py", "gpu_check.py", "contextlib.py"))]
        if not frames:
            continue
        inner = frames[-1]
        ours = next((f for f in reversed(frames) if "hilora_core" in Path(f.filename).parts), None)
        ours_s = f"{_short(ours.filename)}:{ours.lineno} ({ours.name})" if ours else "(none)"
        where = f"{_short(inner.filename)}:{inner.lineno} ({inner.name})"
        code = (ours.line or "").split("  #")[0].strip() if ours else ""  # the line without its comment
        counts[(ours_s, "" if inner is ours else where, code)] += 1
    rows = []
    for (ours_s, where, code), n in counts.most_common():
        expected = "engine/output.py" in ours_s and ".tolist()" in code and "advance" in ours_s
        rows.append({"ours": ours_s, "where": where, "code": code, "count": n,
                     "per_step": n / steps if steps else float("nan"), "expected": expected})
    return rows


def run_syncs(eng: Engine, prof: Profile, device: torch.device, seed: int, clock: Clock,
              timer: PartTimer) -> dict[str, Any]:
    """Part 4: for each plan (greedy), for seeded sampling (explicit plan, temperature 0.8, top_p 0.95) and for
    a batch mixing the plans, ``prof.sync_rows`` requests are admitted and run two steps, then four steady
    decode steps are captured; then one step in which a new request joins the mixed batch (prefill and
    routing rebuild: information, not the steady state)."""
    if device.type != "cuda":
        return {"applicable": False, "note": f"not applicable on {device.type} (no device to sync with)",
                "cases": []}
    lm = eng.lm
    rng = random.Random(seed)
    warm, measured, plen = 2, 4, 16
    loop = hand_loop(lm, rows=prof.sync_rows + 1, columns=plen + warm + measured + 16)
    cases: list[dict[str, Any]] = []
    kinds = [*PLANS, "sampled", "mixed"]
    try:
        for kind in kinds:
            if timer.over(f"the {kind} sync check"):
                break
            sampling: dict[str, Any] = {}
            if kind == "mixed":
                plans = [list(PLANS.values())[i % len(PLANS)] for i in range(prof.sync_rows)]
            elif kind == "sampled":
                plans = [PLANS["explicit"]] * prof.sync_rows
                sampling = {"temperature": 0.8, "top_p": 0.95}
            else:
                plans = [PLANS[kind]] * prof.sync_rows
            hs = [loop.submit(SequenceRequest(random_prompt(rng, plen, eng.shape.vocab), plan,
                                              max_new_tokens=warm + measured + 8, ignore_eos=True,
                                              seed=i if sampling else None, **sampling), bounded=False)
                  for i, plan in enumerate(plans)]
            for _ in range(warm):
                loop.step()
            sync(device)
            with captured_syncs() as stacks:
                for _ in range(measured):
                    loop.step()
            cases.append({"case": f"{kind}: steady decode", "steps": measured, "sites": sync_sites(stacks, measured)})
            if kind == "mixed":
                hs.append(loop.submit(SequenceRequest(random_prompt(rng, plen, eng.shape.vocab), PLANS["hilora"],
                                                      max_new_tokens=4, ignore_eos=True), bounded=False))
                sync(device)
                with captured_syncs() as stacks:
                    loop.step()
                cases.append({"case": "mixed + 1 joining: prefill step", "steps": 1, "sites": sync_sites(stacks, 1)})
            for h in hs:
                h.cancel()
            while any(not h.finished for h in hs):
                loop.step()
    finally:
        loop.close()
    steady = [s for c in cases if "steady" in c["case"] for s in c["sites"]]
    others = sorted({s["ours"] + (f" via {s['where']}" if s["where"] else "") for s in steady if not s["expected"]})
    verdict = ("only the expected read-back of the chosen tokens" if not others
               else f"{len(others)} other sync site(s) per steady step: " + "; ".join(others))
    clock.log(f"  steady decode syncs: {verdict}")
    return {"applicable": True, "cases": cases, "verdict": verdict, "other_sites": others}


# ---- report --------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> list[str]:
    """The report: the run's header, one table per part, then the parts' times against their budgets."""
    meta = results["meta"]
    lines = ["# GPU check", "", f"- device: {meta['device']} ({meta.get('device_name', '')}), dtype {meta['dtype']}"
             f"{', quick' if meta['quick'] else ''}",
             f"- torch {meta['torch']}, transformers {meta['transformers']}, peft {meta.get('peft', '?')}, "
             f"python {meta['python']}",
             f"- total {meta.get('total_s', float('nan')):.1f} s (budget {meta['budget_s']:.0f} s); command: "
             f"`{meta['command']}`",
             "- shapes: " + "; ".join(f"{k} = {v['name']} ({v['params'] / 1e6:.1f} M parameters)"
                                       for k, v in results.get("shapes", {}).items()), ""]
    corr = results.get("correctness")
    lines += ["## 1. Correctness (small shape)", ""]
    if corr:
        lines += table_head(["check", "dtype", "result", "max abs", "rel", "tolerance", "passed"], "lllrrll")
        for c in corr["checks"]:
            if "rel" in c:
                result = f"adapter changes logits by rel {c['adapter_effect_rel']:.2e}"
                if "ours_vs_fp32_rel" in c:
                    result += (f"; vs fp32: ours {c['ours_vs_fp32_rel']:.2e}, "
                               f"reference {c['ref_vs_fp32_rel']:.2e}")
                lines.append(table_row([c["check"], c["dtype"], result, f"{c['max_abs']:.2e}", f"{c['rel']:.2e}",
                                        c["tolerance"], _verdict(c)]))
            else:
                tol = "" if c["tie_tolerance"] is None else f"near-tie if logprob gap <= {c['tie_tolerance']}"
                lines.append(table_row([c["check"], c["dtype"], f"{c['identical']} identical, "
                                        f"{c['near_ties']} near-ties", "", "", tol, _verdict(c)]))
        lines += ["", f"Correctness: {'passed' if corr['passed'] else 'FAILED'}.", ""]
    else:
        lines += ["not run", ""]
    lines += ["## 2. Engine benchmark (through the loop)", ""]
    bench = results.get("bench", {})
    if bench.get("rows"):
        lines += table_head(["shape", "plan", "batch", "prefill tok/s", "decode tok/s", "decode step ms",
                             "prefill / base", "decode / base"], "llrrrrrr")
        for r in bench["rows"]:
            lines.append(table_row([r["shape"], r["plan"], r["batch"], fmt(r["prefill_tok_s"], 0),
                                    fmt(r["decode_tok_s"], 1), fmt(r["decode_step_ms_p50"], 2),
                                    fmt(r["prefill_vs_base"], 2), fmt(r["decode_vs_base"], 2)]))
        lines.append("")
    lines += [f"- {n}" for n in bench.get("notes", [])] or ([] if bench.get("rows") else ["not run"])
    lines += ["", "## 3. Load test (in-process loop, Poisson arrivals, streamed)", ""]
    load = results.get("load", {})
    if load.get("rows"):
        lines += table_head(["shape", "plan", "done", "offered req/s", "req/s", "tok/s", "TTFT p50 ms",
                             "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "peak running", "peak in flight"],
                            "llrrrrrrrrrr")
        for r in load["rows"]:
            lines.append(table_row([r["shape"], r["plan"], f"{r['completed']}/{r['requests']}",
                                    fmt(r["offered_rate"], 2), fmt(r["req_s"], 2), fmt(r["tok_s"], 0),
                                    fmt(r["ttft_ms_p50"], 1), fmt(r["ttft_ms_p99"], 1), fmt(r["itl_ms_p50"], 1),
                                    fmt(r["itl_ms_p99"], 1), r["peak_running"], r["peak_in_flight"]]))
        lines.append("")
    lines += [f"- {n}" for n in load.get("notes", [])] or ([] if load.get("rows") else ["not run"])
    lines += ["", "## 4. Host syncs per step", ""]
    syncs = results.get("syncs")
    if not syncs:
        lines += ["not run", ""]
    elif not syncs["applicable"]:
        lines += [syncs["note"], ""]
    else:
        lines += table_head(["case", "site in our code", "innermost frame", "code", "syncs / step", "expected"],
                            "llllrl")
        for c in syncs["cases"]:
            for s in c["sites"] or [{"ours": "(no syncs)", "where": "", "code": "", "per_step": 0.0,
                                     "expected": True}]:
                lines.append(table_row([c["case"], s["ours"], s["where"], f"`{s['code']}`" if s["code"] else "",
                                        fmt(s["per_step"], 2), "yes" if s["expected"] else "no"]))
        lines += ["", f"Steady decode: {syncs['verdict']}.", ""]
    lines += ["## Parts", ""] + table_head(["part", "seconds", "budget s", "status"], "lrrl")
    for name, p in results.get("parts", {}).items():
        lines.append(table_row([name, fmt(p["seconds"], 1), fmt(p["budget_s"], 0), p["status"]]))
    return lines


def _verdict(c: dict[str, Any]) -> str:
    word = "not finished" if c["passed"] is None else "yes" if c["passed"] else "NO"
    return word + (" (informational)" if c.get("informational") else "")


def save(out: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md`` under ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str, allow_nan=True))
    (out / "results.md").write_text("\n".join(markdown(results)) + "\n")


# ---- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md, progress.log")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, batches 1 and 4, 8 load-test requests")
    ap.add_argument("--parts", default="correctness,bench,load,syncs",
                    help="comma-separated subset of correctness,bench,load,syncs")
    ap.add_argument("--shapes", default="small,large", help="comma-separated subset of small,large")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="the whole run's time budget (s; default 420, quick 150); every part's budget scales with it")
    ap.add_argument("--rate", type=float, default=None, help="load-test arrivals per second (default: from the "
                                                             "benchmark)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 for --quick on CPU, else torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when every correctness check passed and no part raised."""
    args = parse_args(argv)
    if args.device is None and not args.quick and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; give --quick (tiny shapes) or --device cpu (the full shapes, slowly)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    prof = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    parts = set(args.parts.split(","))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress.log").write_text("")
    clock = Clock(args.budget_s or prof.total_s, out / "progress.log")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 checks compare in true float32
        torch.backends.cudnn.allow_tf32 = False
    import transformers

    results: dict[str, Any] = {
        "meta": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "quick": args.quick,
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version(), "budget_s": clock.total_s,
                 "command": "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "shapes": {}, "parts": {}, "bench": {"rows": [], "notes": []}, "load": {"rows": [], "notes": []},
    }
    try:
        import peft

        results["meta"]["peft"] = peft.__version__
    except ImportError:
        results["meta"]["peft"] = None
    if device.type == "cuda":
        results["meta"]["device_name"] = torch.cuda.get_device_name(device)
        results["meta"]["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        results["meta"]["device_name"] = platform.processor() or platform.machine()
        results["meta"]["torch_threads"] = torch.get_num_threads()
    clock.log(f"GPU check on {device} ({results['meta']['device_name']}), {results['meta']['dtype']}, "
              f"{'quick' if args.quick else 'full'}; budget {clock.total_s:.0f} s; results in {out}")
    failed = False

    def part(name: str, fn: Callable[..., Any], *fn_args: Any, timed: bool = True) -> Any:
        """``fn(*fn_args, timer)`` (``timed=False``: without the timer) as the part ``name``: its time against
        its budget, its status, and the results saved after it; None when it raised or was skipped."""
        nonlocal failed
        budget = prof.budgets[name] * clock.total_s / prof.total_s  # --budget-s scales every part's
        if clock.left() <= 0:
            results["parts"][name] = {"seconds": 0.0, "budget_s": budget, "status": "skipped: the run is over budget"}
            clock.log(f"{name}: skipped (the run is over budget)")
            save(out, results)
            return None
        clock.log(f"{name}: start (budget {budget:.0f} s)")
        timer = PartTimer(clock, budget)
        value, status = None, "done"
        try:
            value = fn(*fn_args, timer) if timed else fn(*fn_args)
            if timer.stopped:
                status = f"stopped: {timer.stopped}"
        except Exception as err:  # noqa: BLE001 - a failing part is reported; the others still run
            failed = True
            status = f"error: {err!r}"
            results["parts"][name] = {"traceback": traceback.format_exc()}
            clock.log(f"{name}: ERROR {err!r}\n{traceback.format_exc()}")
        results["parts"][name] = {**results["parts"].get(name, {}), "seconds": timer.elapsed(), "budget_s": budget,
                                  "status": status}
        clock.log(f"{name}: {status} in {timer.elapsed():.1f} s")
        results["meta"]["total_s"] = clock.elapsed()
        save(out, results)
        return value

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for key in [k for k in ("small", "large") if k in args.shapes.split(",")]:
            shape = prof.shapes[key]
            want_corr = key == "small" and "correctness" in parts
            eng: Engine | None = part(f"setup {key}", setup_engine, shape, device, dtype, Path(tmp), args.seed,
                                      want_corr, timed=False)
            if eng is None:
                continue
            results["shapes"][key] = {**asdict(shape), "params": eng.params}
            if want_corr:
                corr = part("correctness", run_correctness, eng, prof, device, dtype, args.seed, clock)
                results["correctness"] = corr
                if corr is None or not corr["passed"]:
                    failed = True
            if "bench" in parts:
                b = part(f"bench {key}", bench_shape, eng, prof, device, args.seed, clock)
                if b:
                    results["bench"]["rows"] += b["rows"]
                    results["bench"]["notes"] += b["notes"]
                    if b.get("peak_gib") is not None:
                        results["bench"]["notes"].append(f"{shape.name}: peak device memory {b['peak_gib']:.1f} GiB")
            if "load" in parts:
                ld = part(f"load {key}", load_shape, eng, prof, results["bench"]["rows"], args.rate, args.seed,
                          clock)
                if ld:
                    results["load"]["rows"] += ld["rows"]
                    results["load"]["notes"].append(f"{shape.name}: offered {ld['rate']:.2f} req/s "
                                                    f"({ld['rate_from']})")
            if key == "small" and "syncs" in parts:
                results["syncs"] = part("syncs", run_syncs, eng, prof, device, args.seed, clock)
            eng.lm.close()
            del eng
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["meta"]["total_s"] = clock.elapsed()
    save(out, results)
    clock.log(f"done in {clock.elapsed():.1f} s; {'FAILED' if failed else 'ok'}; {out / 'results.md'}")
    print("\n".join(markdown(results)), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
