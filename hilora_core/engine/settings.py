"""Settings of the engine and of its generation loop, each field declared once with its help text.

Both are pydantic dataclasses: built by keyword, validated on construction (a bad value raises
``pydantic.ValidationError``, a ``ValueError`` naming the field), and embedded as they are in the
service's ``AppConfig`` (``deployments/config.py``).
"""

from __future__ import annotations

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class EngineSettings:
    """Adapter memory and token-rule settings of a :class:`RoutedLM`."""

    adapter_memory_bytes: int = Field(
        default=512 << 20, ge=1, description="device memory for resident adapters (bytes): an adapter takes "
                                             "sum over its layers of rank * (d_in + d_out) * dtype bytes; idle "
                                             "ones leave in LRU order")
    max_slots: int | None = Field(
        default=None, ge=1, description="optional cap on the adapters resident at once (None: the byte budget "
                                        "alone decides)")
    host_cache_bytes: int = Field(
        default=2 << 30, ge=1, description="host memory for adapter tensors read from disk or the hub (bytes, LRU)")
    host_cache_size: int | None = Field(
        default=None, ge=1, description="optional cap on the adapters kept in host memory (None: the bytes decide)")
    max_rank: int = Field(
        default=128, ge=1, description="largest LoRA rank accepted; larger adapters are refused at registration")
    arrow_temperature: float = Field(
        default=1.0, gt=0, description="softmax temperature of the Arrow token rule")
    max_adapter_bytes: int = Field(
        default=2 << 30, ge=1, description="largest adapter weights file read or downloaded (bytes)")


@dataclass(frozen=True, config=_STRICT)
class LoopSettings:
    """Bounds of the generation loop (``hilora_core.engine.loop``). The trade-off of
    ``prefill_tokens_per_step`` is measured in ``docs/load-test.md``."""

    max_rows: int = Field(
        default=32, ge=1, description="rows decoding at once (a plain or HiLoRA plan takes one row, an ensemble "
                                      "one per adapter)")
    max_waiting: int = Field(
        default=64, ge=0, description="requests queued for a row while every row is taken; one more gets "
                                      "QueueFullError (HTTP 503)")
    max_tokens_per_sequence: int = Field(
        default=2048, ge=1, description="prompt plus generated tokens of one request (the KV memory's columns)")
    prefill_tokens_per_step: int = Field(
        default=1024, ge=1, description="prompt tokens prefilled between two decode steps (always at least one "
                                        "request)")
    max_overtakes: int = Field(
        default=32, ge=0, description="requests admitted past one that waits for adapter memory before admission "
                                      "stops until it runs (fairness to cold adapters)")
    request_timeout_s: float | None = Field(
        default=600.0, gt=0, description="a request running longer ends with RequestTimeoutError (HTTP 504); "
                                         "None: no limit")
