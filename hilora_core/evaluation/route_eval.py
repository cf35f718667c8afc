"""Measuring the sequence-level router without any LoRA weights.

Given each adapter's sample inputs and a labelled set of test inputs (task and
cluster per input), report for HiLoRA's candidate rule and for the Retriever's
cosine rule:

    own_in_candidates    the input's own adapter is in the candidate set
    mean_candidates      mean |C|
    task_top1            the best-scoring adapter is the input's own
    cluster_top1         the best-scoring adapter is from the input's cluster
    unseen_cluster_top1  with the input's own adapter removed from the pool, the
                         best-scoring adapter is from its cluster

Used by ``hilora route-eval`` and ``benchmarks/flan48_routing.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilora_core.baselines.retriever import cosine_similarity
from hilora_core.errors import InvalidInputError
from hilora_core.manifest import read_manifest
from hilora_core.routing.pool import GaussianFitSettings, PoolModel, fit_pool
from hilora_core.routing.sequence_routing import select_candidates


@dataclass(frozen=True)
class LabelledInput:
    text: str
    task: str
    cluster: str


def load_pool_manifest(path: str | Path) -> dict[str, list[str]]:
    """A pool manifest (:func:`hilora_core.manifest.read_manifest`) -> {adapter name: sample input texts}."""
    return {e.name: e.samples for e in read_manifest(path)}


def load_labelled_inputs(path: str | Path) -> list[LabelledInput]:
    """JSON lines with ``inputs``, ``task`` and ``domain`` (or ``cluster``)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            out.append(LabelledInput(row["inputs"], row["task"], row.get("domain", row.get("cluster"))))
        except KeyError as err:
            raise InvalidInputError(f"{path}:{n}: missing field {err}") from err
    return out


def candidate_statistics(scores: np.ndarray, own: np.ndarray, adapter_clusters: np.ndarray,
                         input_clusters: np.ndarray, max_candidates: int | None = None,
                         candidates: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-query statistics of a candidate rule: the one place routing metrics are computed.

    Args:
        scores: (n, I) scores; own: (n,) each query's own adapter index, -1 when it has none in the pool.
        adapter_clusters: (I,) cluster of each adapter; input_clusters: (n,) cluster of each query.
        candidates: row -> candidate indices (default: HiLoRA's :func:`select_candidates`).

    Returns:
        (n,) arrays: ``own_in_candidates``, ``candidates`` (|C|), ``task_top1``, ``cluster_top1``,
        ``cluster_in_candidates`` (any adapter of the query's cluster in C).
    """
    rule = candidates or (lambda row: select_candidates(row, max_candidates))
    sets = [rule(row) for row in scores]
    top = scores.argmax(axis=1)
    return {
        "own_in_candidates": np.array([o in c for o, c in zip(own, sets, strict=True)]),
        "candidates": np.array([len(c) for c in sets]),
        "task_top1": top == own,
        "cluster_top1": adapter_clusters[top] == input_clusters,
        "cluster_in_candidates": np.array([(adapter_clusters[c] == ic).any()
                                           for c, ic in zip(sets, input_clusters, strict=True)]),
    }


def _metrics(scores: np.ndarray, own: np.ndarray, clusters: np.ndarray, input_clusters: np.ndarray,
             candidates: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    st = candidate_statistics(scores, own, clusters, input_clusters, candidates=candidates)
    return {"own_in_candidates": float(st["own_in_candidates"].mean()),
            "mean_candidates": float(st["candidates"].mean()), "task_top1": float(st["task_top1"].mean()),
            "cluster_top1": float(st["cluster_top1"].mean())}


def evaluate_routing(
    pool_embeddings: dict[str, np.ndarray],
    inputs: Sequence[LabelledInput],
    input_embeddings: np.ndarray,
    settings: GaussianFitSettings,
    retriever_k: int = 3,
    max_candidates: int | None = None,
    pool: PoolModel | None = None,
) -> dict[str, dict[str, float]]:
    """Both rules' metrics. pool_embeddings: name -> (m, d); input_embeddings: (n, d).

    ``pool``: an already fitted pool whose adapters are in ``pool_embeddings``' order (e.g. the
    registry's); by default the pool is fitted here with ``settings``.

    Returns ``{"hilora": {...}, "retriever": {...}, "settings": {...}}``.
    """
    names = list(pool_embeddings)
    index = {n: i for i, n in enumerate(names)}
    task_cluster = {x.task: x.cluster for x in inputs}
    clusters = np.array([task_cluster.get(n, f"?{n}") for n in names])
    kept = [i for i, x in enumerate(inputs) if x.task in index]
    if not kept:
        raise InvalidInputError("no test input belongs to a task of the pool")
    inputs = [inputs[i] for i in kept]
    z = np.asarray(input_embeddings)[kept]
    own = np.array([index[x.task] for x in inputs])
    input_clusters = np.array([x.cluster for x in inputs])

    if pool is None:
        pool = fit_pool([pool_embeddings[n] for n in names], settings)
    scores = pool.score(z)
    hilora = _metrics(scores, own, clusters, input_clusters, lambda r: select_candidates(r, max_candidates))
    cos = cosine_similarity(z, pool.means)
    retr = _metrics(cos, own, clusters, input_clusters, lambda r: np.argsort(-r, kind="stable")[:retriever_k])

    # unseen: drop the input's own adapter from the pool. The other adapters' Gaussians do not depend on
    # it; eps and the space's scale stay those of the full pool (as in the registry's incremental fits).
    rows = np.arange(len(inputs))
    masked_s, masked_c = scores.copy(), cos.copy()
    masked_s[rows, own] = -np.inf
    masked_c[rows, own] = -np.inf
    unseen_h = clusters[masked_s.argmax(axis=1)] == input_clusters
    unseen_r = clusters[masked_c.argmax(axis=1)] == input_clusters
    hilora["unseen_cluster_top1"] = float(unseen_h.mean())
    retr["unseen_cluster_top1"] = float(unseen_r.mean())
    return {
        "hilora": hilora,
        "retriever": retr,
        "settings": {"eps": pool.eps, "whiten": pool.whitener is not None, "target_rate": settings.target_rate,
                     "calibrated": settings.eps is None, "n_inputs": len(inputs), "n_adapters": len(names)},
    }


def embed_pool_and_inputs(
    embed: Callable[[list[str]], np.ndarray], pool: dict[str, list[str]], inputs: Sequence[LabelledInput]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embed every sample and every test input with one embedder (one batched call)."""
    texts = [t for samples in pool.values() for t in samples] + [x.text for x in inputs]
    z = embed(texts)
    out, at = {}, 0
    for name, samples in pool.items():
        out[name] = z[at : at + len(samples)]
        at += len(samples)
    return out, z[at:]
