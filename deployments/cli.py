"""The ``hilora`` command line.

Subcommands are implemented next to what they drive; this module only wires
them together and imports each lazily (so ``hilora --help`` is instant).

    hilora route-eval   sequence-level routing metrics on a labelled split (hilora_core.evaluation.route_eval)
    hilora registry     import / list / reembed adapters in the Redis registry (registry.cli)
    hilora check-model  will a base model and its adapters be served, and in how much memory (deployments.check_model)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from hilora_core.models.embedding import SentenceEmbedder
    from hilora_core.routing.pool import GaussianFitSettings, PoolModel


def _add_route_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route-eval", help="measure the sequence-level router on a labelled split")
    p.add_argument("--pool", required=True, help="pool manifest JSON: [{model_name, sample: [{inputs}]}]")
    p.add_argument("--inputs", required=True, help="JSON lines with inputs, task, domain")
    p.add_argument("--embedder", default=None, help="sentence-transformers model (default: offline MiniLM)")
    p.add_argument("--instruction", default=None, help="embedding instruction (default: the configured one)")
    p.add_argument("--eps", type=float, default=None, help="fixed eps (default: the configured policy)")
    p.add_argument("--target-rate", type=float, default=None, help="leave-one-out target rate for calibration")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-candidates", type=int, default=None)
    p.add_argument("--redis-url", default=None,
                   help="score through the registry: register the pool's embeddings in this Redis "
                        "(under --key-prefix) and route with the registry's scorer")
    p.add_argument("--key-prefix", default="route-eval", help="registry key prefix for --redis-url")
    p.set_defaults(func=_run_route_eval)


def _pool_through_registry(args: argparse.Namespace, embedder: SentenceEmbedder, pool_z: dict[str, np.ndarray],
                           settings: GaussianFitSettings) -> PoolModel:
    """Register the pool in Redis and return the registry scorer's fitted pool, in pool order."""
    from dataclasses import replace

    import numpy as np

    from hilora_core.errors import EmptyPoolError
    from registry.config import AdmissionSettings, RegistryConfig, ScorerSettings, StoreSettings
    from registry.registry import Registry

    cfg = RegistryConfig(store=StoreSettings(redis_url=args.redis_url, key_prefix=args.key_prefix), fit=settings,
                         admission=AdmissionSettings(hub_lookup=False),
                         scorer=ScorerSettings(incremental_fit_min_pool=10**9))
    reg = Registry(cfg, embedder=embedder)
    for name, z in pool_z.items():
        # weights are never loaded here: rank/alpha/targets are placeholders the scorer does not use
        reg.register_embeddings(name, f"route-eval/{name}", z, rank=8, alpha=16, targets=["q_proj"], replace=True)
    reg.scorer.ensure_epoch(reg.epoch())
    snap = reg.scorer.snapshot
    order = np.array([snap.ids.index(n) for n in pool_z])
    model = snap.model
    reg.close()
    if model is None:
        raise EmptyPoolError(f"the registry at {args.redis_url} fitted no pool for the {len(pool_z)} adapters")
    return replace(model, bank=model.bank.take(order), means=model.means[order])


def _run_route_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hilora_core.evaluation.route_eval import (
        embed_pool_and_inputs,
        evaluate_routing,
        load_labelled_inputs,
        load_pool_manifest,
    )
    from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder
    from hilora_core.routing.pool import GaussianFitSettings

    settings = GaussianFitSettings()
    if args.eps is not None:
        settings = replace(settings, eps=args.eps)
    if args.target_rate is not None:
        settings = replace(settings, target_rate=args.target_rate)
    if args.whiten is not None:
        settings = replace(settings, whiten=args.whiten)
    instruction = DEFAULT_INSTRUCTION if args.instruction is None else args.instruction
    embedder = SentenceEmbedder(args.embedder, instruction=instruction)
    pool = load_pool_manifest(args.pool)
    inputs = load_labelled_inputs(args.inputs)
    pool_z, input_z = embed_pool_and_inputs(embedder.encode, pool, inputs)
    fitted = _pool_through_registry(args, embedder, pool_z, settings) if args.redis_url else None
    result = evaluate_routing(pool_z, inputs, input_z, settings, max_candidates=args.max_candidates, pool=fitted)
    for rule in ("hilora", "retriever"):
        print(f"{rule}: " + ", ".join(f"{k}={v:.3f}" for k, v in result[rule].items()))
    print(f"settings: {json.dumps(result['settings'])}")
    h = result["hilora"]
    keys = ("own_in_candidates", "mean_candidates", "task_top1", "cluster_top1", "unseen_cluster_top1")
    print(json.dumps({k: h[k] for k in keys}))
    return 0


def _byte_size(text: str) -> int:
    """``"536870912"``, ``"512MiB"``, ``"2G"``: bytes (binary units)."""
    import re

    units = {"": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text.strip())
    if m is None or m[2].lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 536870912, 512MiB, 2GiB)")
    return int(float(m[1]) * units[m[2].lower()])


def _add_check_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-model", help="check a base model and adapters before deploying (configs only)",
                       description="Say whether MODEL's family is served, which modules of each ADAPTER will be "
                                   "adapted or why it is refused, and the memory the engine allocates. Exit code "
                                   "0: served and every adapter accepted; 1: not.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="folder with config.json, hub id or .gguf file (default: the embedded smollm2-135m-instruct)")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT LoRA adapter folder or hub id")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's dtype (the service's 'auto' is float32 on CPU, bfloat16 on CUDA)")
    # None: the settings' own defaults (not imported here, so that building the parser stays light)
    for flag, owner, kind in (("--max-rows", "LoopSettings", int), ("--max-tokens-per-sequence", "LoopSettings", int),
                              ("--adapter-memory-bytes", "EngineSettings", _byte_size),
                              ("--max-slots", "EngineSettings", int), ("--max-rank", "EngineSettings", int),
                              ("--host-cache-bytes", "EngineSettings", _byte_size),
                              ("--host-cache-size", "EngineSettings", int)):
        unit = " (bytes, or 512MiB, 2GiB)" if kind is _byte_size else ""
        p.add_argument(flag, type=kind, default=None, help=f"{owner}.{flag[2:].replace('-', '_')}{unit}")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run_check_model)


def _run_check_model(args: argparse.Namespace) -> int:
    from deployments.check_model import check_model, format_report
    from hilora_core.engine.settings import EngineSettings, LoopSettings

    def given(*names: str) -> dict[str, int]:
        return {n: getattr(args, n) for n in names if getattr(args, n) is not None}

    engine = EngineSettings(**given("adapter_memory_bytes", "max_slots", "max_rank", "host_cache_bytes",
                                    "host_cache_size"))
    loop = LoopSettings(**given("max_rows", "max_tokens_per_sequence"))
    result = check_model(args.model, args.adapters, engine, loop, args.dtype)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_report(result))
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hilora", description="HiLoRA Serve command line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_route_eval(sub)
    _add_check_model(sub)
    try:
        from registry.cli import add_registry_commands
    except ImportError:  # registry not built yet
        pass
    else:
        add_registry_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from hilora_core.errors import HiLoRAError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (HiLoRAError, FileNotFoundError, ValidationError) as err:  # ValidationError: a setting out of range
        print(f"hilora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
