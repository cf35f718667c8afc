"""RoutedLM: the engine's public entry point, a :class:`RoutedModel` that generates through the loop.

    lm = RoutedLM.from_pretrained(None)                 # SmolLM2-135M-Instruct, CPU, float32
    lm.add_adapter("sst2", "/path/to/peft_adapter")
    lm.generate(["Review: great film."], plans=[RoutingPlan(("sst2", "qnli"), rocs=(3, 2))])

:meth:`RoutedLM.generate` and :meth:`RoutedLM.stream` are clients of the engine's one generation loop
(:class:`GenerationLoop`, started on first use): every prompt is submitted as its own request and the
results are read from the handles, so offline generation and the service produce the same tokens.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from hilora_core.engine.generation import GenerationResult, StreamEvent, check_sampling, per_sequence
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import Item, SequenceHandle, SequenceRequest
from hilora_core.engine.routed_model import RoutedModel
from hilora_core.engine.settings import LoopSettings
from hilora_core.errors import InvalidInputError
from hilora_core.plan import RoutingPlan

StopArg = str | Sequence[str] | Sequence[Sequence[str]] | None


class RoutedLM(RoutedModel):
    """A :class:`RoutedModel` with generation (see the module docstring)."""

    _loop: GenerationLoop | None = None

    def start_loop(self, settings: LoopSettings | None = None, threads: int | None = None) -> GenerationLoop:
        """Start the engine's generation loop (once; later calls return it). ``threads``: torch CPU threads of
        the loop's thread (None: the calling thread's count)."""
        if self._loop is None:
            self._loop = GenerationLoop(self, settings, threads=threads)
            self._loop.started.wait(timeout=30)
        return self._loop

    @property
    def loop(self) -> GenerationLoop:
        """The engine's generation loop (started with default settings on first use)."""
        return self.start_loop()

    def close(self) -> None:
        """Stop the generation loop, if it runs; requests still in it end with RequestCancelledError."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def prompt_ids(self, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
        """Token ids of each prompt (``chat``: wrapped in the chat template as one user turn)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompts must be a list of strings")
        if not prompts:
            raise InvalidInputError("prompts is empty")
        out = []
        for p in prompts:
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                          add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(p)["input_ids"]
            if not ids:
                raise InvalidInputError("every prompt must have at least one token")
            out.append(list(ids))
        return out

    def stream(
        self,
        prompts: Sequence[str],
        plans: Sequence[RoutingPlan] | None = None,
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | None = None,
        stop: StopArg = None,
        chat: bool = False,
        ignore_eos: bool = False,
    ) -> Iterator[StreamEvent]:
        """Generate for several prompts, yielding :class:`StreamEvent` text deltas (``index``: the prompt)
        as they become final.

        Args:
            prompts: B prompts.
            plans: B routing plans (None: base model for all).
            max_new_tokens, temperature, top_p: a value for all or one per prompt; temperature 0 is greedy.
            seed: prompt ``i`` samples with its own generator seeded ``seed + i`` (as choice ``i`` of a
                served request with ``n`` choices); None: random seeds.
            stop: stop strings, for all prompts (a string or list of strings) or per prompt (a list of
                lists). The text is cut before the first stop string.
            chat: wrap each prompt in the tokenizer's chat template (one user turn).
            ignore_eos: keep generating past EOS (benchmarks).

        Requests are checked and submitted before this returns. Every prompt ends with one event with
        ``finished=True``. Closing the iterator early cancels the prompts still running, and returns once
        they have left the batch (their adapter slots are free then).
        """
        reqs = self._requests(prompts, plans, max_new_tokens, temperature, top_p, seed, stop, chat, ignore_eos)
        events: queue.Queue[tuple[int, Item]] = queue.Queue()
        handles = self.loop.submit_many([(r, _tagged(events, i)) for i, r in enumerate(reqs)], bounded=False)
        return _merged(events, handles)

    def _requests(self, prompts: Sequence[str], plans: Sequence[RoutingPlan] | None,
                  max_new_tokens: int | Sequence[int], temperature: float | Sequence[float],
                  top_p: float | Sequence[float], seed: int | None, stop: StopArg, chat: bool,
                  ignore_eos: bool) -> list[SequenceRequest]:
        """One checked :class:`SequenceRequest` per prompt (arguments as :meth:`stream`)."""
        ids = self.prompt_ids(prompts, chat)
        n = len(ids)
        max_new = per_sequence("max_new_tokens", max_new_tokens, n, int)
        temps = per_sequence("temperature", temperature, n, float)
        top_ps = per_sequence("top_p", top_p, n, float)
        check_sampling(temps, top_ps, max_new)
        stops = _per_prompt_stops(stop, n)
        self._expand(plans, n)  # checks the plans and their adapters before anything is queued
        plan_list = list(plans) if plans is not None else [RoutingPlan()] * n
        return [SequenceRequest(ids[i], plan_list[i], max_new_tokens=max_new[i], temperature=temps[i], top_p=top_ps[i],
                                seed=None if seed is None else seed + i, stop=stops[i], ignore_eos=ignore_eos)
                for i in range(n)]

    def generate_detailed(self, prompts: Sequence[str], plans: Sequence[RoutingPlan] | None = None,
                          max_new_tokens: int | Sequence[int] = 64, temperature: float | Sequence[float] = 0.0,
                          top_p: float | Sequence[float] = 1.0, seed: int | None = None, stop: StopArg = None,
                          chat: bool = False, ignore_eos: bool = False) -> list[GenerationResult]:
        """Like :meth:`generate` but returns :class:`GenerationResult` (text, token ids, counts, reason).

        The texts are gathered in the loop's thread and this thread waits once for all of them (not once
        per token, as a reader of :meth:`stream` does)."""
        reqs = self._requests(prompts, plans, max_new_tokens, temperature, top_p, seed, stop, chat, ignore_eos)
        collector = _Collector(len(reqs))
        handles = self.loop.submit_many([(r, collector.sink(i)) for i, r in enumerate(reqs)], bounded=False)
        try:
            while not collector.done.wait(0.5):  # wakes to let a KeyboardInterrupt through
                pass
        finally:
            for h in handles:
                h.cancel()  # a no-op for finished ones
        if collector.error is not None:
            raise collector.error
        return [r for r in collector.results if r is not None]

    def generate(self, prompts: Sequence[str], plans: Sequence[RoutingPlan] | None = None,
                 max_new_tokens: int | Sequence[int] = 64, temperature: float | Sequence[float] = 0.0,
                 top_p: float | Sequence[float] = 1.0, seed: int | None = None, stop: StopArg = None,
                 chat: bool = False, ignore_eos: bool = False) -> list[str]:
        """Generated texts, one per prompt (same arguments as :meth:`stream`)."""
        results = self.generate_detailed(
            prompts, plans, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            stop=stop, chat=chat, ignore_eos=ignore_eos,
        )
        return [r.text for r in results]


def _tagged(events: queue.Queue[tuple[int, Item]], index: int) -> Callable[[Item], None]:
    """A sink that puts a handle's items on the shared queue with its prompt's index."""
    def put(item: Item) -> None:
        events.put((index, item))
    return put


class _Collector:
    """Sinks that gather each prompt's text in the loop's thread; ``done`` is set once every prompt finished,
    or at the first error."""

    def __init__(self, n: int) -> None:
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.results: list[GenerationResult | None] = [None] * n
        self.error: BaseException | None = None
        self.left = n
        self.done = threading.Event()

    def sink(self, index: int) -> Callable[[Item], None]:
        def put(item: Item) -> None:  # called on the loop's thread only
            if isinstance(item, BaseException):
                self.error = self.error or item
                self.done.set()
                return
            self.texts[index].append(item.delta)
            if item.finished:
                self.results[index] = GenerationResult(
                    text="".join(self.texts[index]), token_ids=item.token_ids or [], prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens, finish_reason=item.finish_reason or "length")
                self.left -= 1
                if self.left == 0:
                    self.done.set()
        return put


def _per_prompt_stops(stop: StopArg, n: int) -> list[tuple[str, ...]]:
    if stop is None:
        stops: list[tuple[str, ...]] = [()] * n
    elif isinstance(stop, str):
        stops = [(stop,)] * n
    elif all(isinstance(s, str) for s in stop):
        stops = [tuple(stop)] * n  # type: ignore[arg-type]
    else:
        stops = [tuple(s) for s in stop]
        if len(stops) != n:
            raise InvalidInputError(f"stop has {len(stops)} lists for {n} prompts")
    if any(not s for st in stops for s in st):
        raise InvalidInputError("stop strings must be non-empty")
    return stops


def _merged(events: queue.Queue[tuple[int, Item]], handles: list[SequenceHandle]) -> Iterator[StreamEvent]:
    """The handles' events in arrival order, each tagged with its prompt's index; an error is raised."""
    left = len(handles)
    try:
        while left:
            i, item = events.get()
            if isinstance(item, BaseException):
                raise item
            item.index = i
            yield item
            if item.finished:
                left -= 1
    finally:  # closed early, or an error: cancel the rest and wait until they have left the batch
        pending = [h for h in handles if not h.finished]
        for h in pending:
            h.cancel()
        deadline = time.monotonic() + 30.0
        while any(not h.finished for h in pending) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                events.get(timeout=0.1)


__all__ = ["RoutedLM"]
