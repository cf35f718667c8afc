"""Device adapter memory sized by rank and bounded by bytes (``hilora_core/engine/slots.py``), on a tiny Llama."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hilora_core import AdapterLoadError, PlanTooLargeError, RoutedLM, RoutingPlan
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.settings import LoopSettings
from hilora_core.engine.slots import LayerSlots
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter
from tests.family_models import make_family_model

N = 24  # more distinct adapters than the 16 slots of the former layout
RANKS = [4, 8, 16, 64]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    folder = make_family_model("llama", tmp / "base", tok)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
    paths = {f"a{i}": make_adapter(base, tmp / f"a{i}", seed=i, r=RANKS[i % 4], target_modules=targets[i % 2])
             for i in range(N)}
    return folder, paths, tok


def engine(pool, names=None, **settings) -> RoutedLM:
    folder, paths, _ = pool
    lm = RoutedLM.from_pretrained(folder, **settings)
    for name in names or paths:
        lm.add_adapter(name, str(paths[name]))
    return lm


def test_gather_reads_each_adapters_own_rows_zero_past_its_rank():
    layer = LayerSlots(6, 5, torch.device("cpu"), torch.float32, n_slots=2, n_rows=2)  # grows as adapters arrive
    factors = {s: (torch.randn(r, 6), torch.randn(5, r)) for s, r in ((0, 3), (1, 1), (2, 4))}
    for s, (a, b) in factors.items():
        layer.set_slot(s, a, b, 0.5) if s < layer.n_slots else (layer.grow_slots(4), layer.set_slot(s, a, b, 0.5))
    layer.clear(1)  # its row is reused by the next adapter
    a3, b3 = torch.randn(2, 6), torch.randn(5, 2)
    layer.set_slot(1, a3, b3, 2.0)
    a, bt = layer.gather(torch.tensor([2, 0, 1]), 4)
    for i, (want_a, want_b) in enumerate([factors[2], factors[0], (a3, b3)]):
        r = want_a.shape[0]
        assert torch.equal(a[i, :r], want_a) and torch.equal(bt[i, :r], want_b.T)
        assert not a[i, r:].any() and not bt[i, r:].any()
    assert layer.host_ranks[:3] == [3, 2, 4] and layer.a_rows.shape[0] - 1 >= 9


def test_layers_of_one_shape_share_one_row_pool():
    """Rows freed by one layer serve another layer of the same shape: the shared pool does not grow."""
    from hilora_core.engine.layer_rows import RowPool

    shared = RowPool(6, 5, torch.device("cpu"), torch.float32, n_rows=8)
    q, o = (LayerSlots(6, 5, torch.device("cpu"), torch.float32, n_slots=2, pool=shared) for _ in range(2))
    q.set_slot(0, torch.randn(8, 6), torch.randn(5, 8), 1.0)
    q.clear(0)
    a, b = torch.randn(8, 6), torch.randn(5, 8)
    o.set_slot(1, a, b, 1.0)
    assert shared.a_rows.shape[0] - 1 == 8 and q.a_rows is o.a_rows
    got_a, got_bt = o.gather(torch.tensor([1]), 8)
    assert torch.equal(got_a[0], a) and torch.equal(got_bt[0], b.T)
    assert not q.gather(torch.tensor([0]), 8)[0].any()


def test_row_pools_follow_the_budget_not_each_layers_peak(pool):
    """Adapters of different target sets (q/v only, every projection) take turns under a budget of two: the rows
    allocated stay within the pools' growth slack of the budget, whatever each layer held at its own peak."""
    lm = engine(pool)
    names = ["a2", "a1", "a6", "a5", "a10", "a9", "a14", "a13"]  # alternately rank 16 on q/v, rank 8 on all
    budget = lm.adapter_bytes("a1") + lm.adapter_bytes("a2")  # one of each: every new one evicts
    lm.close()
    lm = engine(pool, names, adapter_memory_bytes=budget)
    for _ in range(3):
        for n in names:
            lm.logits(torch.tensor([[5, 6, 7]]), plans=[RoutingPlan.single(n)])
    shapes = {(layer.d_in, layer.d_out) for layer in lm.slots.layers.values()}
    pools = lm.slots._pools
    assert set(pools) == shapes and len(pools) < len(lm.slots.layers)
    first = sum(64 * (d_in + d_out) * 4 for d_in, d_out in shapes)  # each pool's first 64 rows
    rows = sum(p.nbytes() for p in pools.values())
    assert rows <= 1.5 * budget + first, (rows, budget, first)
    assert lm.slots.stats()["evictions"] > 0
    lm.close()


def test_a_batch_holds_more_than_16_distinct_adapters_and_each_gives_its_alone_output(pool):
    _, _, tok = pool
    lm = engine(pool)
    prompts = [f"Request number {i} asks about topic {i * 7}" for i in range(N)]
    expected = [lm.generate([p], plans=[RoutingPlan.single(f"a{i}")], max_new_tokens=4, ignore_eos=True)[0]
                for i, p in enumerate(prompts)]
    loop = GenerationLoop(lm, LoopSettings(max_rows=N), start=False)
    try:
        handles = [loop.submit(SequenceRequest(tok(p).input_ids, RoutingPlan.single(f"a{i}"), max_new_tokens=4,
                                               ignore_eos=True)) for i, p in enumerate(prompts)]
        while not loop.step():  # until their adapters are read (on the loader's threads) and admitted
            time.sleep(0.001)
        assert lm.slots.stats()["in_use"] == N  # all 24 resident and running in one batch
        while loop.busy:
            loop.step()
        assert ["".join(e.delta for e in h.events(timeout=30)) for h in handles] == expected
    finally:
        loop.close()
        lm.close()


def test_memory_is_the_adapters_own_rank_rows_and_idle_ones_leave_in_lru_order(pool):
    lm = engine(pool)
    sizes = {n: lm.adapter_bytes(n) for n in lm.adapters}
    a0 = lm._source("a0")  # rank 4 on q/v (a3: rank 64 on every projection)
    assert sizes["a0"] == sum(r * (i + o) for r, i, o in a0.modules.values()) * 4
    assert sizes["a3"] > 16 * sizes["a0"]
    lm.close()
    budget = sizes["a0"] + sizes["a1"] + sizes["a2"] + sizes["a4"]  # four small adapters fit, a3 never does
    lm = engine(pool, ["a0", "a1", "a2", "a4", "a5"], adapter_memory_bytes=budget)
    for n in ("a0", "a1", "a2", "a4"):
        lm.logits(torch.tensor([[5, 6, 7]]), plans=[RoutingPlan.single(n)])
    stats = lm.slots.stats()
    assert stats["size"] == 4 and stats["bytes"] == budget and stats["evictions"] == 0
    lm.logits(torch.tensor([[5, 6, 7]]), plans=[RoutingPlan.single("a5")])  # evicts the LRU ones it needs
    order = lm.slots.lru_order()
    assert order[-1] == "a5" and "a0" not in order and lm.slots.stats()["bytes"] <= budget
    with pytest.raises(PlanTooLargeError, match="adapter_memory_bytes"):  # HTTP 422: it can never fit
        lm.generate(["x"], plans=[RoutingPlan(adapters=("a0", "a1", "a2", "a5"))], max_new_tokens=1)
    lease = lm.acquire([RoutingPlan.single("a1")])  # in use: never evicted
    try:
        lm.logits(torch.tensor([[5, 6]]), plans=[RoutingPlan(adapters=("a0", "a2", "a4"))])
        assert "a1" in lm.slots.lru_order()
    finally:
        lease.release()
    lm.close()


def test_an_adapter_larger_than_the_budget_is_refused_at_registration(pool):
    folder, paths, _ = pool
    lm = RoutedLM.from_pretrained(folder, adapter_memory_bytes=50_000)
    lm.add_adapter("small", str(paths["a0"]))
    with pytest.raises(AdapterLoadError, match="adapter_memory_bytes"):
        lm.add_adapter("big", str(paths["a3"]))
    assert lm.adapters == ["small"]
    lm.close()


def test_a_slow_read_never_stalls_the_running_rows(pool):
    """An adapter read that takes 1.5 s happens on the loader's threads: the running request keeps decoding
    (no gap between its tokens near 1.5 s) and the cold request runs once its adapter is in."""
    _, _, tok = pool
    lm = engine(pool, ["a0", "a4"])
    lm.generate(["warm"], plans=[RoutingPlan.single("a0")], max_new_tokens=1)
    read = lm.host_cache._loader

    def slow_read(source):
        time.sleep(1.5)
        return read(source)

    lm.host_cache._loader = slow_read
    loop = GenerationLoop(lm, LoopSettings(max_rows=4))
    try:
        hot = loop.submit(SequenceRequest(tok("a long running request").input_ids, RoutingPlan.single("a0"),
                                          max_new_tokens=120, ignore_eos=True))
        time.sleep(0.05)
        t0 = time.monotonic()
        cold = loop.submit(SequenceRequest(tok("cold").input_ids, RoutingPlan.single("a4"), max_new_tokens=3,
                                           ignore_eos=True))
        assert time.monotonic() - t0 < 0.5  # submit does not read
        stamps = []
        for _ in hot.events(timeout=60):
            stamps.append(time.monotonic())
        cold_text = "".join(e.delta for e in cold.events(timeout=60))
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        assert max(gaps) < 0.75 and loop.stats().load_waits > 0
        assert lm.loader.loads == 2 and lm.loader.latency.sum >= 1.5  # the warm-up read a0, then a4
    finally:
        loop.close()
    lm.host_cache._loader = read
    assert cold_text == lm.generate(["cold"], plans=[RoutingPlan.single("a4")], max_new_tokens=3, ignore_eos=True)[0]
    lm.close()


@pytest.mark.parametrize("max_overtakes,starved", [(3, False), (10_000, True)])
def test_a_cold_adapter_is_not_starved_by_a_stream_of_hot_ones(pool, max_overtakes, starved):
    """Memory for two adapters, both held by a steady stream of requests; a request for a third waits for
    memory. With ``max_overtakes`` admission stops after that many overtakes, until it runs."""
    _, _, tok = pool
    lm = engine(pool, ["a0", "a4", "a8"])
    budget = 2 * lm.adapter_bytes("a0")  # room for two: a0, a4 and a8 are all rank 4 on q/v
    assert lm.adapter_bytes("a4") == lm.adapter_bytes("a8") == lm.adapter_bytes("a0")
    lm.close()
    lm = engine(pool, ["a0", "a4", "a8"], adapter_memory_bytes=budget)
    for n in ("a0", "a4", "a8"):
        lm.generate(["warm"], plans=[RoutingPlan.single(n)], max_new_tokens=1)  # all in host memory
    loop = GenerationLoop(lm, LoopSettings(max_rows=6, max_overtakes=max_overtakes), start=False)

    def hot(i):
        return SequenceRequest(tok(f"hot {i}").input_ids, RoutingPlan.single(("a0", "a4")[i % 2]), max_new_tokens=6,
                               ignore_eos=True)

    try:
        loop.submit(hot(0))
        loop.submit(hot(1))
        loop.step()
        loop.submit(SequenceRequest(tok("cold").input_ids, RoutingPlan.single("a8"), max_new_tokens=2,
                                    ignore_eos=True))
        ran_at = None
        for step in range(60):  # a new hot request every step
            loop.submit(hot(step + 2), bounded=False)
            loop.step()
            if ran_at is None and "a8" in lm.slots.lru_order():  # resident: admitted
                ran_at = step
        assert (ran_at is None) == starved, ran_at
        if not starved:
            assert ran_at < 20 and loop.stats().capacity_waits > 0
    finally:
        loop.close()
    lm.close()


def test_per_adapter_usage_is_counted_and_its_labels_bounded(pool):
    from deployments.metrics import ServiceMetrics
    from hilora_core.engine.usage import OTHER

    lm = engine(pool, ["a0", "a1", "a4"])
    for name, times in (("a0", 3), ("a1", 1), ("a4", 2)):
        for _ in range(times):
            lm.generate(["x y"], plans=[RoutingPlan.single(name)], max_new_tokens=2, ignore_eos=True)
    top = lm.usage.top(2, lm.residency())
    assert list(top) == ["a0", "a4", OTHER]
    assert top["a0"]["requests"] == 3 and top["a0"]["tokens"] == 6 and top["a0"]["reads"] == 1
    assert top["a0"]["placements"] == 1 and top["a0"]["resident_device"] == 1 and top[OTHER]["requests"] == 1
    metrics = ServiceMetrics()
    metrics.observe_adapters("r1", top)
    metrics.observe_adapters("r1", lm.usage.top(1))  # the set shrinks: stale series leave
    text = metrics.render().decode()
    assert 'adapter="a0"' in text and 'adapter="a4"' not in text and f'adapter="{OTHER}"' in text
    lm.remove_adapter("a0")
    assert "a0" not in lm.usage.top(5)
    lm.close()


def test_a_replica_silent_for_two_minutes_leaves_the_metrics():
    """A restarted replica's last counters must not stay in sums over replicas: silent for REPLICA_STALE_S
    while another reports, its series are removed; the live one's stay."""
    from deployments.contracts import ReplicaStats
    from deployments.metrics import REPLICA_STALE_S, ServiceMetrics

    metrics = ServiceMetrics()
    stats = {"device": {"hits": 3, "size": 2}, "host": {"bytes": 100}}
    metrics.observe_replica(ReplicaStats(replica="old", cache=stats, adapters={"a0": {"requests": 1}}), now=0.0)
    metrics.observe_replica(ReplicaStats(replica="new", cache=stats), now=REPLICA_STALE_S / 2)
    text = metrics.render().decode()
    assert 'replica="old"' in text and 'replica="new"' in text
    metrics.observe_replica(ReplicaStats(replica="new", cache=stats), now=REPLICA_STALE_S + 1)
    text = metrics.render().decode()
    assert 'replica="old"' not in text and 'event="bytes",replica="new",tier="host"' in text
