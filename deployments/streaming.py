"""Streamed responses: replica streams merged into server-sent events, one :class:`StreamState` per response.

A streamed request with ``n`` choices (or several prompts) runs one replica stream per choice;
:func:`merge_streams` interleaves their chunks in arrival order, :class:`StreamState` turns each
chunk into an OpenAI chunk event (echo prefix, routing and timing on each choice's finishing chunk,
running usage when asked, the closing usage chunk), and :func:`sse_events` writes the events.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .contracts import Decision, GenerationChunk
from .errors import error_body, message_of, status_for
from .metrics import ServiceMetrics
from .openai_format import Chunk, Kind, Timing, Usage, chunk_choice, sse

T = TypeVar("T")


async def sse_events(items: AsyncIterator[tuple[int, T]], render: Callable[[int, T, bool], str | None],
                     closing: Callable[[], str | None] | None = None) -> AsyncIterator[str]:
    """Server-sent events from (choice index, replica item) pairs, ``data: [DONE]`` last.

    ``render(index, item, first)`` formats one event (None: nothing to send); ``first`` is True until
    that choice's first event is sent. ``closing()`` may add one event after every choice has ended
    (the usage chunk of ``stream_options.include_usage``). The response headers are already sent when
    a replica fails, so a failure becomes one in-band ``{"error": {"message": ...}}`` event before ``[DONE]``.
    """
    started: set[int] = set()
    try:
        async for index, item in items:
            event = render(index, item, index not in started)
            if event:
                started.add(index)
                yield event
        tail = closing() if closing is not None else None
        if tail:
            yield tail
    except Exception as err:  # noqa: BLE001 - headers are sent: report in-band
        yield f"data: {json.dumps(error_body(status_for(err) or 500, message_of(err)))}\n\n"
    yield "data: [DONE]\n\n"


async def merge_streams(sources: Sequence[tuple[int, AsyncIterator[T]]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several replica streams as (index, item) in arrival order; closing the merge (the client
    went away) cancels every source, so each request leaves its replica's batch."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(index: int, gen: AsyncIterator[T]) -> None:
        try:
            async for item in gen:
                await queue.put((index, item))
        except Exception as err:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, err))
        finally:
            await queue.put((index, end))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in sources]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class StreamState:
    """One streamed response: what has been sent, and what its closing chunk reports.

    Attributes:
        kind: chat or completion; base: the chunks' id, object, created and model.
        prompt_of: choice index -> prompt index; decisions: each prompt's routing decision.
        echo_text: each prompt's echo prefix (None: not echoed, or taken from the replica's prompt_text).
        include_usage: a closing chunk with the whole usage; running_usage: each chunk carries its
            choice's usage so far (vLLM's ``continuous_usage_stats``).
    """

    kind: Kind
    base: dict[str, Any]
    prompt_of: dict[int, int]
    decisions: Sequence[Decision]
    echo: bool
    echo_text: Sequence[str | None]
    include_usage: bool
    running_usage: bool
    metrics: ServiceMetrics
    started: float
    routed: float
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0
    last_text_at: float | None = None

    def render(self, index: int, item: GenerationChunk, first: bool) -> str | None:
        """The event of one replica chunk (None: nothing new to send)."""
        delta, finish, logprobs = item.delta, item.finish_reason, item.logprobs
        pi = self.prompt_of[index]
        if first and self.echo:
            prefix = self.echo_text[pi]
            delta = (prefix if prefix is not None else item.prompt_text or "") + delta
            if logprobs is not None:
                logprobs = (item.prompt_logprobs or []) + logprobs
        if delta:
            self._observe_text()
        if finish is None and not delta and not logprobs:
            return None
        out = Chunk(**self.base, choices=[chunk_choice(self.kind, index, delta, finish, first, logprobs)])
        if finish is not None:
            if item.stats is not None:
                self.metrics.observe_replica(item.stats)
            self.prompt_tokens[pi] = item.prompt_tokens
            self.completion_tokens += item.completion_tokens
            out.routing = self.decisions[pi].summary()
            out.timing = Timing.since(self.started, self.routed)
        if self.running_usage:
            out.usage = Usage.of(item.prompt_tokens, item.completion_tokens)
        return sse(out)

    def _observe_text(self) -> None:
        now = time.perf_counter()
        if self.last_text_at is None:
            self.metrics.ttft.labels(self.kind).observe(now - self.started)
        else:
            self.metrics.itl.labels(self.kind).observe(now - self.last_text_at)
        self.last_text_at = now

    def closing(self) -> str | None:
        """After every choice ended: count the tokens; the usage chunk when asked."""
        prompt_tokens = sum(self.prompt_tokens.values())
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        self.metrics.tokens.labels("completion").inc(self.completion_tokens)
        self.metrics.request_latency.labels(self.kind).observe(time.perf_counter() - self.started)
        if not self.include_usage:
            return None
        return sse(Chunk(**self.base, choices=[], usage=Usage.of(prompt_tokens, self.completion_tokens)))
