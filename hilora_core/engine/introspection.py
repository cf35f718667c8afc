"""A small introspection API over :class:`RoutedLM`, for the instance-level baselines (LoGo, qa-FLoRA).

These read what a forward pass computes without changing it: hidden states at the last position,
the logit lens, a linear layer's inputs, an adapter's own LoRA output. Nothing on the serving path
uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan

if TYPE_CHECKING:
    from hilora_core.engine.routed_lm import RoutedLM


def _last_position_pass(lm: RoutedLM, rows: Sequence[RoutingPlan] | None, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, hooks: list) -> None:
    """One forward pass that keeps only the last position's logits; removes ``hooks`` afterwards."""
    try:
        ids, mask = input_ids.to(lm.device), attention_mask.to(lm.device)
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": lm.positions(mask), "logits_to_keep": 1}
        if rows is None:
            lm.forward(None, **kwargs)
        else:
            lease, routing = lm.start_batch(rows)
            with lease:
                lm.forward(routing, **kwargs)
    finally:
        for h in hooks:
            h.remove()


def last_token_states(
    lm: RoutedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, plans: Sequence[RoutingPlan] | None = None
) -> torch.Tensor:
    """Each decoder layer's output at the last position, (B, L, d), each row under its own plan.

    With left padding the last position is every sequence's last prompt token. Ensemble plans are
    refused (they have no single hidden state)."""
    batch = lm._expand(plans, input_ids.shape[0])
    if batch.matrix is not None:
        raise InvalidInputError("last_token_states does not take ensemble plans")
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        captured.append(h[:, -1].detach())

    hooks = [layer.register_forward_hook(grab) for layer in lm.model.get_decoder().layers]
    _last_position_pass(lm, batch.rows, input_ids, attention_mask, hooks)
    return torch.stack(captured, dim=1)


def lens_logprobs(lm: RoutedLM, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: the final norm and LM head applied to hidden states (..., d) -> log-probs (..., V)."""
    with torch.inference_mode():
        logits = lm.model.get_output_embeddings()(lm.model.get_decoder().norm(hidden.to(lm.dtype)))
        return torch.log_softmax(logits.float(), dim=-1)


def linear_inputs(
    lm: RoutedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, module_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Inputs (B, d_in) of the named linear layers at the last position, base model only."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [lm.model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, key=name: captured.__setitem__(key, args[0][:, -1].detach())) for name in module_names]
    _last_position_pass(lm, None, input_ids, attention_mask, hooks)
    return captured


def adapter_modules(lm: RoutedLM, name: str) -> list[str]:
    """Module names the adapter ``name`` adapts (``model.layers.12.self_attn.q_proj``, ...)."""
    return list(lm._source(name).modules)


def adapter_delta(lm: RoutedLM, name: str, module_name: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's LoRA output ``s * B A x`` at one module: x (B, d_in) -> (B, d_out)."""
    layer = lm._fetch(name).layers.get(module_name)
    if layer is None:
        raise InvalidInputError(f"adapter {name!r} does not adapt {module_name!r}")
    with torch.inference_mode():
        a, b = layer.a.to(lm.dtype), layer.b.to(lm.dtype)  # the host tier may hold a narrower dtype
        x = x.to(device=a.device, dtype=a.dtype)
        return (x @ a.T) @ b.T * layer.scaling
