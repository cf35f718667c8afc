"""What a request is to the generation loop: the caller's request, its handle, and the loop's state of it.

    req = SequenceRequest(prompt_ids, plan, max_new_tokens=64, temperature=0.7, seed=5)
    handle = loop.submit(req)            # hilora_core.engine.loop.GenerationLoop
    for event in handle.events(): ...    # StreamEvent deltas; the last one has finished=True
    handle.cancel()                      # leaves the batch at the next step
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hilora_core.engine.generation import SequenceProgress, StreamEvent, TokenLogprob
from hilora_core.plan import RoutingPlan

if TYPE_CHECKING:
    from hilora_core.engine.slots import SlotLease

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SequenceRequest:
    """One request for the loop.

    Attributes:
        prompt_ids: the prompt's token ids (chat template already applied).
        plan: its routing plan (default: the base model).
        max_new_tokens: generated tokens at most.
        temperature: 0 is greedy; else softmax(logits / temperature) is sampled.
        top_p: nucleus mass in (0, 1].
        seed: seeds this request's own sampling generator (None: a random seed). Every token the
            request samples draws its noise from it, so its text does not depend on its batch.
        stop: stop strings; the text is cut before the first one.
        ignore_eos: keep generating past EOS (benchmarks).
        logprobs: None, or the number of alternatives (0 to 20) reported with each chosen token's logprob.
        prompt_logprobs: report the prompt tokens' logprobs (``echo``) on the first event.
    """

    prompt_ids: Sequence[int]
    plan: RoutingPlan = field(default_factory=RoutingPlan)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: bool = False


Item = StreamEvent | BaseException


class SequenceHandle:
    """The caller's side of a submitted request. Items (events, then possibly an exception) go to ``sink``;
    without one they are queued for :meth:`events`. ``wake`` tells the loop that something changed."""

    def __init__(self, wake: Callable[[], None], sink: Callable[[Item], None] | None) -> None:
        self._wake = wake
        self._queue: queue.Queue[Item] | None = None if sink is not None else queue.Queue()
        self._sink: Callable[[Item], None] = sink if sink is not None else self._queue.put  # type: ignore[union-attr]
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        """Leave the batch at the next step (a no-op once finished)."""
        if not self.finished:
            self.cancelled = True
            self._wake()

    def emit(self, item: Item) -> None:
        """Deliver an event or the request's error (the loop's side)."""
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self._sink(item)

    def events(self, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The request's events until the finishing one; an error of the request is raised here."""
        if self._queue is None:
            raise RuntimeError("this handle delivers its events to a sink")
        while True:
            item = self._queue.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return


@dataclass(eq=False)
class RequestState:
    """The loop's state of one request, from submission until it leaves the batch.

    Attributes:
        rows: the plans the model runs for it (an ensemble: one single-adapter row per adapter).
        weights: the mixing weight of each row (1.0 for a one-row request).
        generator: its own sampling generator (None when greedy).
        lease: its adapters' device slots, held from admission until it leaves.
        start: the KV column of its first prompt token (the runner keeps it).
    """

    req: SequenceRequest
    handle: SequenceHandle
    rows: list[RoutingPlan]
    weights: list[float]
    ranks: dict[str, int]
    progress: SequenceProgress
    generator: torch.Generator | None
    submitted: float
    deadline: float | None
    lease: SlotLease | None = None
    start: int = 0
    last_token: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    pending: list[TokenLogprob] = field(default_factory=list)
    prompt_lp: list[TokenLogprob | None] | None = None
    final: StreamEvent | None = None  # the finishing event, emitted once the request has left the batch
    overtaken: int = 0  # requests admitted past it while it waited for device memory

    @property
    def adapters(self) -> list[str]:
        """Its adapters, each once, in plan order."""
        return list(dict.fromkeys(a for p in self.rows for a in p.adapters))

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    def release(self) -> None:
        """Give back its adapters' device slots (once)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None
