"""The base model as a routing outcome: deciding that no adapter covers a request.

HiLoRA always routes to at least one adapter, and an adapter applied to a request
it was never trained for can wreck the answer ("Who wrote Romeo and Juliet?" ->
"ROBSTON LADY"). This module adds one test in front of every routing policy: a
request whose best adapter score ``max_i score_i(x)`` is below the pool's
*off-pool threshold* is served by the base model alone.

The threshold comes from what the registry already holds, plus a reference set of
general requests shipped with the package (``data/general_requests.txt``):

- ``reference_threshold``: the ``reference_quantile`` (default 0.99) quantile of
  the best scores of the general requests. Below it, a request looks at least as
  foreign to the pool as nearly all general requests do.
- ``sample_threshold``: the ``sample_quantile`` (default 0.01) quantile of the
  leave-one-out best scores of the registered samples (each sample routed with its
  own adapter refitted without it). Below it, a request is less typical of the pool
  than 99 % of the pool's own held-out samples.

The threshold is the lower of the two, so a request falls back only when both say
it is off-pool. Where general requests and the pool's tasks overlap (FLAN-like
pools that include general QA), the sample side bounds the seen-task fallback rate
near ``sample_quantile``; where they are far apart, the reference side puts the
threshold just above the general requests and leaves room for rephrased in-pool
requests. ``docs/offpool.md`` has the measurements behind this choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilora_core.errors import InvalidInputError

REFERENCE_FILE = Path(__file__).resolve().parent / "data" / "general_requests.txt"


def load_reference_requests(path: str | Path | None = None) -> list[str]:
    """The general requests of the reference set (one per line; ``#`` starts a comment line)."""
    p = Path(path) if path is not None else REFERENCE_FILE
    if not p.is_file():
        raise InvalidInputError(f"reference request file not found: {p}")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    texts = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(texts) < 10:
        raise InvalidInputError(f"{p}: a reference set needs at least 10 requests, got {len(texts)}")
    return texts


@dataclass(frozen=True)
class OffPoolThreshold:
    """The fitted off-pool test of one pool: a request with best score < ``threshold`` falls back.

    Attributes:
        threshold: min of the two thresholds below that exist (scores are ``(1/d) log N``).
        reference_threshold: quantile of the reference requests' best scores (None without them).
        sample_threshold: quantile of the registered samples' leave-one-out best scores (None when
            no adapter has the 3 samples leave-one-out needs).
        n_reference, n_samples: how many scores each side was computed from.
    """

    threshold: float
    reference_threshold: float | None
    sample_threshold: float | None
    n_reference: int
    n_samples: int

    def off_pool(self, best_scores: np.ndarray) -> np.ndarray:
        """(n,) best adapter score per request -> (n,) True where the request falls back."""
        return np.asarray(best_scores, dtype=np.float64) < self.threshold

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "reference_threshold": self.reference_threshold,
                "sample_threshold": self.sample_threshold, "n_reference": self.n_reference,
                "n_samples": self.n_samples}

    @classmethod
    def from_dict(cls, d: dict) -> OffPoolThreshold:
        return cls(float(d["threshold"]), d.get("reference_threshold"), d.get("sample_threshold"),
                   int(d.get("n_reference", 0)), int(d.get("n_samples", 0)))


def calibrate_off_pool(
    sample_best: np.ndarray | None,
    reference_best: np.ndarray | None,
    sample_quantile: float = 0.01,
    reference_quantile: float = 0.99,
) -> OffPoolThreshold | None:
    """The off-pool threshold from the two score distributions (see the module docstring).

    Args:
        sample_best: (N,) leave-one-out best scores of registered samples, or None.
        reference_best: (R,) best scores of the reference requests against the pool, or None.
        sample_quantile, reference_quantile: the quantiles taken, in [0, 1].

    Returns:
        the threshold, or None when neither side has scores (no fallback possible).
    """
    for name, q in (("sample_quantile", sample_quantile), ("reference_quantile", reference_quantile)):
        if not 0.0 <= q <= 1.0:
            raise InvalidInputError(f"{name} must be in [0, 1], got {q!r}")
    sides = []
    for values, q in ((sample_best, sample_quantile), (reference_best, reference_quantile)):
        v = None if values is None else np.asarray(values, dtype=np.float64).ravel()
        if v is not None and v.size and not np.all(np.isfinite(v)):
            raise InvalidInputError("off-pool calibration scores must be finite")
        sides.append((float(np.quantile(v, q)), v.size) if v is not None and v.size else (None, 0))
    (sample_t, n_s), (ref_t, n_r) = sides
    present = [t for t in (sample_t, ref_t) if t is not None]
    if not present:
        return None
    return OffPoolThreshold(min(present), ref_t, sample_t, n_r, n_s)
