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
    routed_lm       RoutedLM, the public entry point
    introspection   hidden states, logit lens, layer inputs (the LoGo / qa-FLoRA baselines only)
"""

from hilora_core.engine.adapter_files import (
    SUPPORTED_TARGETS,
    AdapterConfig,
    HostAdapter,
    InspectedAdapter,
    LayerLoRA,
    inspect_adapter,
    load_adapter,
    read_adapter_config,
)
from hilora_core.engine.generation import GenerationResult, StreamEvent
from hilora_core.engine.host_cache import HostAdapterCache
from hilora_core.engine.routed_linear import BatchRouting, RoutedLinear, RoutingState, build_batch_routing
from hilora_core.engine.routed_lm import RoutedLM
from hilora_core.engine.settings import SUPPORTED_ARCHITECTURES, EngineSettings, check_architecture
from hilora_core.engine.slots import AdapterSlots, LayerSlots, SlotLease

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TARGETS",
    "AdapterConfig",
    "AdapterSlots",
    "InspectedAdapter",
    "BatchRouting",
    "EngineSettings",
    "GenerationResult",
    "HostAdapter",
    "HostAdapterCache",
    "LayerLoRA",
    "LayerSlots",
    "RoutedLM",
    "RoutedLinear",
    "RoutingState",
    "SlotLease",
    "StreamEvent",
    "build_batch_routing",
    "check_architecture",
    "inspect_adapter",
    "load_adapter",
    "read_adapter_config",
]
