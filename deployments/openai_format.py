"""OpenAI response bodies as typed models, built from a replica's typed replies.

Chat reports logprobs as ``{"content": [entries], "refusal": None}``; completions report the legacy
lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (token -> logprob) and ``text_offset``. Every
body also carries this service's ``routing`` (what was used and why) and ``timing`` fields.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from .contracts import GenerationReply, LogprobEntry, RoutingSummary

Kind = Literal["chat", "completion"]


class _Body(BaseModel):
    """A response part whose ``_optional`` fields are left out when None (the others are sent as null, as
    OpenAI sends ``logprobs`` and ``finish_reason``)."""

    _optional: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        for name in self._optional:
            if out.get(name) is None:
                out.pop(name, None)
        return out


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Timing(BaseModel):
    """Seconds spent routing (embed + score) and generating so far."""

    routing_s: float
    generation_s: float

    @classmethod
    def since(cls, started: float, routed: float) -> Timing:
        now = time.perf_counter()
        return cls(routing_s=round(routed - started, 6), generation_s=round(now - routed, 6))


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


def chat_logprobs(entries: list[LogprobEntry] | None) -> ChatLogprobs | None:
    """The chat ``logprobs`` object of some generated tokens."""
    if entries is None:
        return None
    return ChatLogprobs(content=[ChatTokenLogprob(
        token=e.token, logprob=e.logprob, bytes=e.bytes,
        top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top_logprobs])
        for e in entries])


def completion_logprobs(entries: list[LogprobEntry] | None, text_offset: int = 0) -> CompletionLogprobs | None:
    """The completions ``logprobs`` object; ``text_offset`` is the character offset of the first token."""
    if entries is None:
        return None
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Body):
    _optional = ("routing",)
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str
    routing: RoutingSummary | None = None  # per choice when a request has several prompts


class CompletionChoice(_Body):
    _optional = ("routing",)
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str
    routing: RoutingSummary | None = None


class Completion(BaseModel):
    """A whole chat completion (``object: chat.completion``) or text completion (``text_completion``)."""

    id: str
    object: Literal["chat.completion", "text_completion"]
    created: int
    model: str
    choices: list[ChatChoice] | list[CompletionChoice]
    usage: Usage
    routing: RoutingSummary
    timing: Timing


def choice(kind: Kind, index: int, result: GenerationReply, echo_prefix: str | None = None,
           routing: RoutingSummary | None = None) -> ChatChoice | CompletionChoice:
    """One choice of a non-streamed response from a replica's reply."""
    if kind == "chat":
        return ChatChoice(index=index, message=AssistantMessage(content=result.text),
                          logprobs=chat_logprobs(result.logprobs), finish_reason=result.finish_reason, routing=routing)
    text, entries = result.text, result.logprobs
    if echo_prefix is not None:
        text = echo_prefix + text
        if entries is not None:
            entries = (result.prompt_logprobs or []) + entries
    offset = 0 if echo_prefix is not None else len(result.prompt_text or "")
    return CompletionChoice(index=index, text=text, logprobs=completion_logprobs(entries, offset),
                            finish_reason=result.finish_reason, routing=routing)


class ChatDelta(_Body):
    _optional = ("role",)
    role: Literal["assistant"] | None = None
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Chunk(_Body):
    """One server-sent event of a stream (``chat.completion.chunk`` or ``text_completion``); the finishing
    chunk of a choice adds ``routing`` and ``timing``, and ``usage`` when asked."""

    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChunkChoice] | list[CompletionChunkChoice]
    usage: Usage | None = None
    routing: RoutingSummary | None = None
    timing: Timing | None = None

    _optional = ("usage", "routing", "timing")


def chunk_choice(kind: Kind, index: int, delta: str, finish: str | None, first: bool,
                 logprobs: list[LogprobEntry] | None) -> ChatChunkChoice | CompletionChunkChoice:
    """The one choice of a stream event."""
    if kind == "chat":
        return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant" if first else None, content=delta),
                               logprobs=chat_logprobs(logprobs), finish_reason=finish)
    return CompletionChunkChoice(index=index, text=delta, logprobs=completion_logprobs(logprobs),
                                 finish_reason=finish)


def sse(body: BaseModel) -> str:
    """A model as one server-sent event."""
    return f"data: {body.model_dump_json()}\n\n"
