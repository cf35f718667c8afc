"""LoGo (LoRA on the Go): instance-level adapter selection from one forward signal.

For each query, every adapter's LoRA output is measured at one module of the last decoder
layer (default ``q_proj``) for the last input token; the top-k adapters by that signal are
kept and mixed with weights proportional to it (normalised to sum 1, all ROCs active).

Choices where the method leaves room (each a :class:`LogoSettings` field, documented in
``docs/evaluation.md``):

- The input of the measured module comes from the *base* model's forward pass (one pass for
  all adapters; adapters of earlier layers do not change it).
- ``signal="relative"`` divides ``||s B A x||`` by ``||W x||`` of the same module. Among
  adapters measured at the same module the denominator is common, so ranks and normalised
  weights equal those of the raw norm; it makes a fallback module comparable.
- Fallback: an adapter without the chosen module in the last layer is measured at the first
  module it adapts there, in :data:`FALLBACK_ORDER`; one adapting nothing in the last layer
  gets signal 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hilora_core.engine import introspection
from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan

if TYPE_CHECKING:
    from hilora_core.engine import RoutedLM

FALLBACK_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LogoSettings:
    """Attributes:
    top_k: adapters kept per query.
    module: projection of the last decoder layer whose LoRA output is measured.
    signal: "relative" (``||dW x|| / ||W x||``) or "absolute" (``||dW x||``; no fallback scaling).
    """

    top_k: int = 3
    module: str = "q_proj"
    signal: str = "relative"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.module not in FALLBACK_ORDER:
            raise InvalidInputError(f"module must be one of {FALLBACK_ORDER}, got {self.module!r}")
        if self.signal not in ("relative", "absolute"):
            raise InvalidInputError(f"signal must be 'relative' or 'absolute', got {self.signal!r}")


def measured_module(lm: RoutedLM, adapter: str, module: str = "q_proj") -> str | None:
    """Full name of the last-layer module where ``adapter`` is measured, or None."""
    prefix = f"model.layers.{lm.n_layers - 1}."
    adapted = {m.rsplit(".", 1)[-1]: m for m in introspection.adapter_modules(lm, adapter) if m.startswith(prefix)}
    for leaf in (module, *FALLBACK_ORDER):
        if leaf in adapted:
            return adapted[leaf]
    return None


def logo_signals(
    lm: RoutedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str],
    settings: LogoSettings | None = None,
) -> np.ndarray:
    """(B, n) signal of each adapter for each (left-padded) query."""
    settings = settings or LogoSettings()
    where = {a: measured_module(lm, a, settings.module) for a in adapters}
    modules = sorted({m for m in where.values() if m is not None})
    inputs = introspection.linear_inputs(lm, input_ids, attention_mask, modules)
    out = np.zeros((input_ids.shape[0], len(adapters)))
    base_norm = {}
    for j, a in enumerate(adapters):
        m = where[a]
        if m is None:
            continue
        delta = introspection.adapter_delta(lm, a, m, inputs[m]).float().norm(dim=-1)
        if settings.signal == "relative":
            if m not in base_norm:
                with torch.inference_mode():
                    base = lm.model.get_submodule(m)
                    base = getattr(base, "base_layer", base)
                    base_norm[m] = base(inputs[m]).float().norm(dim=-1).clamp_min(1e-12)
            delta = delta / base_norm[m]
        out[:, j] = delta.cpu().numpy()
    return out


def logo_plans(signals: np.ndarray, adapters: Sequence[str], top_k: int = 3) -> list[RoutingPlan]:
    """Top-k adapters per row of ``signals`` (B, n), weights proportional to the signal (sum 1)."""
    signals = np.atleast_2d(np.asarray(signals, dtype=np.float64))
    if signals.shape[1] != len(adapters):
        raise InvalidInputError(f"signals have {signals.shape[1]} columns for {len(adapters)} adapters")
    k = min(top_k, len(adapters))
    plans = []
    for row in signals:
        top = np.lexsort((np.arange(len(adapters)), -row))[:k]
        w = row[top]
        w = w / w.sum() if w.sum() > 0 else np.full(k, 1.0 / k)
        plans.append(RoutingPlan(adapters=tuple(adapters[i] for i in top), weights=tuple(float(x) for x in w),
                                 normalize=False, scores=tuple(float(row[i]) for i in top)))
    return plans
