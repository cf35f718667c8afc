"""Adapter tiers and adapter validation, on a tiny random Llama (fast): LRU, pinning, in-use
protection, concurrent loads, capacity errors, and refused adapters that leave the engine serving."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hilora_core import AdapterLoadError, CapacityError, RoutedLM, RoutingPlan, UnsupportedModelError
from hilora_core.engine import HostAdapterCache, inspect_adapter, load_adapter
from hilora_core.engine.adapter_loader import AdapterLoader
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter, make_tiny_llama, rel_err

N_ADAPTERS = 5
IDS = torch.tensor([[5, 17, 42, 99, 7]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    base_dir = make_tiny_llama(tmp / "base", tok)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    paths = {}
    for i in range(N_ADAPTERS):
        targets = [["q_proj", "v_proj"], ["k_proj", "o_proj", "up_proj"], ["down_proj", "gate_proj"]][i % 3]
        paths[f"a{i}"] = make_adapter(base, tmp / f"a{i}", seed=i, r=2 + 2 * i, target_modules=targets)
    # bad adapters
    bad = {}
    bad["dora"] = make_adapter(base, tmp / "dora", seed=7, r=4, target_modules=["q_proj"], use_dora=True)
    bad["bias"] = make_adapter(base, tmp / "bias", seed=8, r=4, target_modules=["q_proj"], bias="lora_only")
    bad["big_rank"] = make_adapter(base, tmp / "big_rank", seed=9, r=48, target_modules=["q_proj"])
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((paths["a0"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    bad["pickled"] = pickled
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((paths["a0"] / "adapter_config.json").read_text())
    data = (paths["a0"] / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    bad["corrupt"] = corrupt
    other_dir = make_tiny_llama(tmp / "other", tok, hidden=32)  # same architecture, other width
    other = AutoModelForCausalLM.from_pretrained(other_dir)
    bad["wrong_shapes"] = make_adapter(other, tmp / "wrong_shapes", seed=3, r=4, target_modules=["q_proj"])
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128))
    bad["gpt2_adapter"] = make_adapter(gpt2, tmp / "gpt2_adapter", seed=4, r=4, target_modules=["c_attn"])
    cfg_path = bad["gpt2_adapter"] / "adapter_config.json"  # get past the Conv1D flag to the module check
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "fan_in_fan_out": False}))
    gpt2.save_pretrained(tmp / "gpt2_base")
    bad["_gpt2_base"] = tmp / "gpt2_base"
    yield {"base_dir": base_dir, "base": base, "paths": paths, "bad": bad, "tmp": tmp}


def new_lm(tiny, **kw) -> RoutedLM:
    lm = RoutedLM.from_pretrained(str(tiny["base_dir"]), **kw)
    for name, path in tiny["paths"].items():
        lm.add_adapter(name, str(path))
    return lm


def use(lm: RoutedLM, *names: str) -> torch.Tensor:
    return lm.logits(IDS, plans=[RoutingPlan(adapters=names)] if names else None)


def test_single_plans_equal_peft_on_tiny(tiny):
    lm = new_lm(tiny, max_slots=2)
    for name, path in tiny["paths"].items():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base_dir"]), str(path)).eval()
        with torch.no_grad():
            ref = peft(input_ids=IDS).logits
        assert rel_err(lm.logits(IDS, plans=[RoutingPlan.single(name)]), ref) < 1e-4, name


def test_slot_lru_order_and_eviction(tiny):
    lm = new_lm(tiny, max_slots=3)
    for n in ("a0", "a1", "a2"):
        use(lm, n)
    assert lm.slots.lru_order() == ["a0", "a1", "a2"]
    use(lm, "a0")  # a hit moves a0 to the most recent end
    assert lm.slots.lru_order() == ["a1", "a2", "a0"]
    ref_a2 = use(lm, "a2")
    use(lm, "a3")  # evicts the least recently used: a1
    assert lm.slots.lru_order() == ["a0", "a2", "a3"]
    stats = lm.cache_stats()["device"]
    assert stats["evictions"] == 1 and stats["misses"] == 4 and stats["hits"] == 2
    # a reloaded adapter after eviction gives identical results (slots are cleared and refilled in place)
    use(lm, "a4")
    use(lm, "a1")
    assert torch.equal(use(lm, "a2"), ref_a2)


def test_pinned_adapter_is_never_evicted(tiny):
    lm = new_lm(tiny, max_slots=2)
    assert lm.pin_adapter("a0") is True
    assert lm.pin_adapter("a0") is False  # already pinned: no change
    for n in ("a1", "a2", "a3", "a4"):
        use(lm, n)
        assert "a0" in lm.slots.lru_order()
    with pytest.raises(CapacityError, match="pin"):
        lm.pin_adapter("a1")  # would leave no slot for anything else
    assert lm.unpin_adapter("a0") is True
    use(lm, "a1")
    use(lm, "a2")
    assert "a0" not in lm.slots.lru_order()


def test_in_use_slots_are_never_evicted(tiny):
    lm = new_lm(tiny, max_slots=2)
    tokens = 480  # long enough that both generations are still running in the loop's thread while we probe
    ref = lm.generate(["hello there"], plans=[RoutingPlan.single("a0")], max_new_tokens=tokens, ignore_eos=True)[0]
    stream = lm.stream(["hello there"], plans=[RoutingPlan.single("a0")], max_new_tokens=tokens, ignore_eos=True)
    first = next(stream)  # the generation is now in flight and holds a0's slot
    assert lm.slots.in_use("a0")
    for n in ("a1", "a2", "a3"):  # each needs the one other slot: evicts the previous, never a0
        use(lm, n)
        assert "a0" in lm.slots.lru_order()
    second = lm.stream(["hi"], plans=[RoutingPlan.single("a1")], max_new_tokens=tokens, ignore_eos=True)
    next(second)  # now both slots are held by in-flight generations
    with pytest.raises(CapacityError, match="in-flight"):
        use(lm, "a4")
    assert lm.logits(IDS).shape[0] == 1  # the base model still serves
    rest = "".join(e.delta for e in stream)
    assert first.delta + rest == ref  # eviction attempts did not disturb the running generation
    second.close()
    assert not lm.slots.in_use("a0") and not lm.slots.in_use("a1")
    use(lm, "a4")  # slots are free again


def test_batch_needing_more_adapters_than_slots(tiny):
    lm = new_lm(tiny, max_slots=2)
    plans = [RoutingPlan.single("a0"), RoutingPlan(adapters=("a1", "a2"))]
    with pytest.raises(CapacityError, match="max_slots"):
        lm.logits(IDS.repeat(2, 1), plans=plans)
    assert lm.slots.stats()["in_use"] == 0  # nothing leaked
    use(lm, "a0", "a1")


def test_remove_adapter_while_in_flight(tiny):
    lm = new_lm(tiny, max_slots=2)
    stream = lm.stream(["hello"], plans=[RoutingPlan.single("a0")], max_new_tokens=5, ignore_eos=True)
    next(stream)
    assert lm.remove_adapter("a0") is True
    assert "a0" not in lm.adapters and lm.remove_adapter("a0") is False
    list(stream)  # the running batch finishes with the tensors it holds
    assert lm.slots.stats()["size"] == 0 and lm.slots.stats()["in_use"] == 0


def test_concurrent_loads_of_one_adapter_happen_once(tiny):
    calls = []

    def slow_loader(source):
        calls.append(source.name)
        time.sleep(0.2)
        return load_adapter(source)

    lm = new_lm(tiny)
    source = lm._source("a1")
    cache = HostAdapterCache(4, slow_loader)
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, cache.get(source))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a1"] and cache.stats()["loads"] == 1
    assert all(r is results[0] for r in results)
    # the same through the engine: four threads run a batch with the same new adapter
    outs = [None] * 4
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, use(lm, "a2"))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = lm.cache_stats()
    assert stats["host"]["loads"] == 1 and stats["device"]["misses"] == 1
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_reading_threads_use_one_torch_thread():
    """The loader's threads convert and check tensors (parallel ops): with the process-wide count (the loop's,
    2 here) each would keep an OpenMP team beside the loop's for the rest of the process, which slowed every
    forward pass after the first large reads (issue 27's drift). They run with one thread whatever that count."""
    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = AdapterLoader(fetch=lambda name: seen.append(torch.get_num_threads()), is_ready=lambda name: False)
        loader.prefetch(["a", "b", "c"])
        deadline = time.monotonic() + 10
        while loader.loading() and time.monotonic() < deadline:
            time.sleep(0.01)
        loader.close()
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]


def test_host_cache_lru_capacity(tiny):
    lm = new_lm(tiny, max_slots=2, host_cache_size=2)
    for n in ("a0", "a1", "a2"):
        use(lm, n)
    assert lm.host_cache.names() == ["a1", "a2"]
    assert lm.cache_stats()["host"]["evictions"] == 1
    use(lm, "a0")  # evicted from both tiers: read from disk again
    assert lm.cache_stats()["host"]["loads"] == 4


def test_float16_files_stay_float16_in_host_memory_and_place_exactly(tiny, tmp_path):
    """A float16 adapter under a float32 model: the host tier keeps the file's precision (half the bytes, so the
    host cache holds twice the adapters) and placing it widens exactly: the same logits as its float32 copy."""
    from safetensors.torch import load_file, save_file

    src = tiny["paths"]["a1"]
    half, wide = tmp_path / "half", tmp_path / "wide"
    tensors = load_file(str(src / "adapter_model.safetensors"))
    for folder, cast in ((half, torch.float16), (wide, torch.float32)):
        folder.mkdir()
        (folder / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        save_file({k: v.to(torch.float16).to(cast) for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
    lm = RoutedLM.from_pretrained(str(tiny["base_dir"]))
    lm.add_adapter("half", str(half))
    lm.add_adapter("wide", str(wide))
    host_half, host_wide = lm._fetch("half"), lm._fetch("wide")
    assert {t.dtype for ly in host_half.layers.values() for t in (ly.a, ly.b)} == {torch.float16}
    assert {t.dtype for ly in host_wide.layers.values() for t in (ly.a, ly.b)} == {torch.float32}
    assert host_half.nbytes * 2 == host_wide.nbytes
    assert torch.equal(use(lm, "half"), use(lm, "wide"))
    assert not torch.equal(use(lm, "half"), use(lm))


@pytest.mark.parametrize(
    "bad,message",
    [
        ("pickled", "pickle"),
        ("corrupt", "safetensors"),
        ("dora", "DoRA"),
        ("bias", "bias"),
        ("big_rank", "max_rank"),
        ("wrong_shapes", "does not fit"),
        ("gpt2_adapter", "c_attn"),
    ],
)
def test_bad_adapters_are_refused_and_engine_keeps_serving(tiny, bad, message):
    lm = new_lm(tiny, max_slots=2, max_rank=32)
    before = use(lm, "a0")
    with pytest.raises(AdapterLoadError, match=message):
        lm.add_adapter("bad", str(tiny["bad"][bad]))
    assert "bad" not in lm.adapters
    assert torch.equal(use(lm, "a0"), before)
    assert lm.generate(["ok"], plans=[RoutingPlan.single("a1")], max_new_tokens=2)[0] is not None


def test_adapter_broken_after_registration(tiny):
    lm = new_lm(tiny, max_slots=2)
    folder = tiny["tmp"] / "late_break"
    folder.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / f).write_bytes((tiny["paths"]["a3"] / f).read_bytes())
    lm.add_adapter("late", str(folder))
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterLoadError):
        use(lm, "late")
    assert lm.slots.stats()["in_use"] == 0
    use(lm, "a3")  # still serving


def test_config_checks(tiny, tmp_path):
    src = tiny["paths"]["a0"]
    linears = {"model.layers.0.self_attn.q_proj": (64, 64)}
    cases = {
        "peft_type": ({"peft_type": "IA3"}, "peft_type"),
        "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        "no_rank": ({"r": None}, "r must be an integer"),
    }
    for case, (patch, message) in cases.items():
        folder = Path(tmp_path / case)
        folder.mkdir()
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg.update(patch)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        (folder / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
        with pytest.raises(AdapterLoadError, match=message):
            inspect_adapter(case, str(folder), linears, 64)
    with pytest.raises(AdapterLoadError, match="not found"):
        inspect_adapter("x", str(tmp_path / "missing" / "dir"), linears, 64)


def test_hub_download_failure_is_typed(tiny, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    lm = new_lm(tiny, max_slots=2)
    with pytest.raises(AdapterLoadError, match="could not download"):
        lm.add_adapter("hub", "someone/no-such-adapter", revision="main")


def test_unsupported_architecture(tiny):
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        RoutedLM.from_pretrained(str(tiny["bad"]["_gpt2_base"]))


def test_long_generation_text_matches_full_decode(tiny):
    lm = new_lm(tiny, max_slots=2)
    results = lm.generate_detailed(["a", "hello there friend"], plans=[RoutingPlan.single("a1"), RoutingPlan()],
                                   max_new_tokens=80, ignore_eos=True)
    streamed = ["", ""]
    for ev in lm.stream(["a", "hello there friend"], plans=[RoutingPlan.single("a1"), RoutingPlan()],
                        max_new_tokens=80, ignore_eos=True):
        streamed[ev.index] += ev.delta
    for res, text in zip(results, streamed, strict=True):
        assert res.completion_tokens == 80 and len(res.token_ids) == 80
        assert res.text == lm.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert text == res.text
