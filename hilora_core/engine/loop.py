"""The generation loop: the one place where tokens are generated, for the service and offline callers.

    loop = GenerationLoop(lm, LoopSettings(max_rows=32))
    handle = loop.submit(SequenceRequest(prompt_ids, plan, max_new_tokens=64))
    for event in handle.events():        # StreamEvent deltas; the last one has finished=True
        ...

Requests join the running batch between decode steps and leave when they finish. Each step (on the
loop's own thread, or :meth:`GenerationLoop.step` called by a test) runs three parts:

1. the :class:`Scheduler` decides: requests that leave now (cancelled, past their deadline), whose
   rows and slots are freed at once, then requests admitted for this step (rows free, prefill budget,
   adapter slots leased);
2. the :class:`ModelRunner` prefills the admitted requests into the KV memory, then runs one decode
   step of every running row; each pass gives one score row per request;
3. the :class:`OutputStage` chooses the tokens, emits text, and applies stop rules; finished requests
   leave (their rows and adapter slots are freed).

Memory is bounded: ``max_rows`` rows of ``max_tokens_per_sequence`` tokens, and at most
``max_waiting`` requests queued beyond what the free rows take (more get :class:`QueueFullError`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from hilora_core.engine.ensemble import expand_ensembles
from hilora_core.engine.generation import SequenceProgress, TextTracker, check_sampling
from hilora_core.engine.metrics import LoopMetrics, LoopStats
from hilora_core.engine.output import OutputStage
from hilora_core.engine.requests import MAX_TOP_LOGPROBS, Item, RequestState, SequenceHandle, SequenceRequest
from hilora_core.engine.runner import ModelRunner
from hilora_core.engine.scheduler import Scheduler
from hilora_core.engine.settings import LoopSettings
from hilora_core.engine.threads import use_torch_threads
from hilora_core.errors import InvalidInputError, RequestCancelledError

if TYPE_CHECKING:
    from hilora_core.engine.routed_model import RoutedModel


class GenerationLoop:
    """The generation loop of one engine (see the module docstring).

    Args:
        lm: the engine (forward passes, adapter slots, tokenizer).
        settings: the loop's bounds.
        start: run the loop on a background thread now (tests may drive :meth:`step` themselves).
        threads: torch CPU threads of the loop's thread (None: the creating thread's count).
    """

    def __init__(self, lm: RoutedModel, settings: LoopSettings | None = None, start: bool = True,
                 threads: int | None = None) -> None:
        self.lm = lm
        self.settings = settings or LoopSettings()
        self.threads = threads or torch.get_num_threads()
        self.metrics = LoopMetrics()
        self.scheduler = Scheduler(lm, self.settings, self.metrics)
        self.runner = ModelRunner(lm, self.settings, self.metrics)
        self.output = OutputStage(self.metrics)
        self.started = threading.Event()  # set once the loop's thread has set its torch threads
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name="hilora-loop", daemon=True)
            self._thread.start()

    # ---- the callers' side -----------------------------------------------------------------------
    def submit(self, req: SequenceRequest, sink: Callable[[Item], None] | None = None,
               bounded: bool = True) -> SequenceHandle:
        """Queue a request. Errors in the request itself are raised here (:class:`InvalidInputError`,
        :class:`UnknownAdapterError`, :class:`AdapterLoadError`, :class:`CapacityError`); a full queue
        raises :class:`QueueFullError` (``bounded=False``: an in-process caller that waits for its own
        results, which is its own back-pressure). The adapters' files are read on the engine's loader threads,
        started here; the request waits in the queue meanwhile."""
        state = self._prepare(req, sink)
        self.scheduler.add(state, bounded)
        return state.handle

    def submit_many(self, reqs: Sequence[tuple[SequenceRequest, Callable[[Item], None] | None]],
                    bounded: bool = True) -> list[SequenceHandle]:
        """Queue several requests at once (each with its sink or None): all are checked first, then all are
        queued under one lock, so the loop admits them together (one prefill, within the step's budget)
        instead of starting the first ones while the rest are still being checked."""
        states = [self._prepare(req, sink) for req, sink in reqs]
        with self.scheduler.cond:
            for state in states:
                self.scheduler.add(state, bounded)
        return [s.handle for s in states]

    def _prepare(self, req: SequenceRequest, sink: Callable[[Item], None] | None) -> RequestState:
        s, lm = self.settings, self.lm
        if not req.prompt_ids:
            raise InvalidInputError("the prompt has no tokens")
        check_sampling([req.temperature], [req.top_p], [req.max_new_tokens])
        total = len(req.prompt_ids) + req.max_new_tokens
        if total > s.max_tokens_per_sequence:
            raise InvalidInputError(
                f"prompt ({len(req.prompt_ids)} tokens) plus max_tokens ({req.max_new_tokens}) is {total} tokens; "
                f"the limit is {s.max_tokens_per_sequence}")
        if any(not x for x in req.stop):
            raise InvalidInputError("stop strings must be non-empty")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidInputError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs!r}")
        batch = expand_ensembles([req.plan], 1)
        if len(batch.rows) > s.max_rows:
            raise InvalidInputError(f"the plan needs {len(batch.rows)} rows; the batch has {s.max_rows}")
        names = list(dict.fromkeys(a for p in batch.rows for a in p.adapters))
        ranks = lm.adapter_ranks(names)  # UnknownAdapterError for unregistered names
        lm.slots.check_fits(names)  # CapacityError if they can never be resident together
        lm.prefetch(names)  # read on the loader's threads; the request waits in the queue until they are in
        weights = [1.0] if batch.matrix is None else [float(w) for w in batch.matrix[0].tolist()]
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device=lm.device)
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(int(seed))
        eos = frozenset() if req.ignore_eos else frozenset(lm.eos_ids)
        progress = SequenceProgress(TextTracker(lm.tokenizer, tuple(req.stop)), req.max_new_tokens, eos)
        now = time.monotonic()
        deadline = None if s.request_timeout_s is None else now + s.request_timeout_s
        handle = SequenceHandle(self._wake, sink)
        return RequestState(req, handle, list(batch.rows), weights, ranks, progress, generator, now, deadline)

    def stats(self) -> LoopStats:
        """The queue and batch now, counters since start, KV memory in use, latency histograms."""
        m = self.metrics
        with self.scheduler.cond:
            waiting, running = len(self.scheduler.waiting), len(self.scheduler.running)
        return LoopStats(
            waiting=waiting, running=running, rows=self.runner.n_rows, max_rows=self.settings.max_rows,
            submitted=m.submitted, finished=m.finished, cancelled=m.cancelled, rejected=m.rejected,
            timed_out=m.timed_out, failed=m.failed, prompt_tokens=m.prompt_tokens,
            generated_tokens=m.generated_tokens, steps=m.steps, torch_threads=m.torch_threads,
            routing_builds=m.routing_builds, stack_reuses=m.stack_reuses, kv_shifts=m.kv_shifts,
            load_waits=m.load_waits, capacity_waits=m.capacity_waits, place_seconds=m.place_seconds,
            kv_bytes=self.runner.cache.nbytes(),
            ttft_s=m.ttft.snapshot(), itl_s=m.itl.snapshot())

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    def close(self) -> None:
        """Stop the loop; waiting and running requests end with :class:`RequestCancelledError`."""
        with self.scheduler.cond:
            self.scheduler.stopping = True
            self.scheduler.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail(RequestCancelledError("the generation loop was shut down"), include_waiting=True)

    def _wake(self) -> None:
        with self.scheduler.cond:
            self.scheduler.cond.notify_all()

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        use_torch_threads(self.threads)  # this thread's count, kept whatever other threads set later
        self.started.set()
        sched = self.scheduler
        while True:
            with sched.cond:
                while not sched.stopping and not sched.waiting and not sched.running:
                    sched.cond.wait()
                if sched.stopping:
                    return
            try:
                if not self.step():
                    with sched.cond:  # only waiting requests, whose adapters are being read: poll, do not spin
                        sched.cond.wait(timeout=0.005)
            except Exception as err:  # noqa: BLE001 - an engine failure ends the running requests, not the loop
                self._fail(err)
            self.metrics.torch_threads = torch.get_num_threads()

    def step(self) -> bool:
        """One iteration: schedule, prefill the admitted requests, decode one token of every running row.
        False when it ran no forward pass (nothing running, nothing admitted)."""
        reaped = self.scheduler.reap()
        self._leave(reaped.running)  # before admission: their rows and slots serve this step's newcomers
        admitted, failed = self.scheduler.admit()
        for state, err in reaped.dropped + failed:  # after they left: a caller that has the error sees them gone
            state.release()  # a request dropped while waiting holds no lease: a no-op then
            state.handle.emit(err)
        if admitted:
            try:
                out = self.runner.prefill(admitted, self.scheduler.running)
            except Exception as err:
                self.metrics.failed += len(admitted)
                self.scheduler.abandon(admitted)
                for s in admitted:
                    s.handle.emit(err)
                raise
            self.scheduler.start_running(admitted)
            self._finish(self.output.advance(out))
        if self.scheduler.running:
            self._finish(self.output.advance(self.runner.decode(self.scheduler.running)))
        elif not admitted:
            return False
        self.metrics.steps += 1
        return True

    def _finish(self, done: list[RequestState]) -> None:
        """Finished requests leave, then get their finishing event: a caller that has it sees the request's
        rows and adapter slots free."""
        self._leave(done)
        for s in done:
            assert s.final is not None
            self.lm.usage.add("requests", s.adapters)
            self.lm.usage.add("tokens", s.adapters, s.final.completion_tokens)
            s.handle.emit(s.final)

    def _leave(self, gone: list[RequestState]) -> None:
        """Requests that left the batch: free their rows, then their adapter slots."""
        if not gone:
            return
        leaving = {id(s) for s in gone}
        staying = [s for s in self.scheduler.running if id(s) not in leaving]
        self.runner.remove(gone, staying)
        self.scheduler.finish(gone)

    def _fail(self, err: BaseException, include_waiting: bool = False) -> None:
        """End every running request (and the queue, when shutting down) with ``err``."""
        victims = self.scheduler.drain(include_waiting)
        self._leave([s for s in victims if s in self.scheduler.running])
        for s in victims:
            self.metrics.failed += 1
            s.release()
            s.handle.emit(err)
