"""The generation loop's scheduler: which requests wait, which run, and which leave before a step.

It decides and the other parts act (as vLLM's ``Scheduler.schedule()`` does): :meth:`Scheduler.reap`
returns the requests that leave now (cancelled, or past their deadline), which the loop removes from
the batch; :meth:`Scheduler.admit` then returns the ones admitted for this step (with the leavers'
rows and slots already free); the model runner prefills them and the loop calls
:meth:`Scheduler.start_running`. Admission is first come, first served, while rows are free and the
step's prefill budget lasts (at least one request per step). A request whose adapters are still being
read, or cannot get device memory now (held by running requests), waits without blocking the requests
behind it; the second wait is bounded (``max_overtakes``, see :meth:`Scheduler.admit`).
Adapter slots are leased at admission and given back when the request leaves (:meth:`finish`).

The waiting and running lists are read by submitting threads (the queue bound) and written by the
loop's thread: both under :attr:`Scheduler.cond`, on which the loop also sleeps when idle.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hilora_core.engine.metrics import LoopMetrics
from hilora_core.engine.requests import RequestState
from hilora_core.engine.settings import LoopSettings
from hilora_core.errors import (
    AdapterNotReadyError,
    CapacityError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)

if TYPE_CHECKING:
    from hilora_core.engine.routed_model import RoutedModel


@dataclass
class Reaped:
    """Requests that leave before a step, each with its error; ``running``: those of them holding rows."""

    dropped: list[tuple[RequestState, BaseException]] = field(default_factory=list)
    running: list[RequestState] = field(default_factory=list)


class Scheduler:
    """Admission, cancellation, deadlines and adapter leases of one loop (see the module docstring)."""

    def __init__(self, lm: RoutedModel, settings: LoopSettings, metrics: LoopMetrics) -> None:
        self.lm, self.settings, self.metrics = lm, settings, metrics
        self.cond = threading.Condition()
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # in admission order, as their rows are
        self._admitting: list[RequestState] = []  # admitted this step, not yet prefilled
        self.stopping = False

    # ---- the submitting threads' side ------------------------------------------------------------
    def add(self, state: RequestState, bounded: bool = True) -> None:
        """Queue a request; :class:`QueueFullError` when ``bounded`` and ``max_waiting`` requests already
        wait for a row that the next step will not free."""
        with self.cond:
            if self.stopping:
                raise CapacityError("the generation loop is shut down")
            blocked, free = self._waiting_for_rows()
            if bounded and blocked >= self.settings.max_waiting and not (blocked == 0 and len(state.rows) <= free):
                self.metrics.rejected += 1
                raise QueueFullError(f"{blocked} requests are waiting for a row, the queue's limit "
                                     f"(max_waiting={self.settings.max_waiting}); retry shortly")
            self.waiting.append(state)
            self.metrics.submitted += 1
            self.cond.notify()

    def _waiting_for_rows(self) -> tuple[int, int]:
        """(queued requests that the free rows will not take at the next step, rows left free after the
        others are taken), first come first served; the caller holds the lock. Only the former count
        against ``max_waiting``: a burst into free rows is not refused."""
        free = self.settings.max_rows - self.rows_taken()
        blocked = 0
        for x in self.waiting:
            if blocked == 0 and len(x.rows) <= free:
                free -= len(x.rows)
            else:
                blocked += 1
        return blocked, max(free, 0)

    def rows_taken(self) -> int:
        return sum(len(x.rows) for x in self.running) + sum(len(x.rows) for x in self._admitting)

    @property
    def busy(self) -> bool:
        with self.cond:
            return bool(self.waiting or self.running)

    # ---- the loop's side -------------------------------------------------------------------------
    def reap(self) -> Reaped:
        """The cancelled requests and those past their deadline, waiting or running; the waiting ones are
        taken off the queue here, the running ones are for the loop to remove from the batch."""
        out = Reaped()
        now = time.monotonic()

        def leaving(s: RequestState) -> bool:
            return s.handle.cancelled or (s.deadline is not None and now > s.deadline)

        with self.cond:
            waiting = [s for s in self.waiting if leaving(s)]
            for s in waiting:
                self.waiting.remove(s)
        out.running = [s for s in self.running if leaving(s)]
        for s in waiting + out.running:
            if s.handle.cancelled:
                self.metrics.cancelled += 1
                out.dropped.append((s, RequestCancelledError("the request was cancelled")))
            else:
                self.metrics.timed_out += 1
                out.dropped.append((s, RequestTimeoutError(
                    f"the request ran longer than request_timeout_s={self.settings.request_timeout_s}")))
        return out

    def admit(self) -> tuple[list[RequestState], list[tuple[RequestState, BaseException]]]:
        """(requests admitted for this step, in order, holding their adapters' slots; requests that cannot
        run at all, with their error). First come, first served, within the free rows and the prefill budget.

        Two waits let later requests go ahead: adapters still being read into host memory (on the loader's
        threads; the loop never reads), and adapters that get no device memory now because running requests
        hold it. The second is bounded for fairness: once ``max_overtakes`` requests were admitted past a
        request waiting for memory, nothing more is admitted until it runs (the running requests finish and
        their adapters become evictable), so a stream of requests for hot adapters cannot starve a cold one."""
        admitted: list[RequestState] = []
        failed: list[tuple[RequestState, BaseException]] = []
        blocked: list[RequestState] = []  # waiting for device memory in this pass
        rows_free = self.settings.max_rows - sum(len(s.rows) for s in self.running)
        budget = self.settings.prefill_tokens_per_step
        with self.cond:
            queued = list(self.waiting)
        for seq in queued:
            if len(seq.rows) > rows_free or (admitted and seq.prompt_len > budget):
                break  # first come, first served: later requests do not overtake for rows or budget
            if any(b.overtaken >= self.settings.max_overtakes for b in blocked):
                break
            try:
                if not self.lm.adapters_ready(seq.adapters):
                    self.metrics.load_waits += 1
                    continue  # read on the loader's threads; later requests go ahead meanwhile
                placed = time.perf_counter()
                seq.lease = self.lm.acquire(seq.rows, read=False)
                self.metrics.place_seconds += time.perf_counter() - placed
            except AdapterNotReadyError:
                continue  # left host memory since it was read: read again
            except CapacityError:
                if self.running or admitted:
                    self.metrics.capacity_waits += 1
                    blocked.append(seq)
                    continue  # its adapters wait for memory held by running requests
                failed.append((seq, CapacityError("no device memory can be freed for the plan's adapters "
                                                  "(held by pinned adapters)")))
                self._unqueue(seq)
                continue
            except Exception as err:  # noqa: BLE001 - this request's adapter failed to load
                failed.append((seq, err))
                self._unqueue(seq)
                continue
            with self.cond:
                self.waiting.remove(seq)
                self._admitting.append(seq)
            admitted.append(seq)
            for b in blocked:
                b.overtaken += 1
            rows_free -= len(seq.rows)
            budget -= seq.prompt_len
        return admitted, failed

    def _unqueue(self, seq: RequestState) -> None:
        with self.cond:
            if seq in self.waiting:
                self.waiting.remove(seq)
        self.metrics.failed += 1

    def start_running(self, admitted: list[RequestState]) -> None:
        """The admitted requests were prefilled: they hold rows now."""
        with self.cond:
            self.running.extend(admitted)
            self._admitting = []

    def abandon(self, admitted: list[RequestState]) -> None:
        """The admitted requests' prefill failed: they hold leases but no rows."""
        with self.cond:
            self._admitting = []
        for s in admitted:
            s.release()

    def finish(self, gone: list[RequestState]) -> None:
        """These requests left the batch (finished, cancelled or failed): give back their slots."""
        if not gone:
            return
        leaving = {id(s) for s in gone}
        with self.cond:
            self.running = [s for s in self.running if id(s) not in leaving]
        for s in gone:
            s.release()

    def drain(self, include_waiting: bool) -> list[RequestState]:
        """Every running request (and the queue too, when shutting down), for the loop to end."""
        with self.cond:
            waiting = list(self.waiting) if include_waiting else []
            if include_waiting:
                self.waiting.clear()
            return list(self.running) + waiting
