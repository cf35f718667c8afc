"""Candidate designs of the off-pool test, compared on data that is not the evaluation set.

    .venv/bin/python benchmarks/offpool_designs.py --flan48 ../shared/data/flan48

No generation: only whether a request would be sent to the base model. In-pool requests are the
test items of the example pools (the transfer pool's are phrased with templates no adapter or
sample saw) and, with ``--flan48``, the FLAN-48 dev split; off-pool requests are the shipped
reference set (``hilora_core/routing/data/general_requests.txt``) in 5 folds: each fold is scored by a
test calibrated on the other four, so no design sees the requests it is scored on. The
evaluation set (``benchmarks/data/offpool_requests.txt``) is not read here.

Designs:

- ``sample-quantile``: a threshold on HiLoRA's best score, the 1 % quantile of the registered
  samples' leave-one-out best scores;
- ``reference-gaussian``: a Gaussian fitted on the reference requests competes with the adapters
  (fall back when it scores higher than the best adapter);
- ``reference-quantile``: a threshold at the 99 % quantile of the reference requests' best scores;
- ``min-of-both`` (the product's rule, :mod:`hilora_core.routing.fallback`): the lower of the last and the
  first thresholds.

Writes ``<out>/offpool-designs.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import command_line, parse_report_args, pool_dir, table_head, table_row, write_lines
from hilora_core.manifest import read_manifest
from hilora_core.models.embedding import SentenceEmbedder
from hilora_core.routing.calibration import LeaveOneOutScores
from hilora_core.routing.fallback import calibrate_off_pool, load_reference_requests
from hilora_core.routing.gaussian import GaussianBank, fit_gaussian
from hilora_core.routing.pool import GaussianFitSettings, fit_pool

DESIGNS = ("sample-quantile", "reference-gaussian", "reference-quantile", "min-of-both")


def pools(flan48: Path | None, per_task: int):
    """(name, {adapter: sample texts}, in-pool request texts) of each pool measured."""
    for name in ("demo", "transfer"):
        folder = pool_dir(name)
        sets = {e.name: e.samples for e in read_manifest(folder / "manifest.json")}
        tests = [json.loads(line)["inputs"] for n in sets
                 for line in (folder / "data" / n / "test.jsonl").read_text().splitlines()[:per_task]]
        yield name, sets, tests
    if flan48 is not None:
        sets = {e.name: e.samples for e in read_manifest(flan48 / "pool_samples.json")}
        tests = [json.loads(line)["inputs"] for line in (flan48 / "dev.jsonl").read_text().splitlines() if line]
        yield "flan48", sets, tests


def measure(embedder: SentenceEmbedder, sets: dict[str, list[str]], tests: list[str], reference: np.ndarray,
            folds: int = 5, seed: int = 0) -> dict[str, tuple[float, float]]:
    """design -> (in-pool fallback rate, held-out reference fallback rate)."""
    settings = GaussianFitSettings()
    raw = [embedder.encode(v) for v in sets.values()]
    model = fit_pool(raw, settings)
    space = [model.transform(z) for z in raw]
    loo_best = LeaveOneOutScores(space).scores(model.eps).max(axis=1)
    test_best = model.score(embedder.encode(tests)).max(axis=1)
    ref_best = model.score(reference).max(axis=1)
    order = np.random.default_rng(seed).permutation(len(reference))
    out: dict[str, list[tuple[float, float]]] = {d: [] for d in DESIGNS}
    for held in np.array_split(order, folds):
        fit_idx = np.setdiff1d(order, held)
        sample_only = calibrate_off_pool(loo_best, None).threshold
        ref_only = calibrate_off_pool(None, ref_best[fit_idx]).threshold
        both = calibrate_off_pool(loo_best, ref_best[fit_idx]).threshold
        for name, t in (("sample-quantile", sample_only), ("reference-quantile", ref_only), ("min-of-both", both)):
            out[name].append((float((test_best < t).mean()), float((ref_best[held] < t).mean())))
        g = GaussianBank([fit_gaussian(model.transform(reference[fit_idx]), model.eps)])
        margin_test = test_best - g.score(model.transform(embedder.encode(tests)))[:, 0]
        margin_held = ref_best[held] - g.score(model.transform(reference[held]))[:, 0]
        out["reference-gaussian"].append((float((margin_test < 0).mean()), float((margin_held < 0).mean())))
    return {d: (float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))) for d, v in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flan48", type=Path, default=None, help="folder with pool_samples.json and dev.jsonl")
    ap.add_argument("--reference-file", type=Path, default=None,
                    help="general requests of the off-pool threshold (default: the set shipped with hilora_core)")
    ap.add_argument("--per-task", type=int, default=30, help="test items per example-pool task")
    args = parse_report_args(ap, argv, threads=False)
    t0 = time.perf_counter()
    embedder = SentenceEmbedder()
    reference = embedder.encode(load_reference_requests(args.reference_file))
    lines = ["# Off-pool test: candidate designs\n",
             f"Generated by `{command_line('offpool_designs', argv)}`"
             f" ({time.perf_counter() - t0:.0f} s to load). Each cell: share of in-pool requests sent to the base "
             "model (lower is better) / share of held-out general requests sent to the base model (higher is "
             "better). Reference requests are scored in 5 folds, each by a test calibrated without it.\n",
             *table_head(["pool", "adapters", "in-pool requests", *DESIGNS])]
    for name, sets, tests in pools(args.flan48, args.per_task):
        res = measure(embedder, sets, tests, reference)
        lines.append(table_row([name, len(sets), len(tests), *(f"{res[d][0]:.3f} / {res[d][1]:.3f}" for d in DESIGNS)]))
        print(lines[-1], flush=True)
    write_lines(args.out / "offpool-designs.md", lines)


if __name__ == "__main__":
    main()
