"""The routed model engine: a base LLM, on-demand LoRA tensors, batched token-level routing.

Modules, in data-flow order:
    adapter_files   read and check PEFT LoRA adapters (safetensors only)
    host_cache      host-memory LRU of adapter tensors (one load per adapter at a time)
    slots           preallocated device slots per routed layer (LRU, pinning, in-use protection)
    routed_linear   the wrapped linear layers and the per-batch routing metadata
    generation      token choice, stop strings, result types
    routed_lm       RoutedLM, the public entry point
"""

from .adapter_files import (
    SUPPORTED_TARGETS,
    AdapterConfig,
    AdapterSource,
    HostAdapter,
    LayerLoRA,
    inspect_adapter,
    load_adapter,
    read_adapter_config,
)
from .generation import GenerationResult, StreamEvent
from .host_cache import HostAdapterCache
from .routed_linear import BatchRouting, RoutedLinear, RoutingState, build_batch_routing
from .routed_lm import SUPPORTED_ARCHITECTURES, EngineSettings, RoutedLM, check_architecture
from .slots import AdapterSlots, LayerSlots, SlotLease

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_TARGETS",
    "AdapterConfig",
    "AdapterSlots",
    "AdapterSource",
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
