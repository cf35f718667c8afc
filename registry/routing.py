"""Routing requests against one immutable snapshot of the pool (no Redis involved).

:func:`route_on_snapshot` scores the request embeddings (through the FAISS prefilter for
large pools), applies the off-pool test, and asks the policy table
(:func:`hilora_core.policies.route_queries`) for the plans; each request gets a
:class:`Decision` that says what was chosen and why.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from hilora_core.baselines.retriever import cosine_similarity
from hilora_core.models.embedding import EmbedderIdentity
from hilora_core.plan import Routed
from hilora_core.policies import PolicyConfig, route_queries
from hilora_core.routing.pool import PoolModel

from .config import RegistryConfig
from .decision import Decision, OffPoolTest
from .prefilter import MeanIndex, prefilter_scores
from .records import AdapterRecord

try:  # BLAS threads spinning on a busy host make small matrix products many times slower
    from threadpoolctl import ThreadpoolController

    _THREADPOOLS = ThreadpoolController()

    def single_blas_thread() -> contextlib.AbstractContextManager[object]:
        """Context manager: BLAS runs single-threaded inside (routing is many small products)."""
        return _THREADPOOLS.limit(limits=1, user_api="blas")
except ImportError:  # pragma: no cover
    def single_blas_thread() -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class PoolSnapshot:
    """An immutable fitted pool.

    Attributes:
        epoch: store epoch this copy reflects.
        ids: (I,) adapter ids in bank order (sorted).
        ranks: (I,) LoRA ranks.
        records: id -> record.
        model: the fitted Gaussians (None for an empty pool).
        index: prefilter index (None below ``prefilter.min_pool``).
        slot_to_pos: (S,) bank position of each index slot, -1 where none.
        identities: the distinct embedder identities of ``records`` (checked against each query's).
    """

    epoch: int
    ids: tuple[str, ...]
    ranks: np.ndarray
    records: dict[str, AdapterRecord]
    model: PoolModel | None
    index: MeanIndex | None = None
    slot_to_pos: np.ndarray | None = None
    built_at: float = field(default_factory=time.time)
    identities: frozenset[EmbedderIdentity] = frozenset()


def _off_pool_info(model: PoolModel | None, cfg: PolicyConfig, best: float | None, off: bool) -> OffPoolTest | None:
    """The decision's ``off_pool`` record (None when the pool has no threshold or the policy does not route);
    ``off``: the pool's test flagged the request."""
    if model is None or model.off_pool is None or best is None or not cfg.spec.routes:
        return None
    return OffPoolTest(fallback=bool(off) and cfg.fallback, best_score=float(best),
                       threshold=float(model.off_pool.threshold), enabled=cfg.fallback)


def _decision(r: Routed, names: Sequence[str], common: dict, off_pool: OffPoolTest | None,
              shortlist_size: int = 0) -> Decision:
    candidates = tuple(names[i] for i in r.candidates) if r.candidates else r.plan.adapters
    return Decision(plan=r.plan, candidates=candidates, candidate_scores=tuple(float(s) for s in r.candidate_scores),
                    prefiltered=shortlist_size > 0, shortlist_size=shortlist_size, off_pool=off_pool, **common)


def _route_prefiltered(snap: PoolSnapshot, model: PoolModel, z: np.ndarray, cfg: PolicyConfig,
                       config: RegistryConfig, common: dict) -> list[Decision]:
    index, slot_to_pos = snap.index, snap.slot_to_pos
    if index is None or slot_to_pos is None:  # forced on a small pool: index everything exactly
        slot_to_pos = np.arange(len(snap.ids), dtype=np.int64)
        index = MeanIndex.build(model.bank.means, slot_to_pos, "flat", use_gpu=config.prefilter.gpu)
    shortlists = prefilter_scores(model, index, slot_to_pos, z, config.prefilter.k, config.prefilter.max_k,
                                  config.prefilter.tail, config.prefilter.factor)
    out = []
    for q, sl in enumerate(shortlists):
        names = [snap.ids[i] for i in sl.indices]
        # one plan per query; a seeded policy gets seed + q so queries do not share one draw
        qcfg = cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + q)
        best = float(sl.scores.max())
        off = model.off_pool_rows(np.array([best]))
        (r,) = route_queries(qcfg, names, snap.ranks[sl.indices], scores=sl.scores[None, :], off_pool=off)
        out.append(_decision(r, names, common, _off_pool_info(model, cfg, best, off[0]), shortlist_size=len(names)))
    return out


def route_on_snapshot(
    snap: PoolSnapshot,
    z: np.ndarray,
    cfg: PolicyConfig,
    config: RegistryConfig,
    *,
    explicit: Sequence[str] | None = None,
    use_prefilter: bool | None = None,
    degraded: bool = False,
) -> list[Decision]:
    """Route (n, d) checked query embeddings against one snapshot.

    Policies that read Gaussian scores use the FAISS prefilter when the snapshot has an index
    (or when ``use_prefilter`` forces it); retriever uses the cosine to every adapter's mean;
    the other policies need no scores. Every policy that routes is gated by the pool's off-pool
    test (``cfg.fallback``), which reads the Gaussian scores.
    """
    n = z.shape[0]
    names = list(snap.ids)
    common = {"epoch": snap.epoch, "degraded": degraded}
    model = snap.model
    with single_blas_thread():
        prefilter = snap.index is not None if use_prefilter is None else use_prefilter
        if cfg.needs_gaussian_scores and model is not None and prefilter:
            return _route_prefiltered(snap, model, z, cfg, config, common)
        scores = cosine = off = None
        infos: list[OffPoolTest | None] = [None] * n
        if model is not None:
            if cfg.needs_gaussian_scores or (model.off_pool is not None and cfg.spec.routes):
                scores = model.score(z)
                best = scores.max(axis=1)
                off = model.off_pool_rows(best)
                infos = [_off_pool_info(model, cfg, best[q], off[q]) for q in range(n)]
            if cfg.needs_cosine:
                cosine = cosine_similarity(z, model.means)
        routed = route_queries(cfg, names, snap.ranks, scores=scores, cosine=cosine, explicit=explicit,
                               n_queries=n, off_pool=off)
    return [_decision(r, names, common, info) for r, info in zip(routed, infos, strict=True)]
