"""Continuous batching: one generation loop per engine; requests join between decode steps and leave when done.

    batcher = ContinuousBatcher(lm, BatchingSettings(max_rows=32))
    handle = batcher.submit(SequenceRequest(prompt_ids, plan, max_new_tokens=64))
    for event in handle.events():        # StreamEvent deltas; the last one has finished=True
        ...
    handle.cancel()                      # or: leaves the batch at the next step, its memory reused

Each step of the loop (a background thread):
1. drop requests that were cancelled or ran past their deadline (their rows and adapter slots are freed);
2. admit waiting requests, first come first served, while rows are free and the step's prefill budget
   (``prefill_tokens_per_step`` prompt tokens, at least one request) lasts; a request whose adapters
   cannot get a device slot now (all held by running requests) waits;
3. prefill the admitted requests in one forward pass, straight into the KV memory
   (:class:`SlotKVCache`), and choose their first tokens;
4. one decode step for every running row.

Every row keeps its own :class:`RoutingPlan`: the batch's routing metadata is rebuilt whenever the
set of rows changes, so a request's tokens are the ones it gets when run alone. Ensemble plans take
one row per adapter, and their next-token distributions are mixed (:mod:`hilora_core.engine.ensemble`).
Each request samples with its own seeded generator, so a seeded request gives the same text whatever
it is batched with. Memory is bounded: ``max_rows`` rows of ``max_tokens_per_sequence`` tokens, and at
most ``max_waiting`` requests queued beyond what the free rows take (more get :class:`QueueFullError`).
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hilora_core.engine.ensemble import expand_ensembles, mix_logits
from hilora_core.engine.generation import (
    SequenceProgress,
    StreamEvent,
    TextTracker,
    TokenLogprob,
    check_sampling,
    choose_tokens,
    logprob_entries,
)
from hilora_core.engine.kv_slots import SlotKVCache
from hilora_core.engine.settings import LoopSettings as BatchingSettings
from hilora_core.engine.threads import use_torch_threads
from hilora_core.errors import (
    CapacityError,
    InvalidInputError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    UnsupportedModelError,
)
from hilora_core.plan import RoutingPlan

if TYPE_CHECKING:
    from hilora_core.engine.routed_linear import BatchRouting
    from hilora_core.engine.routed_lm import RoutedLM
    from hilora_core.engine.slots import SlotLease

MAX_TOP_LOGPROBS = 20


@dataclass
class SequenceRequest:
    """One request for the loop.

    Attributes:
        prompt_ids: the prompt's token ids (chat template already applied).
        plan: its routing plan (default: the base model).
        max_new_tokens, temperature, top_p, seed, stop: as in :meth:`RoutedLM.stream`, per request.
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
    without one they are queued for :meth:`events`."""

    def __init__(self, batcher: ContinuousBatcher, sink: Callable[[Item], None] | None) -> None:
        self._batcher = batcher
        self._queue: queue.Queue | None = None if sink is not None else queue.Queue()
        self._sink = sink if sink is not None else self._queue.put
        self.cancelled = False
        self.finished = False

    def cancel(self) -> None:
        """Leave the batch at the next step (a no-op once finished)."""
        if not self.finished:
            self.cancelled = True
            self._batcher._wake()

    def _emit(self, item: Item) -> None:
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


class Histogram:
    """Cumulative-bucket histogram (Prometheus style), ``snapshot()`` as plain numbers."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        cumulative, total = [], 0
        for c in self.counts[:-1]:
            total += c
            cumulative.append(total)
        return {"buckets": list(self.buckets), "cumulative": cumulative, "sum": self.sum, "count": self.count}


@dataclass
class LoopMetrics:
    """What the loop has done: counters since start, and the current queue and batch."""

    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    timed_out: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    torch_threads: int = 0  # the torch CPU threads the loop thread ran its last step with
    routing_builds: int = 0  # decode routings built (each time the running rows changed)
    stack_reuses: int = 0  # of those, how many reused the previous one's gathered adapter stacks
    ttft: Histogram = field(default_factory=lambda: Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)))
    itl: Histogram = field(default_factory=lambda: Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)))


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """(n,) float32 on ``device``. On CUDA the copy goes through pinned memory without blocking, so it
    does not wait for the forward pass already queued (a plain host-to-device copy would)."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass(eq=False)
class _Seq:
    req: SequenceRequest
    handle: SequenceHandle
    rows: list[RoutingPlan]  # the plans the model runs for this request (ensembles: one per adapter)
    weights: list[float]  # mixing weight of each row
    progress: SequenceProgress
    generator: torch.Generator | None
    submitted: float
    deadline: float | None
    lease: SlotLease | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    start: int = 0  # first KV column of the prompt
    last_token: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    pending: list[TokenLogprob] = field(default_factory=list)
    prompt_lp: list[TokenLogprob | None] | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)


class ContinuousBatcher:
    """The generation loop of one :class:`RoutedLM` (see the module docstring).

    Args:
        lm: the engine (its forward passes, adapter slots and tokenizer).
        settings: the loop's bounds.
        start: run the loop in a background thread now (tests may drive :meth:`step` themselves).
    """

    def __init__(self, lm: RoutedLM, settings: BatchingSettings | None = None, start: bool = True,
                 threads: int | None = None) -> None:
        self.lm = lm
        self.settings = settings or BatchingSettings()
        # the loop thread pins its own torch thread count (None: the creator's), see engine/threads.py
        self.threads = threads or torch.get_num_threads()
        impl = getattr(lm.model.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise UnsupportedModelError(f"continuous batching needs 'sdpa' or 'eager' attention, got {impl!r}")
        self._mask_kind = "bool" if impl == "sdpa" else "additive"
        self.cache = SlotKVCache.for_model(lm.model.config, self.settings.max_rows,
                                           self.settings.max_tokens_per_sequence, lm.device, lm.dtype)
        self.metrics = LoopMetrics()
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # in admission order
        self._admitting: list[_Seq] = []  # admitted this step, rows not yet prefilled
        self._row_seq: list[_Seq] = []  # the request of each KV row
        self._row_member: list[int] = []  # which of its request's rows (index into _Seq.rows)
        self._routing: tuple[BatchRouting, torch.Tensor | None] | None = None  # rebuilt when the rows change
        self._last_routing: BatchRouting | None = None  # its gathered adapter stacks serve the rebuilt one
        self._stopping = False
        self.started = threading.Event()  # set once the loop thread has set its torch threads
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="hilora-batcher", daemon=True)
            self._thread.start()

    # ---- the caller's side -----------------------------------------------------------------------
    def submit(self, req: SequenceRequest, sink: Callable[[Item], None] | None = None) -> SequenceHandle:
        """Queue a request. Errors in the request itself are raised here (:class:`InvalidInputError`,
        :class:`UnknownAdapterError`, :class:`AdapterLoadError`, :class:`CapacityError`); a full queue
        raises :class:`QueueFullError`. The adapters' files are read here, in the caller's thread."""
        s = self.settings
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
        if len(names) > self.lm.settings.max_slots:
            raise CapacityError(f"the plan needs {len(names)} adapters at once; the replica has "
                                f"{self.lm.settings.max_slots} device slots (max_slots)")
        ranks = self.lm.adapter_ranks(names)  # UnknownAdapterError for unregistered names
        self.lm.load_to_host(req.plan)
        weights = [1.0] if batch.matrix is None else [float(w) for w in batch.matrix[0].tolist()]
        generator = None
        if req.temperature > 0:
            generator = torch.Generator(device=self.lm.device)
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(int(seed))
        eos = frozenset() if req.ignore_eos else frozenset(self.lm.eos_ids)
        progress = SequenceProgress(TextTracker(self.lm.tokenizer, tuple(req.stop)), req.max_new_tokens, eos)
        now = time.monotonic()
        deadline = None if s.request_timeout_s is None else now + s.request_timeout_s
        handle = SequenceHandle(self, sink)
        seq = _Seq(req, handle, list(batch.rows), weights, progress, generator, now, deadline, ranks=ranks)
        with self._cond:
            if self._stopping:
                raise CapacityError("the generation loop is shut down")
            blocked, free = self._waiting_for_rows()
            if blocked >= s.max_waiting and not (blocked == 0 and len(seq.rows) <= free):
                self.metrics.rejected += 1
                raise QueueFullError(f"{blocked} requests are waiting for a row, the queue's limit "
                                     f"(max_waiting={s.max_waiting}); retry shortly")
            self._waiting.append(seq)
            self.metrics.submitted += 1
            self._cond.notify()
        return handle

    def _waiting_for_rows(self) -> tuple[int, int]:
        """(queued requests that the free rows will not take at the next step, rows left free after the
        others are taken), first come first served; the caller holds the lock. Only the former count
        against ``max_waiting``: a burst into free rows is not refused."""
        taken = sum(len(x.rows) for x in self._running) + sum(len(x.rows) for x in self._admitting)
        free = self.settings.max_rows - taken
        blocked = 0
        for x in self._waiting:
            if blocked == 0 and len(x.rows) <= free:
                free -= len(x.rows)
            else:
                blocked += 1
        return blocked, max(free, 0)

    def stats(self) -> dict:
        """Queue and batch now, counters since start, KV memory in use, latency histograms."""
        m = self.metrics
        with self._cond:
            waiting, running, rows = len(self._waiting), len(self._running), len(self._row_seq)
        return {"waiting": waiting, "running": running, "rows": rows, "max_rows": self.settings.max_rows,
                "submitted": m.submitted, "finished": m.finished, "cancelled": m.cancelled,
                "rejected": m.rejected, "timed_out": m.timed_out, "failed": m.failed,
                "prompt_tokens": m.prompt_tokens, "generated_tokens": m.generated_tokens, "steps": m.steps,
                "torch_threads": m.torch_threads, "routing_builds": m.routing_builds,
                "stack_reuses": m.stack_reuses,
                "kv_bytes": self.cache.nbytes(), "ttft_s": m.ttft.snapshot(), "itl_s": m.itl.snapshot()}

    def close(self) -> None:
        """Stop the loop; waiting and running requests end with :class:`RequestCancelledError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._fail_all(RequestCancelledError("the generation loop was shut down"), include_waiting=True)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        use_torch_threads(self.threads)  # this thread's count, kept whatever other threads set later
        self.started.set()
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - an engine failure ends the running requests, not the loop
                self._fail_all(err)
            self.metrics.torch_threads = torch.get_num_threads()

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._waiting or self._running)

    def step(self) -> None:
        """One iteration: drop cancelled and expired requests, admit and prefill, decode one token."""
        self._reap()
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as err:
                self._abandon(admitted, err)
                raise
        if self._running:
            self._decode()
        self.metrics.steps += 1

    def _reap(self) -> None:
        now = time.monotonic()

        def expired(s: _Seq) -> bool:
            return s.deadline is not None and now > s.deadline

        with self._cond:
            dropped = [s for s in self._waiting if s.handle.cancelled or expired(s)]
            for s in dropped:
                self._waiting.remove(s)
        dropped += [s for s in self._running if s.handle.cancelled or expired(s)]
        for s in dropped:
            if s.handle.cancelled:
                self.metrics.cancelled += 1
                s.handle._emit(RequestCancelledError("the request was cancelled"))
            else:
                self.metrics.timed_out += 1
                s.handle._emit(RequestTimeoutError(
                    f"the request ran longer than request_timeout_s={self.settings.request_timeout_s}"))
        self._retire([s for s in dropped if s.lease is not None])

    def _admit(self) -> list[_Seq]:
        rows_free = self.settings.max_rows - len(self._row_seq)
        budget = self.settings.prefill_tokens_per_step
        with self._cond:
            queued = list(self._waiting)
        admitted: list[_Seq] = []
        for seq in queued:
            if len(seq.rows) > rows_free or (admitted and seq.prompt_len > budget):
                break  # first come, first served: later requests do not overtake for rows or budget
            try:
                seq.lease = self.lm.acquire(seq.rows)
            except CapacityError:
                if self._running or admitted:
                    continue  # its adapters wait for slots held by running requests
                self._drop_waiting(seq, CapacityError("no device slot can be freed for the plan's adapters "
                                                      "(slots are pinned)"))
                continue
            except Exception as err:  # noqa: BLE001 - this request's adapter failed to load
                self._drop_waiting(seq, err)
                continue
            with self._cond:
                self._waiting.remove(seq)
                self._admitting.append(seq)
            admitted.append(seq)
            rows_free -= len(seq.rows)
            budget -= seq.prompt_len
        return admitted

    def _abandon(self, admitted: list[_Seq], err: BaseException) -> None:
        """End requests whose prefill failed: they hold leases but no rows yet."""
        with self._cond:
            self._admitting = []
        running = {id(r) for r in self._running}
        for s in admitted:
            if id(s) in running:
                continue  # the caller's _fail_all ends these
            self.metrics.failed += 1
            s.handle._emit(err)
            if s.lease is not None:
                s.lease.release()
                s.lease = None

    def _drop_waiting(self, seq: _Seq, err: BaseException) -> None:
        with self._cond:
            if seq in self._waiting:
                self._waiting.remove(seq)
        self.metrics.failed += 1
        seq.handle._emit(err)

    # ---- forward passes ------------------------------------------------------------------------------
    def _slot_map(self, seqs: Sequence[_Seq]) -> tuple[dict[str, int], dict[str, int]]:
        slots: dict[str, int] = {}
        ranks: dict[str, int] = {}
        for s in seqs:
            slots.update(s.lease.slots)
            ranks.update(s.ranks)
        return slots, ranks

    @staticmethod
    def _mixing(seqs: Sequence[_Seq], row_seq: Sequence[_Seq], row_member: Sequence[int],
                device) -> torch.Tensor | None:
        """(n_seq, R) weights of each request's rows, or None when every request has one row in order."""
        if len(row_seq) == len(seqs) and all(a is b for a, b in zip(row_seq, seqs, strict=True)):
            return None
        index = {id(s): i for i, s in enumerate(seqs)}
        matrix = torch.zeros((len(seqs), len(row_seq)), dtype=torch.float32)
        for r, (s, k) in enumerate(zip(row_seq, row_member, strict=True)):
            matrix[index[id(s)], r] = s.weights[k]
        return matrix.to(device)

    def _prefill(self, new: list[_Seq]) -> None:
        cache, lm = self.cache, self.lm
        n_old = len(self._row_seq)
        rows = [(s, k) for s in new for k in range(len(s.rows))]
        width = max(s.prompt_len for s in new)
        if n_old == 0:
            cache.reserve(len(rows), width + 1)
            cache.head = cache.low = width
        elif cache.head < width:
            self._shift(width - cache.head)
        cache.reserve(n_old + len(rows), cache.head + 1)
        head = cache.head
        pad = lm.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        starts = []
        for r, (s, _) in enumerate(rows):
            p = s.prompt_len
            ids[r, width - p:] = torch.as_tensor(list(s.req.prompt_ids), dtype=torch.long)
            positions[r, width - p:] = torch.arange(p)
            starts.append(head - p)
        cache.window((n_old, n_old + len(rows)), write=head - width, read=head - width)
        mask = cache.attention_mask(starts, width, self._mask_kind)
        slots, ranks = self._slot_map(new)
        routing = lm.build_routing([s.rows[k] for s, k in rows], slots, ranks)
        want_prompt = any(s.req.prompt_logprobs for s in new)
        logits = lm.forward(routing, input_ids=ids.to(lm.device), attention_mask=mask,
                            position_ids=positions.to(lm.device), past_key_values=cache, use_cache=True,
                            logits_to_keep=0 if want_prompt else 1)
        matrix = self._mixing(new, [s for s, _ in rows], [k for _, k in rows], lm.device)
        if want_prompt:
            self._prompt_logprobs(new, logits, matrix, width)
        scores = mix_logits(logits[:, -1], matrix)
        for s in new:
            s.start = head - s.prompt_len
            self.metrics.prompt_tokens += s.prompt_len
        for s, k in rows:
            self._row_seq.append(s)
            self._row_member.append(k)
        with self._cond:
            self._running.extend(new)
            self._admitting = []
        cache.low = min(s.start for s in self._running)
        self._routing = None
        self._advance(new, scores)

    def _decode(self) -> None:
        cache, lm = self.cache, self.lm
        n = len(self._row_seq)
        if cache.head + 1 > cache.column_capacity:
            if cache.column_capacity < cache.max_columns:
                cache.reserve(n, cache.head + 1)
            else:
                self._shift(-cache.low)
        head = cache.head
        ids = torch.tensor([[s.last_token] for s in self._row_seq], dtype=torch.long, device=lm.device)
        positions = torch.tensor([[head - s.start] for s in self._row_seq], dtype=torch.long, device=lm.device)
        cache.window((0, n), write=head, read=cache.low)
        mask = cache.attention_mask([s.start for s in self._row_seq], 1, self._mask_kind)
        if self._routing is None:
            slots, ranks = self._slot_map(self._running)
            plans = [s.rows[k] for s, k in zip(self._row_seq, self._row_member, strict=True)]
            routing = lm.build_routing(plans, slots, ranks)
            self.metrics.routing_builds += 1
            if routing.reuse_stacks(self._last_routing):
                self.metrics.stack_reuses += 1
            self._last_routing = routing
            self._routing = (routing, self._mixing(self._running, self._row_seq, self._row_member, lm.device))
        routing, matrix = self._routing
        logits = lm.forward(routing, input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)[:, -1]
        cache.head += 1
        self._advance(list(self._running), mix_logits(logits, matrix))

    def _shift(self, by: int) -> None:
        self.cache.shift(len(self._row_seq), by)
        for s in self._running:
            s.start += by

    # ---- tokens -------------------------------------------------------------------------------------
    def _advance(self, seqs: list[_Seq], scores: torch.Tensor) -> None:
        """Choose each request's next token from its (V,) scores row, emit text, retire finished ones."""
        tokens = self._choose(seqs, scores).tolist()  # one read-back of all the step's tokens
        want = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        if want:
            logp = torch.log_softmax(scores[want].float(), dim=-1)
            entries = logprob_entries(logp, [tokens[i] for i in want], [seqs[i].req.logprobs for i in want])
            for i, entry in zip(want, entries, strict=True):
                seqs[i].pending.append(entry)
        now = time.monotonic()
        done = []
        for s, tok in zip(seqs, tokens, strict=True):
            if s.first_token_at is None:
                s.first_token_at = now
                self.metrics.ttft.observe(now - s.submitted)
            else:
                self.metrics.itl.observe(now - s.last_token_at)
            s.last_token_at = now
            s.last_token = tok
            self.metrics.generated_tokens += 1
            delta, reason = s.progress.accept(tok)
            ids = s.progress.tracker.token_ids
            logprobs = None
            if s.req.logprobs is not None and (delta or reason is not None):
                logprobs, s.pending = s.pending, []
            prompt_lp, s.prompt_lp = s.prompt_lp, None
            if reason is not None:
                s.handle._emit(StreamEvent(0, delta, True, reason, len(ids), s.prompt_len, list(ids), logprobs,
                                           prompt_lp))
                self.metrics.finished += 1
                done.append(s)
            elif delta or prompt_lp is not None:
                s.handle._emit(StreamEvent(0, delta, False, None, len(ids), s.prompt_len, None, logprobs, prompt_lp))
        self._retire(done)

    @staticmethod
    def _choose(seqs: list[_Seq], scores: torch.Tensor) -> torch.Tensor:
        """(B,) next tokens of ``seqs`` from their (B, V) scores, in one batched pass. A sampling row draws
        its uniform from its own request's generator, so its text does not depend on its batch."""
        if not any(s.req.temperature > 0 for s in seqs):
            return choose_tokens(scores, None, None, None)
        dev = scores.device
        zero = torch.zeros((1,), device=dev)
        uniforms = torch.cat([torch.rand((1,), generator=s.generator, device=dev) if s.generator is not None
                              else zero for s in seqs])
        temperature = _to_device([s.req.temperature for s in seqs], dev)
        nucleus = any(s.req.top_p < 1.0 and s.req.temperature > 0 for s in seqs)
        top_p = _to_device([s.req.top_p for s in seqs], dev) if nucleus else None
        return choose_tokens(scores, temperature, top_p, uniforms)

    def _prompt_logprobs(self, new: list[_Seq], logits: torch.Tensor, matrix: torch.Tensor | None,
                         width: int) -> None:
        """Each prompt token's logprob given the tokens before it (``echo``); the first has none."""
        scores = mix_logits(logits, matrix)  # (n_seq, width, V)
        for i, s in enumerate(new):
            if not s.req.prompt_logprobs:
                continue
            p = s.prompt_len
            logp = torch.log_softmax(scores[i, width - p: width - 1].float(), dim=-1)  # predicts tokens 1..p-1
            ids = list(s.req.prompt_ids)
            s.prompt_lp = [None] + logprob_entries(logp, ids[1:p], [s.req.logprobs or 0] * (p - 1))

    # ---- leaving the batch ----------------------------------------------------------------------------
    def _retire(self, gone: list[_Seq]) -> None:
        """Free the rows and adapter slots of finished, cancelled or failed requests (rows from the end of
        the batch move into the holes, so the running rows stay contiguous)."""
        if not gone:
            return
        leaving = {id(s) for s in gone}
        keep = len(self._row_seq) - sum(1 for s in self._row_seq if id(s) in leaving)
        holes = [r for r in range(keep) if id(self._row_seq[r]) in leaving]
        movers = [r for r in range(keep, len(self._row_seq)) if id(self._row_seq[r]) not in leaving]
        for hole, mover in zip(holes, movers, strict=True):
            self.cache.move_row(mover, hole, self._row_seq[mover].start)
            self._row_seq[hole], self._row_member[hole] = self._row_seq[mover], self._row_member[mover]
        del self._row_seq[keep:], self._row_member[keep:]
        with self._cond:
            self._running = [s for s in self._running if id(s) not in leaving]
        for s in gone:
            if s.lease is not None:
                s.lease.release()
                s.lease = None
        if self._running:
            self.cache.low = min(s.start for s in self._running)
        else:
            self.cache.head = self.cache.low = 0
            self._last_routing = None
        self._routing = None

    def _fail_all(self, err: BaseException, include_waiting: bool = False) -> None:
        """End every running request (and the queue, when shutting down) with ``err``."""
        with self._cond:
            waiting = list(self._waiting) if include_waiting else []
            if include_waiting:
                self._waiting.clear()
        running = list(self._running)
        for s in running + waiting:
            self.metrics.failed += 1
            s.handle._emit(err)
        self._retire(running)
