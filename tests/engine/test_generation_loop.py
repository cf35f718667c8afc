"""The generation loop on the real SmolLM2 base with real PEFT adapters.

Every request run inside a changing batch must produce exactly what it produces alone (greedy, and
seeded sampling); cancelled and expired requests must give back their rows and adapter slots; a full
queue must refuse without touching anything else; the KV memory's column shifts must not change a token.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from hilora_core import RoutedLM, RoutingPlan
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.settings import LoopSettings
from hilora_core.errors import (
    CapacityError,
    InvalidInputError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    UnknownAdapterError,
)
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter

pytestmark = pytest.mark.slow  # the real base model (SmolLM2)

PROMPTS = [
    "Write a short poem about the sea.",
    "What is 17 plus 25?",
    "Name three colours.",
    "Translate 'good night' into French, please, and explain the phrase in one sentence.",
    "Hi",
    "List the days of the week.",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batching")
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None), dtype=torch.float32)
    paths = {
        "a": make_adapter(base, tmp / "a", seed=1, r=8, target_modules=["q_proj", "v_proj"]),
        "b": make_adapter(base, tmp / "b", seed=2, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "c": make_adapter(base, tmp / "c", seed=3, r=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    }
    del base
    engine = RoutedLM.from_pretrained(None, max_slots=4)
    for name, path in paths.items():
        engine.add_adapter(name, str(path))
    return engine


PLANS = [
    RoutingPlan.single("a"),
    RoutingPlan(adapters=("a", "b"), rocs=(3, 2)),  # HiLoRA-style: ROCs per adapter
    RoutingPlan(),  # the base model
    RoutingPlan(adapters=("b", "c"), ensemble=True, weights=(0.7, 0.3)),  # two rows, mixed distributions
    RoutingPlan.single("c"),
    RoutingPlan(adapters=("a", "c"), rocs=(2, 4)),
]


def chat_ids(lm: RoutedLM, text: str) -> list[int]:
    ids, mask = lm.encode([text], chat=True)
    return ids[0][mask[0].bool()].tolist()


def alone(lm: RoutedLM, text: str, plan: RoutingPlan, **kw) -> str:
    return lm.generate([text], [plan], chat=True, **kw)[0]


def collect(handle) -> str:
    return "".join(e.delta for e in handle.events(timeout=300))


def run_staggered(loop: GenerationLoop, reqs: list[SequenceRequest], gap_s: float = 0.05) -> list[str]:
    """Submit with small gaps, so requests join a batch that is already decoding."""
    handles = []
    for r in reqs:
        handles.append(loop.submit(r))
        time.sleep(gap_s)
    return [collect(h) for h in handles]


def test_a_changing_mixed_batch_gives_every_request_its_alone_output(lm):
    lengths = [24, 6, 16, 12, 20, 9]
    expected = [alone(lm, t, p, max_new_tokens=n) for t, p, n in zip(PROMPTS, PLANS, lengths, strict=True)]
    loop = GenerationLoop(lm, LoopSettings(max_rows=8, prefill_tokens_per_step=40))
    try:
        reqs = [SequenceRequest(chat_ids(lm, t), p, max_new_tokens=n)
                for t, p, n in zip(PROMPTS, PLANS, lengths, strict=True)]
        got = run_staggered(loop, reqs)
        assert got == expected
        stats = loop.stats()
        assert stats.finished == len(reqs) and stats.running == 0 and stats.rows == 0
        assert stats.steps < sum(lengths)  # requests shared steps
        assert lm.slots.stats()["in_use"] == 0
    finally:
        loop.close()


def test_seeded_sampling_and_stop_strings_match_the_request_alone(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=8))
    try:
        kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
        sampled = SequenceRequest(chat_ids(lm, PROMPTS[0]), PLANS[0], **kw)
        stop_text = alone(lm, PROMPTS[5], PLANS[4], max_new_tokens=20)
        stop = stop_text.split()[2] if len(stop_text.split()) > 2 else stop_text[:3]
        stopped = SequenceRequest(chat_ids(lm, PROMPTS[5]), PLANS[4], max_new_tokens=20, stop=(stop,))
        noise = [SequenceRequest(chat_ids(lm, t), p, max_new_tokens=10) for t, p in zip(PROMPTS[1:4], PLANS[1:4],
                                                                                          strict=True)]
        got = run_staggered(loop, [noise[0], sampled, noise[1], stopped, noise[2]], gap_s=0.02)
        assert got[1] == alone(lm, PROMPTS[0], PLANS[0], **kw)
        assert got[3] == alone(lm, PROMPTS[5], PLANS[4], max_new_tokens=20, stop=[stop])
        assert stop not in got[3]
    finally:
        loop.close()


def test_a_seeded_request_gives_its_alone_text_whichever_step_another_request_joins_at(lm):
    """The timing that exposed a seed's text changing in the served path: a second request joining the
    first at a different step changes the batch's shapes, so the first request's logits differ in their
    last bits. Its sampled text must not (temperature 1, where every token is a real draw)."""
    ids = chat_ids(lm, "Convert the number 7 into English words.")
    other = chat_ids(lm, PROMPTS[3])
    for seed, plan in ((5, PLANS[0]), (6, PLANS[1])):
        want = None
        for join_at in (None, 0, 1, 3):
            loop = GenerationLoop(lm, LoopSettings(max_rows=3), start=False)
            try:
                first = loop.submit(SequenceRequest(ids, plan, max_new_tokens=10, temperature=1.0, seed=seed))
                for step in range(14):
                    if step == join_at:
                        loop.submit(SequenceRequest(other, PLANS[5], max_new_tokens=10))
                    loop.step()
                got = collect(first)
            finally:
                loop.close()
            want = got if want is None else want
            assert got == want, (seed, join_at)


def test_cancel_frees_the_row_and_the_adapter_slots_within_a_step(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=4))
    try:
        long = loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[0]), PLANS[1], max_new_tokens=400,
                                              ignore_eos=True))
        events = long.events(timeout=120)
        next(events)  # it is decoding
        assert lm.slots.stats()["in_use"] == 2
        steps = loop.metrics.steps
        long.cancel()
        with pytest.raises(RequestCancelledError):
            list(events)
        assert loop.metrics.steps - steps <= 2
        assert loop.stats().rows == 0 and lm.slots.stats()["in_use"] == 0
        assert loop.metrics.cancelled == 1
        # the next request is served at once, and as if nothing happened
        t0 = time.perf_counter()
        nxt = collect(loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[2]), PLANS[0], max_new_tokens=8)))
        assert time.perf_counter() - t0 < 30
        assert nxt == alone(lm, PROMPTS[2], PLANS[0], max_new_tokens=8)
    finally:
        loop.close()


def test_a_full_queue_refuses_and_changes_nothing(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=1, max_waiting=1))
    try:
        first = loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[1]), PLANS[0], max_new_tokens=12))
        deadline = time.monotonic() + 60
        while loop.stats().running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[2]), PLANS[4], max_new_tokens=8))
        with pytest.raises(QueueFullError, match="max_waiting=1"):
            loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[3]), PLANS[0], max_new_tokens=8))
        assert loop.metrics.rejected == 1
        assert collect(first) == alone(lm, PROMPTS[1], PLANS[0], max_new_tokens=12)
        assert collect(second) == alone(lm, PROMPTS[2], PLANS[4], max_new_tokens=8)
    finally:
        loop.close()


def test_a_burst_into_free_rows_is_not_refused(lm):
    """Requests that free rows will take at the next step are not counted against the queue's bound:
    a burst of max_rows + max_waiting requests into an idle loop is accepted whole."""
    loop = GenerationLoop(lm, LoopSettings(max_rows=3, max_waiting=1))
    try:
        reqs = [SequenceRequest(chat_ids(lm, PROMPTS[i]), PLANS[0], max_new_tokens=4) for i in range(4)]
        with loop.scheduler.cond:  # hold the loop back so that the whole burst is queued before any admission
            handles = [loop.submit(r) for r in reqs]  # the lock is re-entrant
            assert loop.stats().waiting == 4
            with pytest.raises(QueueFullError, match="max_waiting=1"):  # one more than rows + queue
                loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[4]), PLANS[0], max_new_tokens=4))
        outs = [collect(h) for h in handles]
        assert outs == [alone(lm, PROMPTS[i], PLANS[0], max_new_tokens=4) for i in range(4)]
    finally:
        loop.close()


def test_a_failed_prefill_ends_its_requests_and_frees_their_slots(lm, monkeypatch):
    loop = GenerationLoop(lm, LoopSettings(max_rows=2, max_waiting=2))
    real = lm.forward
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected prefill failure")
        return real(*args, **kwargs)

    try:
        monkeypatch.setattr(lm, "forward", failing_once)
        handle = loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[0]), PLANS[1], max_new_tokens=4))
        with pytest.raises(RuntimeError, match="injected"):  # delivered, not left hanging
            list(handle.events(timeout=60))
        assert loop.stats().running == 0 and not loop.scheduler._admitting
        monkeypatch.setattr(lm, "forward", real)
        after = collect(loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[1]), PLANS[1], max_new_tokens=4)))
        assert after == alone(lm, PROMPTS[1], PLANS[1], max_new_tokens=4)
        assert loop.metrics.failed == 1
    finally:
        loop.close()


def test_plans_that_overflow_the_device_slots_wait_for_a_slot(lm):
    small = RoutedLM.from_pretrained(None, max_slots=2)
    for name in lm.adapters:
        small.add_adapter(name, lm.adapter_info(name)["location"])
    loop = GenerationLoop(small, LoopSettings(max_rows=8))
    try:
        # three requests needing {a, b}, {c}, {a}: together 3 adapters for 2 slots
        plans = [PLANS[1], PLANS[4], PLANS[0]]
        reqs = [SequenceRequest(chat_ids(small, PROMPTS[i]), p, max_new_tokens=10) for i, p in enumerate(plans)]
        got = [collect(h) for h in [loop.submit(r) for r in reqs]]
        assert got == [alone(lm, PROMPTS[i], p, max_new_tokens=10) for i, p in enumerate(plans)]
        assert small.slots.stats()["in_use"] == 0 and small.slots.stats()["evictions"] >= 1
        with pytest.raises(CapacityError, match="max_slots"):
            loop.submit(SequenceRequest(chat_ids(small, "x"), RoutingPlan(adapters=("a", "b", "c"),
                                                                           rocs=(1, 1, 1))))
    finally:
        loop.close()


def test_kv_column_shifts_do_not_change_tokens(lm):
    # 96 columns: a long prompt joining short running ones shifts right; running out of columns shifts left
    loop = GenerationLoop(lm, LoopSettings(max_rows=4, max_tokens_per_sequence=96))
    try:
        short = SequenceRequest(chat_ids(lm, "Hi"), PLANS[0], max_new_tokens=60, ignore_eos=True)
        longp = SequenceRequest(chat_ids(lm, PROMPTS[3]), PLANS[4], max_new_tokens=40, ignore_eos=True)
        late = SequenceRequest(chat_ids(lm, PROMPTS[1]), PLANS[3], max_new_tokens=30, ignore_eos=True)
        h1 = loop.submit(short)
        time.sleep(0.3)
        h2 = loop.submit(longp)
        time.sleep(0.6)
        h3 = loop.submit(late)
        got = [collect(h) for h in (h1, h2, h3)]
        kw = dict(ignore_eos=True)
        assert got == [alone(lm, "Hi", PLANS[0], max_new_tokens=60, **kw),
                       alone(lm, PROMPTS[3], PLANS[4], max_new_tokens=40, **kw),
                       alone(lm, PROMPTS[1], PLANS[3], max_new_tokens=30, **kw)]
        assert loop.runner.cache.column_capacity <= 96
    finally:
        loop.close()


def test_steady_traffic_reuses_kv_columns_instead_of_growing(lm):
    """A relay of requests that never lets the batch empty moves ``head`` far past the 256 columns first
    allocated, while no row needs more than ~100: the rows shift left into the free columns, the KV memory
    keeps its first size, and the tokens are the ones each request gets alone."""
    loop = GenerationLoop(lm, LoopSettings(max_rows=4, max_tokens_per_sequence=2048))
    try:
        first_bytes = loop.stats().kv_bytes
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(14)]
        plans = [PLANS[i % len(PLANS)] for i in range(14)]
        texts, prev = [], None
        for prompt, plan in zip(prompts, plans, strict=True):
            events = loop.submit(SequenceRequest(chat_ids(lm, prompt), plan, max_new_tokens=40,
                                                 ignore_eos=True)).events(timeout=300)
            head = [next(events).delta for _ in range(20)]  # it is decoding: the next one joins a busy batch
            if prev is not None:
                texts.append(prev[0] + "".join(e.delta for e in prev[1]))
            prev = ("".join(head), events)
        texts.append(prev[0] + "".join(e.delta for e in prev[1]))
        stats = loop.stats()
        assert stats.steps > 256 + 20 and stats.kv_shifts >= 1
        assert loop.runner.cache.column_capacity == 256 and stats.kv_bytes == first_bytes
        for i in (0, 7, 13):
            assert texts[i] == alone(lm, prompts[i], plans[i], max_new_tokens=40, ignore_eos=True), i
    finally:
        loop.close()


def test_logprobs_and_prompt_logprobs_come_from_the_routed_logits(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=4))
    try:
        plan = PLANS[1]
        ids = chat_ids(lm, PROMPTS[2])
        events = list(loop.submit(SequenceRequest(ids, plan, max_new_tokens=4, logprobs=3,
                                                     prompt_logprobs=True)).events(timeout=120))
        chosen = [t for e in events for t in (e.logprobs or [])]
        generated = events[-1].token_ids
        assert [t.token_id for t in chosen] == generated and len(chosen) == 4
        full = torch.tensor([ids + generated[:-1]])
        logp = torch.log_softmax(lm.logits(full, plans=[plan])[0].float(), dim=-1)  # (T, V)
        for j, t in enumerate(chosen):
            row = logp[len(ids) - 1 + j]
            assert abs(t.logprob - float(row[t.token_id])) < 1e-4
            assert [a for a, _ in t.top] == row.topk(3).indices.tolist()
        prompt = events[0].prompt_logprobs
        assert prompt[0] is None and len(prompt) == len(ids)
        for j in range(1, len(ids)):
            assert prompt[j].token_id == ids[j]
            assert abs(prompt[j].logprob - float(logp[j - 1, ids[j]])) < 1e-4
    finally:
        loop.close()


def test_requests_that_cannot_run_are_refused_at_submit(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=2, max_tokens_per_sequence=64))
    try:
        with pytest.raises(InvalidInputError, match="limit is 64"):
            loop.submit(SequenceRequest(list(range(10, 60)), PLANS[0], max_new_tokens=30))
        with pytest.raises(UnknownAdapterError):
            loop.submit(SequenceRequest([1, 2, 3], RoutingPlan.single("nope"), max_new_tokens=4))
        with pytest.raises(InvalidInputError, match="rows"):
            loop.submit(SequenceRequest([1, 2], RoutingPlan(adapters=("a", "b", "c"), ensemble=True),
                                           max_new_tokens=4))
        with pytest.raises(InvalidInputError, match="temperature"):
            loop.submit(SequenceRequest([1, 2], PLANS[0], temperature=-1, max_new_tokens=4))
        assert loop.stats().submitted == 0
    finally:
        loop.close()


def test_a_request_past_its_deadline_ends_with_a_timeout(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=2, request_timeout_s=0.5))
    try:
        h = loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[0]), PLANS[0], max_new_tokens=500,
                                           ignore_eos=True))
        with pytest.raises(RequestTimeoutError):
            list(h.events(timeout=120))
        assert loop.metrics.timed_out == 1 and lm.slots.stats()["in_use"] == 0
    finally:
        loop.close()


def test_many_threads_submitting_at_once(lm):
    loop = GenerationLoop(lm, LoopSettings(max_rows=6, max_waiting=32))
    try:
        jobs = [(PROMPTS[i % 6], PLANS[(i * 5) % 6]) for i in range(12)]
        out: list[str | None] = [None] * len(jobs)

        def worker(i: int) -> None:
            out[i] = collect(loop.submit(SequenceRequest(chat_ids(lm, jobs[i][0]), jobs[i][1],
                                                            max_new_tokens=6)))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert out == [alone(lm, t, p, max_new_tokens=6) for t, p in jobs]
        assert loop.stats().rows == 0
    finally:
        loop.close()


def test_the_loop_keeps_its_torch_threads_when_another_thread_sets_them(lm):
    """torch copies its process-wide thread count into a thread at that thread's first parallel op. A
    request thread that sets one thread before the loop's first step must not take the loop's threads
    (a replica's loop ran on one thread of two that way, 1.6x slower)."""
    previous = torch.get_num_threads()
    loop = GenerationLoop(lm, LoopSettings(max_rows=2), threads=2)
    try:
        assert loop.started.wait(30)
        torch.set_num_threads(1)  # what a request's helper thread does, after the loop set its count
        collect(loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[1]), RoutingPlan(), max_new_tokens=2)))
        deadline = time.monotonic() + 30
        while loop.stats().torch_threads == 0 and time.monotonic() < deadline:  # set after the step
            time.sleep(0.01)
        assert loop.stats().torch_threads == 2
    finally:
        loop.close()
        torch.set_num_threads(previous)


def test_rebuilt_routing_reuses_the_gathered_stacks_only_while_the_slots_hold_the_same_adapters(lm):
    """When rows leave and the adapters stay, the decode loop's new routing takes the old one's gathered
    stacks; once a slot is refilled (an adapter dropped and loaded again), it must gather afresh."""
    rows = [PLANS[0], PLANS[1]]  # adapters a and b
    lease = lm.acquire(rows)
    try:
        first = lm.build_routing(rows, lease.slots)
        first.layer_view(next(iter(lm.slots.layers.values())), adapting_only=True)  # gathered once
        fewer = lm.build_routing([PLANS[1]], lease.slots)  # a row left; a and b still active
        assert fewer.reuse_stacks(first) and fewer._layer_cache is first._layer_cache
        assert not lm.build_routing([PLANS[0]], lease.slots).reuse_stacks(first)  # b left the batch
    finally:
        lease.release()
    lm.slots.drop("b")  # b's slot is cleared; the next lease loads b again
    with lm.acquire(rows) as again:
        assert not lm.build_routing(rows, again.slots).reuse_stacks(first)


def test_the_decode_loop_reuses_stacks_as_rows_finish(lm):
    lengths = [3, 5, 7, 9]
    loop = GenerationLoop(lm, LoopSettings(max_rows=4))
    try:
        with loop.scheduler.cond:  # all four join at one step, then leave one by one with the adapters held by the rest
            handles = [loop.submit(SequenceRequest(chat_ids(lm, PROMPTS[i]), PLANS[1], max_new_tokens=n,
                                                      ignore_eos=True)) for i, n in enumerate(lengths)]
        outs = [collect(h) for h in handles]
        assert outs == [alone(lm, PROMPTS[i], PLANS[1], max_new_tokens=n, ignore_eos=True)
                        for i, n in enumerate(lengths)]
        stats = loop.stats()
        assert stats.routing_builds == 4 and stats.stack_reuses == 3
    finally:
        loop.close()
