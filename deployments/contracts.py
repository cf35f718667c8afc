"""The typed messages between the deployments (request -> embed -> registry -> model replica -> ingress).

:class:`Decision` (``registry/decision.py``) is what the registry answers for one request: it carries
the :class:`RoutingPlan` itself, and the ingress reports its summary in ``routing``. :class:`GenerateCall`
is what the ingress asks a model replica to run; a replica answers with :class:`GenerationReply`
(``generate``) or a :class:`StreamStarted` then :class:`GenerationChunk` items (``stream``), each
finishing one carrying the replica's :class:`ReplicaStats` apart from the result. All are pydantic
models, so a field added on one side is validated on the other.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hilora_core.engine.metrics import LoopStats
from hilora_core.plan import RoutingPlan
from registry.decision import AdapterLocation, Decision, OffPoolTest, RoutingSummary

__all__ = ["AdapterLocation", "Decision", "GenerateCall", "GenerationChunk", "GenerationReply", "LogprobEntry",
           "OffPoolTest", "ReplicaStats", "RoutingSummary", "StreamStarted", "TokenEntry"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateCall(_Message):
    """One generation a model replica runs: the plan, where its adapters live, the prompt and settings."""

    plan: RoutingPlan
    sources: dict[str, AdapterLocation]
    prompt: str | None = None
    prompt_ids: list[int] | None = Field(None, description="a prompt given as token ids (completions)")
    messages: list[dict[str, Any]] | None = None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    logprobs: int | None = Field(None, description="None, or alternatives (0-20) reported per generated token")
    echo_logprobs: bool = Field(False, description="also report the prompt tokens' logprobs")
    ignore_eos: bool = Field(False, description="generate past EOS until max_tokens")


class TokenEntry(_Message):
    """One token as OpenAI reports it: its text, UTF-8 bytes, id and logprob (None for a prompt's first)."""

    token: str
    bytes: list[int]
    id: int
    logprob: float | None = None


class LogprobEntry(TokenEntry):
    """A chosen token with its ``top_logprobs`` alternatives."""

    top_logprobs: list[TokenEntry] = []


class ReplicaStats(_Message):
    """A model replica's counters: adapter cache tiers and the generation loop (kept apart from results)."""

    replica: str
    cache: dict[str, Any]
    loop: LoopStats | None = None
    adapters: dict[str, dict[str, float]] = {}  # the top adapters' usage and "other" (AdapterUsage.top)


class StreamStarted(_Message):
    """The first item of a replica's stream: the request's adapters are loaded and it is queued."""


class GenerationChunk(_Message):
    """A text delta of a streamed generation; the finishing chunk has ``finish_reason`` and ``stats``.

    ``prompt_logprobs`` and ``prompt_text`` come on the first chunk of an ``echo`` request."""

    delta: str
    logprobs: list[LogprobEntry] | None = None
    prompt_logprobs: list[LogprobEntry] | None = None
    prompt_text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float | None = None
    stats: ReplicaStats | None = None


class GenerationReply(_Message):
    """A whole generation (``ModelReplica.generate``)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[LogprobEntry] | None = None
    prompt_logprobs: list[LogprobEntry] | None = None
    prompt_text: str | None = None
    seconds: float
    stats: ReplicaStats
