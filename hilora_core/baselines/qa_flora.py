"""qa-FLoRA: data-free, query-adaptive, per-layer fusion weights from distribution divergence.

For a query, the base model and each adapter (run alone, all layers) are compared layer by
layer: the hidden state at the last input token of decoder layer l is read through the logit
lens (final norm + LM head) into a next-token distribution, and the adapter's weight at layer l
is its divergence from the base there, normalised over adapters. The fused model then runs
every adapter at every layer with those per-layer weights (:attr:`RoutingPlan.layer_weights`).

Choices where the method leaves room (each a :class:`QaFloraSettings` field, documented in
``docs/evaluation.md``): the logit lens to get a distribution per layer, the last input
token as the query position, KL(adapter || base) as the divergence, and proportional
normalisation (``temperature=None``) or a softmax over divergences. Cost per query batch: one
forward pass of the prompt per adapter plus one for the base (run as one mixed batch).
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


@dataclass(frozen=True)
class QaFloraSettings:
    """Attributes:
    divergence: "kl" (KL(adapter || base)) or "js" (Jensen-Shannon).
    temperature: None for weights proportional to the divergence; > 0 for a softmax of
        divergence / temperature over adapters.
    top_k: fuse only the k adapters of largest mean divergence (None: all of them).
    """

    divergence: str = "kl"
    temperature: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.divergence not in ("kl", "js"):
            raise InvalidInputError(f"divergence must be 'kl' or 'js', got {self.divergence!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise InvalidInputError(f"temperature must be > 0 or None, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k!r}")


def _divergence(p_log: torch.Tensor, q_log: torch.Tensor, kind: str) -> torch.Tensor:
    """Row-wise divergence of log-prob tensors (..., V) -> (...)."""
    if kind == "kl":
        return (p_log.exp() * (p_log - q_log)).sum(-1)
    m_log = torch.logaddexp(p_log, q_log) - np.log(2.0)
    return 0.5 * ((p_log.exp() * (p_log - m_log)).sum(-1) + (q_log.exp() * (q_log - m_log)).sum(-1))


def layer_divergences(
    lm: RoutedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapters: Sequence[str],
    divergence: str = "kl",
) -> np.ndarray:
    """(B, L, n) divergence between each adapter's and the base's logit-lens distribution per layer."""
    b, n = input_ids.shape[0], len(adapters)
    plans = [RoutingPlan()] * b + [RoutingPlan.single(a) for a in adapters for _ in range(b)]
    states = introspection.last_token_states(lm, input_ids.repeat(n + 1, 1), attention_mask.repeat(n + 1, 1), plans)
    out = np.zeros((b, lm.n_layers, n))
    base_log = introspection.lens_logprobs(lm, states[:b])  # (B, L, V)
    for j in range(n):
        ad_log = introspection.lens_logprobs(lm, states[b * (j + 1): b * (j + 2)])
        out[:, :, j] = _divergence(ad_log, base_log, divergence).clamp_min(0).cpu().numpy()
    return out


def fusion_weights(div: np.ndarray, temperature: float | None = None) -> np.ndarray:
    """(B, L, n) divergences -> per-layer weights summing to 1 over adapters."""
    div = np.asarray(div, dtype=np.float64)
    if temperature is None:
        total = div.sum(-1, keepdims=True)
        uniform = np.full_like(div, 1.0 / div.shape[-1])
        return np.where(total > 0, div / np.where(total > 0, total, 1.0), uniform)
    z = div / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def qa_flora_plans(
    div: np.ndarray, adapters: Sequence[str], settings: QaFloraSettings | None = None
) -> list[RoutingPlan]:
    """One fused plan per query from (B, L, n) divergences."""
    settings = settings or QaFloraSettings()
    div = np.asarray(div, dtype=np.float64)
    if div.ndim != 3 or div.shape[2] != len(adapters):
        raise InvalidInputError(f"divergences must be (B, L, {len(adapters)}), got {div.shape}")
    plans = []
    for row in div:
        keep = np.arange(len(adapters))
        if settings.top_k is not None and settings.top_k < len(adapters):
            keep = np.lexsort((keep, -row.mean(0)))[: settings.top_k]
        w = fusion_weights(row[:, keep], settings.temperature)
        plans.append(RoutingPlan(
            adapters=tuple(adapters[int(i)] for i in keep), normalize=False,
            layer_weights=tuple(tuple(float(x) for x in layer) for layer in w),
            scores=tuple(float(row[:, i].mean()) for i in keep),
        ))
    return plans
