"""The routed model engine: a base LLM, on-demand LoRA tensors, batched token-level routing.

Modules, in data-flow order:
    adapter_files   read and check PEFT LoRA adapters (safetensors only)
    host_cache      host-memory LRU of adapter tensors, bounded by bytes (one load per adapter at a time)
    adapter_loader  reads adapters into host memory on threads of its own (never on the loop's thread)
    layer_rows      one routed layer's rank-row pool (an adapter takes the rows its rank needs)
    slots           device adapter memory: one byte budget, LRU, pinning, in-use protection
    usage           per-adapter counters (requests, tokens, reads, placements, evictions)
    batch_routing   the per-batch routing metadata (what each row routes on), built from the plans
    routed_linear   the wrapped linear layers that read it
    ensemble        ensemble plans as one row per adapter, their distributions mixed
    routed_model    RoutedModel: the model, its adapters, forward passes and logits
    kv_slots        the generation loop's KV memory (every row ends at one column)
    requests        SequenceRequest, its handle, and the loop's state of a request
    scheduler       admission, cancellation, deadlines, adapter leases
    runner          prefill and decode forward passes over the KV memory
    generation      token choice, stop strings, result types
    output          the loop's output stage: tokens chosen, events emitted, stop rules applied
    metrics         the loop's counters, histograms and stats snapshot
    loop            GenerationLoop: scheduler -> runner -> output stage, one step at a time
    routed_lm       RoutedLM, the public entry point (generation as a client of the loop)
    settings        EngineSettings, LoopSettings
    families        the served model families and their attention layouts (sliding windows)
    threads         torch CPU threads of one OS thread, set so that other threads cannot undo them
    introspection   hidden states, logit lens, layer inputs (the LoGo / qa-FLoRA baselines only)
"""

import importlib

# name -> the submodule that defines it; imported on first use, so that light imports
# (``hilora_core.engine.settings``) do not pull in transformers.
_EXPORTS = {
    "HostAdapter": "adapter_files", "InspectedAdapter": "adapter_files",
    "LayerLoRA": "adapter_files", "inspect_adapter": "adapter_files", "load_adapter": "adapter_files",
    "AdapterConfig": "adapter_files", "read_adapter_config": "adapter_files",
    "GenerationResult": "generation", "StreamEvent": "generation",
    "HostAdapterCache": "host_cache",
    "BatchRouting": "batch_routing", "RoutedLinear": "routed_linear", "RoutingState": "routed_linear",
    "build_batch_routing": "batch_routing",
    "RoutedLM": "routed_lm", "RoutedModel": "routed_model",
    "GenerationLoop": "loop", "SequenceRequest": "requests", "SequenceHandle": "requests",
    "LoopStats": "metrics",
    "EngineSettings": "settings", "LoopSettings": "settings",
    "SUPPORTED_ARCHITECTURES": "families", "FAMILIES": "families", "Family": "families",
    "check_architecture": "families", "family_of": "families", "attention_layout": "families",
    "AdapterSlots": "slots", "LayerSlots": "slots", "SlotLease": "slots",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hilora_core.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hilora_core.engine' has no attribute {name!r}")
