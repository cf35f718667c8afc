"""Settings of the engine, and the base-model architectures it supports."""

from __future__ import annotations

from dataclasses import dataclass

from hilora_core.errors import InvalidInputError, UnsupportedModelError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass(frozen=True)
class EngineSettings:
    """Settings of a :class:`RoutedLM`.

    Attributes:
        max_slots: adapters resident on the device at once (S of the slot stacks).
        host_cache_size: adapters kept in host memory (LRU).
        max_rank: the largest LoRA rank a slot holds (R); larger adapters are refused.
        arrow_temperature: softmax temperature of the Arrow token rule.
        max_adapter_bytes: an adapter weights file (local, or on the hub before download) above this is refused.
    """

    max_slots: int = 16
    host_cache_size: int = 64
    max_rank: int = 64
    arrow_temperature: float = 1.0
    max_adapter_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        for name in ("max_slots", "host_cache_size", "max_rank", "max_adapter_bytes"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.arrow_temperature > 0:
            raise InvalidInputError(f"arrow_temperature must be > 0, got {self.arrow_temperature!r}")


def check_architecture(config) -> str:
    """The model's architecture name if supported, else :class:`UnsupportedModelError` naming it."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if not archs and model_type in _SUPPORTED_MODEL_TYPES:
        return _SUPPORTED_MODEL_TYPES[model_type]
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise UnsupportedModelError(
        f"unsupported base architecture {archs or model_type!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )
