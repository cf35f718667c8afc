"""The routed model engine: a base LLM, on-demand LoRA tensors, batched token-level routing.

Modules, in data-flow order:
    adapter_files   read and check PEFT LoRA adapters (safetensors only)
    host_cache      host-memory LRU of adapter tensors (one load per adapter at a time)
    slots           preallocated device slots per routed layer (LRU, pinning, in-use protection)
    routed_linear   the wrapped linear layers and the per-batch routing metadata
    ensemble        ensemble plans as one row per adapter, their distributions mixed
    generation      token choice, stop strings, result types
    decode          the decode loop of a mixed batch
    settings        EngineSettings, supported architectures
    threads         torch CPU threads of one OS thread, set so that other threads cannot undo them
    routed_lm       RoutedLM, the public entry point
    introspection   hidden states, logit lens, layer inputs (the LoGo / qa-FLoRA baselines only)
"""

import importlib

# name -> the submodule that defines it; imported on first use, so that light imports
# (``hilora_core.engine.settings``) do not pull in transformers.
_EXPORTS = {
    "SUPPORTED_TARGETS": "adapter_files", "HostAdapter": "adapter_files", "InspectedAdapter": "adapter_files",
    "LayerLoRA": "adapter_files", "inspect_adapter": "adapter_files", "load_adapter": "adapter_files",
    "AdapterConfig": "adapter_files", "read_adapter_config": "adapter_files",
    "GenerationResult": "generation", "StreamEvent": "generation",
    "HostAdapterCache": "host_cache",
    "BatchRouting": "routed_linear", "RoutedLinear": "routed_linear", "RoutingState": "routed_linear",
    "build_batch_routing": "routed_linear",
    "RoutedLM": "routed_lm",
    "SUPPORTED_ARCHITECTURES": "settings", "EngineSettings": "settings", "check_architecture": "settings",
    "AdapterSlots": "slots", "LayerSlots": "slots", "SlotLease": "slots",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hilora_core.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hilora_core.engine' has no attribute {name!r}")
