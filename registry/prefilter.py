"""FAISS prefilter: shortlist adapters by distance to their Gaussian means, score only those.

The HiLoRA score of adapter ``i`` is, up to per-adapter constants,
``-(|z - mu_i|^2 - sum_j w_ij (q_ij . (z - mu_i))^2) / (2 eps d)``: the squared distance
to the mean, minus what the adapter's own low-rank spread explains. Nearest means (L2,
in the space the Gaussians live in, i.e. whitened when whitening is on) therefore rank
adapters by the dominant term: a heuristic for the score order, not a bound. To keep
the candidate set complete the shortlist grows: a query's shortlist doubles (up to
``max_k``) while any of its ``tail`` farthest shortlisted adapters would still be a
candidate under the exact scores, or while it holds fewer than ``factor`` times as many
adapters as the candidate set (queries far from every adapter get wide candidate sets
whose lower ranks the mean distance orders less reliably). Recall against the exact candidate set is measured in
``benchmarks/bench_prefilter.py``.

Index kinds: "ivf" (``IndexIVFFlat``, ``nlist = min(4 sqrt(I), I / 39)`` cells, ``nprobe``
probed; approximate, fast) and "flat" (``IndexFlatL2``; exact nearest means, O(I d) per
query). Entries are keyed by a stable integer *slot* per adapter, so a change to a few
adapters is applied to a copy of the previous index (remove + add, no retraining) as
long as the scoring space (whitening) is unchanged.

FAISS runs on a GPU (``faiss.StandardGpuResources``) when the installed faiss has GPU
support and a GPU is visible, on the CPU otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from hilora_core.errors import InvalidInputError
from hilora_core.routing.gaussian import GaussianBank, score_from_terms, woodbury_terms
from hilora_core.routing.pool import PoolModel
from hilora_core.routing.sequence_routing import candidate_counts

INDEX_KINDS = ("ivf", "flat")
_GPU_RESOURCES = None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)


class MeanIndex:
    """Nearest-mean index over adapter slots.

    Build with :meth:`build`; derive an updated copy with :meth:`updated`. A built index
    is never modified, so a scorer can search it while the next one is prepared.

    Attributes:
        kind: "ivf" or "flat"; nprobe: cells probed (ivf); size: entries; on_gpu.
    """

    def __init__(self, cpu_index: faiss.Index, kind: str, nprobe: int, use_gpu: bool) -> None:
        self._cpu = cpu_index  # the master copy (updated copies are derived from it)
        self.kind, self.nprobe, self.use_gpu = kind, nprobe, use_gpu
        if kind == "ivf":
            faiss.extract_index_ivf(cpu_index).nprobe = nprobe
        self.on_gpu = bool(use_gpu and gpu_available())
        self._search_index = _to_gpu(cpu_index) if self.on_gpu else cpu_index
        if self.on_gpu and kind == "ivf":
            faiss.GpuParameterSpace().set_index_parameter(self._search_index, "nprobe", nprobe)
        self.size = int(cpu_index.ntotal)

    @classmethod
    def build(cls, means: np.ndarray, slots: np.ndarray, kind: str = "ivf", nprobe: int = 16,
              use_gpu: bool = True, centroids: np.ndarray | None = None) -> MeanIndex:
        """Index ``means`` (I, d) under integer ``slots`` (I,).

        ``centroids``: (nlist, d) IVF cell centres to use instead of training (k-means) on ``means``.
        """
        if kind not in INDEX_KINDS:
            raise InvalidInputError(f"prefilter index kind must be one of {INDEX_KINDS}, got {kind!r}")
        x = np.ascontiguousarray(means, dtype=np.float32)
        n, d = x.shape
        index: faiss.Index
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatL2(d))
        elif centroids is not None:
            c = np.ascontiguousarray(centroids, dtype=np.float32)
            quantizer = faiss.IndexFlatL2(d)
            quantizer.add(c)
            ivf = faiss.IndexIVFFlat(quantizer, d, len(c))
            ivf.is_trained = True
            ivf.own_fields = True
            quantizer.this.disown()  # type: ignore[attr-defined, unused-ignore]  # SWIG handle, not in the stubs
            index = ivf
        else:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            train = x if n <= 64 * nlist else x[np.random.default_rng(0).choice(n, 64 * nlist, replace=False)]
            index.train(train)
        index.add_with_ids(x, np.asarray(slots, dtype=np.int64))
        return cls(index, kind, nprobe, use_gpu)

    def centroids(self) -> np.ndarray | None:
        """(nlist, d) float32 IVF cell centres; None for a flat index."""
        if self.kind != "ivf":
            return None
        quantizer = faiss.extract_index_ivf(self._cpu).quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)

    def updated(self, remove_slots: Sequence[int], add_means: np.ndarray,
                add_slots: Sequence[int] | np.ndarray) -> MeanIndex:
        """A copy with ``remove_slots`` dropped and (``add_means``, ``add_slots``) added."""
        index = faiss.clone_index(self._cpu)
        if len(remove_slots):
            # faiss's Python wrapper takes an id array; its stub lists only IDSelector
            index.remove_ids(np.asarray(remove_slots, dtype=np.int64))  # type: ignore[arg-type, unused-ignore]
        if len(add_slots):
            index.add_with_ids(np.ascontiguousarray(add_means, dtype=np.float32), np.asarray(add_slots, np.int64))
        return MeanIndex(index, self.kind, self.nprobe, self.use_gpu)

    @property
    def nbytes(self) -> int:
        """Approximate bytes of the stored vectors and ids."""
        return int(self.size * (self._cpu.d * 4 + 8))

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(n, d) queries -> (n, k) slots, nearest first; -1 pads where fewer were found."""
        k = max(1, min(int(k), self.size))
        _, slots = self._search_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return slots.astype(np.int64)


@dataclass(frozen=True)
class Shortlist:
    """One query: ``indices`` (k_q,) bank positions (nearest mean first) and their exact ``scores``."""

    indices: np.ndarray
    scores: np.ndarray


def _needs_more(scores: np.ndarray, tail: int, factor: int) -> bool:
    """Should the shortlist grow? Yes if it is shorter than ``factor`` times the candidate
    count, or if any of its last ``tail`` entries would be in C(x) under these scores."""
    c = int(candidate_counts(scores)[0])
    if c * factor > scores.size:
        return True
    kth = float(np.partition(scores, scores.size - c)[scores.size - c])  # c-th largest: the last one in C
    return bool((scores[-tail:] >= kth).any())


def score_shortlists(bank: GaussianBank, zt: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """HiLoRA scores of query ``q`` against adapters ``pos[q]`` only, for all queries at once.

    Same maths as :meth:`GaussianBank.score` (from its public factors), batched over
    per-query subsets: ``zt`` (n, d) queries in the bank's space, ``pos`` (n, k) bank
    positions -> (n, k) float64 scores.
    """
    n, k = pos.shape
    d = bank.dim
    z = zt.astype(bank.dtype, copy=False)
    delta = z[:, None, :] - bank.means[pos]  # (n, k, d)
    delta_sq = np.einsum("nkd,nkd->nk", delta, delta, dtype=np.float64)  # (n, k)
    proj = np.einsum("nkjd,nkd->nkj", bank.bases[pos], delta).astype(np.float64)  # (n, k, K): q_j . delta
    var, eps = bank.variances[pos], bank.eps[pos]  # (n, k, K), (n, k)
    weights, const = woodbury_terms(var, eps, d)
    return score_from_terms(delta_sq, proj**2, weights, const, eps, d)


def prefilter_scores(
    model: PoolModel, index: MeanIndex, slot_to_pos: np.ndarray, z: np.ndarray, k: int, max_k: int, tail: int,
    factor: int = 4,
) -> list[Shortlist]:
    """Shortlist each query's adapters with ``index`` and score them exactly.

    Args:
        model: the fitted pool (its bank is in the index's space).
        index: :class:`MeanIndex` over the bank's means, keyed by slot.
        slot_to_pos: (S,) bank position of each slot, -1 for slots not in the bank.
        z: (n, d) raw query embeddings.
        k: initial shortlist size; max_k: growth cap; tail, factor: see the module docstring.

    Returns:
        n shortlists.
    """
    zt = np.ascontiguousarray(model.transform(np.atleast_2d(z)), dtype=np.float32)
    n, size = zt.shape[0], len(model.bank)
    out: list[Shortlist | None] = [None] * n
    todo = np.arange(n)
    k = min(k, size)
    while todo.size:
        slots = index.search(zt[todo], k)  # (t, k), -1 where fewer were found
        valid = (slots >= 0) & (slots < slot_to_pos.size)
        pos = np.where(valid, slot_to_pos[np.where(valid, slots, 0)], -1)
        valid &= pos >= 0
        scores = score_shortlists(model.bank, zt[todo], np.where(valid, pos, 0))
        again = []
        for row, q in enumerate(todo):
            keep = valid[row]
            if not keep.any():  # nothing indexed near this query: score everything
                out[q] = Shortlist(np.arange(size), model.bank.score(zt[q])[0])
                continue
            out[q] = found = Shortlist(pos[row][keep], scores[row][keep])
            if k < min(max_k, size) and _needs_more(found.scores, min(tail, int(keep.sum())), factor):
                again.append(q)
        todo = np.asarray(again, dtype=np.int64)
        k = min(2 * k, max_k, size)
    return [s for s in out if s is not None]


class IndexKeeper:
    """Keeps a :class:`MeanIndex` in step with a changing pool, keyed by stable integer ids.

    FAISS stores integer ids, adapters have string ids: every adapter gets an index id (its
    "slot") the first time it is seen, kept until it leaves the pool. Changed adapters are
    re-added by slot; the index is rebuilt when the embedding space changes (new whitening or
    scale), when the pool halves or doubles since the last build, or when the index kind changes.

    Args:
        min_pool: no index below this many adapters.
        kind, nprobe, use_gpu: as :meth:`MeanIndex.build`.
    """

    def __init__(self, min_pool: int, kind: str, nprobe: int, use_gpu: bool) -> None:
        self.min_pool, self.kind, self.nprobe, self.use_gpu = min_pool, kind, nprobe, use_gpu
        self.trained = 0  # IVF cells trained (k-means) by this keeper so far
        self.reset()

    def reset(self) -> None:
        """Forget every slot (a full reload); the next :meth:`update` rebuilds."""
        self._slot: dict[str, int] = {}  # adapter id -> index id
        self._indexed: dict[str, int] = {}  # the slots in the current index
        self._next = 0
        self._dirty: set[str] = set()
        self._space_changed = True
        self._built_size = 0
        self._centroids: np.ndarray | None = None
        self.index: MeanIndex | None = None

    def mark_changed(self, ids: Sequence[str]) -> None:
        """These adapters were added, replaced or removed since the last update."""
        self._dirty.update(ids)

    def mark_space_changed(self) -> None:
        """Every mean moved (new whitening or scale): rebuild at the next update."""
        self._space_changed = True
        self._centroids = None

    def use_centroids(self, centroids: np.ndarray | None) -> None:
        """Build the next IVF index on these (nlist, d) cell centres instead of training, so that
        replicas starting from one stored fit shortlist alike (cleared when the space changes)."""
        self._centroids = centroids

    def update(self, ids: Sequence[str], means: np.ndarray | None) -> tuple[MeanIndex | None, np.ndarray | None]:
        """The index over ``means`` (I, d) of ``ids`` (I,), and slot -> bank position (S,) (-1: none)."""
        present = set(ids)
        for gone in [i for i in self._slot if i not in present]:
            del self._slot[gone]
        for i in ids:
            if i not in self._slot:
                self._slot[i] = self._next
                self._next += 1
        if means is None or len(ids) < self.min_pool:
            self._dirty.clear()
            self._space_changed = True
            self.index = None
            return None, None
        slots = np.array([self._slot[i] for i in ids], dtype=np.int64)
        slot_to_pos = np.full(self._next, -1, dtype=np.int64)
        slot_to_pos[slots] = np.arange(len(ids))
        resize = not (0.5 * self._built_size <= len(ids) <= 2 * self._built_size)
        prev = self.index
        if prev is None or self._space_changed or resize or prev.kind != self.kind:
            centroids = self._centroids if self.kind == "ivf" and prev is None else None
            self.index = MeanIndex.build(means, slots, self.kind, self.nprobe, self.use_gpu, centroids=centroids)
            self._built_size = len(ids)
            self.trained += int(self.kind == "ivf" and centroids is None)
        else:
            old_slots = [s for i, s in self._indexed.items() if i in self._dirty]
            pos = np.array([slot_to_pos[self._slot[i]] for i in self._dirty if i in self._slot], dtype=np.int64)
            self.index = prev.updated(old_slots, means[pos], slots[pos])
        self._indexed = dict(self._slot)
        self._dirty = set()
        self._space_changed = False
        return self.index, slot_to_pos
