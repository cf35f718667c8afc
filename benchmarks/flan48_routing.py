"""Sequence-level routing on FLAN-48 (or any pool manifest + labelled split), several settings side by side.

    python benchmarks/flan48_routing.py --pool ../shared/data/flan48/pool_samples.json \
        --inputs ../shared/data/flan48/dev.jsonl

Prints one markdown table: for each embedder instruction and Gaussian fit setting, HiLoRA's candidate rule
(own adapter in C, mean |C|, top-1 task, top-1 cluster, unseen top-1 cluster) and the Retriever's cosine
rule (own adapter in its top-3, top-1 task / cluster, unseen top-1 cluster). Embeddings are computed once
per instruction.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import table_head, table_row
from hilora_core.evaluation.route_eval import (
    embed_pool_and_inputs,
    evaluate_routing,
    load_labelled_inputs,
    load_pool_manifest,
)
from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder
from hilora_core.routing.pool import GaussianFitSettings

SETTINGS = {
    # the raw (unit-norm) embedding space with a fixed eps: the reference points of the data's README
    "raw, eps=2e-4": GaussianFitSettings(eps=2e-4, standardize=False),
    "raw, eps=3e-4": GaussianFitSettings(eps=3e-4, standardize=False),
    "raw, calibrated own-score 0.9": GaussianFitSettings(standardize=False, criterion="own_score"),
    # standardised space (unit RMS per coordinate), eps calibrated through the candidate rule
    "std, calibrated 0.85": GaussianFitSettings(target_rate=0.85),
    "std, calibrated 0.9 (default)": GaussianFitSettings(),
    "std, calibrated 0.95": GaussianFitSettings(target_rate=0.95),
    "std + whitened, calibrated 0.9": GaussianFitSettings(whiten=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--embedder", default=None, help="sentence-transformers model (default: offline MiniLM)")
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--no-instruction-too", action="store_true", help="also run with an empty instruction")
    args = ap.parse_args()

    pool = load_pool_manifest(args.pool)
    inputs = load_labelled_inputs(args.inputs)
    instructions = [DEFAULT_INSTRUCTION] + ([""] if args.no_instruction_too else [])
    print(f"pool: {len(pool)} adapters, {len(inputs)} labelled inputs\n")
    print(*table_head(["instruction", "setting", "eps", "own in C", "mean C", "task top-1", "cluster top-1",
                       "unseen cluster top-1", "retriever own in top-3", "retriever task top-1",
                       "retriever cluster top-1", "retriever unseen", "s"]), sep="\n")
    for instruction in instructions:
        embedder = SentenceEmbedder(args.embedder, instruction=instruction)
        pool_z, input_z = embed_pool_and_inputs(embedder.encode, pool, inputs)
        for name in args.settings:
            t0 = time.perf_counter()
            r = evaluate_routing(pool_z, inputs, input_z, SETTINGS[name])
            h, c = r["hilora"], r["retriever"]
            print(table_row(["default" if instruction else "none", name, f"{r['settings']['eps']:.3g}",
                             f"{h['own_in_candidates']:.3f}", f"{h['mean_candidates']:.2f}", f"{h['task_top1']:.3f}",
                             f"{h['cluster_top1']:.3f}", f"{h['unseen_cluster_top1']:.3f}",
                             f"{c['own_in_candidates']:.3f}", f"{c['task_top1']:.3f}", f"{c['cluster_top1']:.3f}",
                             f"{c['unseen_cluster_top1']:.3f}", f"{time.perf_counter() - t0:.1f}"]), flush=True)


if __name__ == "__main__":
    main()
