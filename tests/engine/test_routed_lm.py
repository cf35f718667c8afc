"""RoutedLM on the real SmolLM2-135M base against real PEFT: logits, mixed batches, generation."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hilora_core import RoutedLM, RoutingPlan, UnknownAdapterError
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import looped_hilora_reference, make_adapter, rel_err

pytestmark = pytest.mark.slow  # the real base model (SmolLM2)

PROMPTS = ["The movie was wonderful and the actors", "Question: is the sky green?", "Hi"]
ADAPTERS = {
    # name: LoraConfig kwargs (heterogeneous ranks, targets, rsLoRA, rank/alpha patterns)
    "sst2": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "qnli": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "mlp": dict(r=16, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"],
                rank_pattern={"down_proj": 6}, alpha_pattern={"up_proj": 40}),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_dir = resolve_base(None)
    tmp = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    paths = {name: make_adapter(base, tmp / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    peft = PeftModel.from_pretrained(base, str(paths["sst2"]), adapter_name="sst2").eval()
    for name in ("qnli", "mlp"):
        peft.load_adapter(str(paths[name]), adapter_name=name)
    lm = RoutedLM.from_pretrained(None, max_slots=4)
    for name, path in paths.items():
        lm.add_adapter(name, str(path))
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    yield lm, peft, tok, paths


def peft_logits(peft, adapter: str, ids, mask=None):
    peft.set_adapter(adapter)
    with torch.no_grad():
        return peft(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_single_plan_equals_peft(setup, adapter):
    lm, peft, tok, _ = setup
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    ref = peft_logits(peft, adapter, ids)
    ours = lm.logits(ids, plans=[RoutingPlan.single(adapter)])
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4
    with peft.disable_adapter(), torch.no_grad():
        base = peft(input_ids=ids).logits
    assert rel_err(base, ref) > 1e-2  # the adapter really changes the output
    # the explicit full plan with default normalisation is the same plain LoRA
    rank = lm.adapter_info(adapter)["rank"]
    full = lm.logits(ids, plans=[RoutingPlan(adapters=(adapter,), rocs=(rank,), scale=1.0)])
    assert rel_err(full, ref) < 1e-4


def test_adapter_info(setup):
    lm, *_ = setup
    assert lm.adapters == sorted(ADAPTERS)
    info = lm.adapter_info("mlp")
    assert info["rank"] == 16 and info["targets"] == ["down_proj", "gate_proj", "o_proj", "up_proj"]
    assert info["max_rank"] == 16 and info["n_layers"] == 4 * 30
    assert lm.adapter_info("qnli")["use_rslora"] is True
    with pytest.raises(UnknownAdapterError, match="nope"):
        lm.adapter_info("nope")
    with pytest.raises(UnknownAdapterError, match="nope"):
        lm.logits(torch.tensor([[1, 2]]), plans=[RoutingPlan.single("nope")])


def test_mixed_batch_equals_each_alone(setup):
    lm, peft, tok, _ = setup
    plans = [
        RoutingPlan.single("sst2"),
        RoutingPlan(adapters=("sst2", "qnli", "mlp"), rocs=(3, 2, 5), scale=1.2),
        RoutingPlan(),  # base model
        RoutingPlan(adapters=("qnli", "mlp"), token_rule="global_topk", top_k=6, weights=(0.5, 2.0)),
        RoutingPlan(adapters=("sst2", "mlp"), rocs=(2, 4), signed=True),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0] + " really", PROMPTS[1]]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = lm.logits(enc.input_ids, enc.attention_mask, plans=plans)
    for i, plan in enumerate(plans):
        keep = enc.attention_mask[i].bool()
        alone = lm.logits(enc.input_ids[i : i + 1, keep], plans=[plan])[0]
        assert rel_err(batch[i, keep], alone) < 1e-4, f"row {i} ({plan.adapters})"
    # single plans in a mixed batch also match PEFT's own mixed batch (adapter_names=)
    with torch.no_grad():
        ref = peft(input_ids=enc.input_ids[:2], attention_mask=enc.attention_mask[:2],
                   adapter_names=["sst2", "__base__"]).logits
    ours = lm.logits(enc.input_ids[:2], enc.attention_mask[:2], plans=[RoutingPlan.single("sst2"), RoutingPlan()])
    for i in range(2):
        keep = enc.attention_mask[i].bool()
        assert rel_err(ours[i, keep], ref[i, keep]) < 1e-4


def test_hilora_plan_equals_route_rocs_reference(setup):
    lm, _, tok, _ = setup
    ids = tok(PROMPTS[1:2], return_tensors="pt").input_ids
    ref = looped_hilora_reference(lm, setup[1], ids, ["sst2", "qnli"], [3, 2], 1.2)
    ours = lm.logits(ids, plans=[RoutingPlan(adapters=("sst2", "qnli"), rocs=(3, 2), scale=1.2)])
    assert rel_err(ours, ref) < 1e-4
    full = lm.logits(ids, plans=[RoutingPlan(adapters=("sst2", "qnli"), scale=1.2)])
    assert rel_err(full, ours) > 1e-3  # keeping fewer ROCs changes the result


def test_ensemble_averages_distributions(setup):
    lm, _, tok, _ = setup
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    plan = RoutingPlan(adapters=("sst2", "mlp"), weights=(1.0, 3.0), ensemble=True)
    out = lm.logits(enc.input_ids, enc.attention_mask, plans=[plan, RoutingPlan.single("qnli")])
    la = lm.logits(enc.input_ids[:1], enc.attention_mask[:1], plans=[RoutingPlan.single("sst2")])
    lb = lm.logits(enc.input_ids[:1], enc.attention_mask[:1], plans=[RoutingPlan.single("mlp")])
    expect = torch.log(0.25 * la.softmax(-1) + 0.75 * lb.softmax(-1))
    keep = enc.attention_mask[0].bool()
    assert torch.allclose(out[0, keep].log_softmax(-1), expect[0, keep], atol=1e-4)
    single = lm.logits(enc.input_ids[1:], enc.attention_mask[1:], plans=[RoutingPlan.single("qnli")])
    keep = enc.attention_mask[1].bool()  # rows mixed with an ensemble come back as log-probabilities
    assert torch.allclose(out[1, keep], single[0, keep].log_softmax(-1), atol=1e-4)
    # greedy generation follows the mixture
    text = lm.generate_detailed([PROMPTS[0]], plans=[plan], max_new_tokens=1, ignore_eos=True)[0]
    ids = tok([PROMPTS[0]], return_tensors="pt").input_ids
    mix = 0.25 * lm.logits(ids, plans=[RoutingPlan.single("sst2")])[0, -1].softmax(-1) + 0.75 * lm.logits(
        ids, plans=[RoutingPlan.single("mlp")]
    )[0, -1].softmax(-1)
    assert text.token_ids == [int(mix.argmax())]


def test_greedy_generation_equals_peft(setup):
    lm, peft, tok, _ = setup
    for adapter in ("sst2", "mlp"):
        peft.set_adapter(adapter)
        enc = tok(PROMPTS[:1], return_tensors="pt")
        with torch.no_grad():
            ref = peft.generate(**enc, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        ref_new = ref[0, enc.input_ids.shape[1]:].tolist()
        res = lm.generate_detailed(PROMPTS[:1], plans=[RoutingPlan.single(adapter)], max_new_tokens=12,
                                   ignore_eos=True)[0]
        assert res.token_ids == ref_new
        assert res.completion_tokens == 12 and res.finish_reason == "length"
        assert res.prompt_tokens == enc.input_ids.shape[1]
        assert res.text == tok.decode(ref_new, skip_special_tokens=True)


def test_batched_generation_equals_alone_and_streaming(setup):
    lm, *_ = setup
    plans = [RoutingPlan.single("qnli"), RoutingPlan(adapters=("sst2", "mlp"), rocs=(3, 6)), RoutingPlan()]
    batch = lm.generate_detailed(PROMPTS, plans=plans, max_new_tokens=10, ignore_eos=True)
    for i, plan in enumerate(plans):
        alone = lm.generate_detailed([PROMPTS[i]], plans=[plan], max_new_tokens=10, ignore_eos=True)[0]
        assert batch[i].token_ids == alone.token_ids
    events = list(lm.stream(PROMPTS, plans=plans, max_new_tokens=10, ignore_eos=True))
    for i in range(len(PROMPTS)):
        mine = [e for e in events if e.index == i]
        assert sum(not e.finished for e in mine) >= 2  # really streamed, not one final chunk
        assert [e.finished for e in mine].count(True) == 1 and mine[-1].finished
        assert "".join(e.delta for e in mine) == batch[i].text


def test_stop_strings_and_chat(setup):
    lm, *_ = setup
    prompt = ["The capital of France is"]
    full = lm.generate(prompt, max_new_tokens=16, chat=True)[0]
    assert len(full) > 6
    stop = full[3:6]
    cut = lm.generate_detailed(prompt, max_new_tokens=16, chat=True, stop=[stop, "never-appears"])[0]
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == "stop" and cut.completion_tokens < 16
    streamed = "".join(e.delta for e in lm.stream(prompt, max_new_tokens=16, chat=True, stop=stop))
    assert streamed == cut.text
    plain = lm.generate_detailed(prompt, max_new_tokens=2)[0]
    assert cut.prompt_tokens > plain.prompt_tokens  # the chat template added tokens


def test_sampling(setup):
    lm, *_ = setup
    kw = dict(plans=[RoutingPlan.single("sst2")] * 2, max_new_tokens=8, ignore_eos=True)
    a = lm.generate(PROMPTS[:2], temperature=1.0, seed=3, **kw)
    b = lm.generate(PROMPTS[:2], temperature=1.0, seed=3, **kw)
    c = lm.generate(PROMPTS[:2], temperature=1.0, seed=4, **kw)
    assert a == b and a != c
    greedy = lm.generate(PROMPTS[:2], **kw)
    assert lm.generate(PROMPTS[:2], temperature=0.7, top_p=1e-6, seed=5, **kw) == greedy
    mixed = lm.generate(PROMPTS[:2], temperature=[0.0, 1.0], seed=5, **kw)
    assert mixed[0] == greedy[0]


def test_cache_stats_counts(setup):
    lm, *_ = setup
    before = lm.cache_stats()
    lm.logits(torch.tensor([[1, 2, 3]]), plans=[RoutingPlan.single("sst2")])
    after = lm.cache_stats()
    assert after["device"]["hits"] + after["device"]["misses"] > before["device"]["hits"] + before["device"][
        "misses"
    ]
    assert after["host"]["loads"] <= len(ADAPTERS)
    assert math.isfinite(after["host"]["bytes"]) and after["host"]["bytes"] > 0


def test_adapter_files_above_the_size_limit_are_refused(setup):
    from hilora_core.errors import AdapterLoadError

    _, _, _, paths = setup
    weights = (paths["sst2"] / "adapter_model.safetensors").stat().st_size
    small = RoutedLM.from_pretrained(None, max_adapter_bytes=weights - 1)
    with pytest.raises(AdapterLoadError, match="above the limit"):
        small.add_adapter("sst2", str(paths["sst2"]))
    enough = RoutedLM.from_pretrained(None, max_adapter_bytes=weights)
    enough.add_adapter("sst2", str(paths["sst2"]))  # exactly at the limit: accepted


@pytest.mark.parametrize("per_row", [True, False])
def test_each_layer_routed_on_its_own_adapters_equals_routing_on_all(setup, per_row):
    """Routing a layer only on the batch's adapters with weights there (the default) gives what routing
    every layer on all of them gives: the q/v adapters have rank 0 at the MLP, the MLP adapter at q/v.
    Prompts (the per-row form, or the dense one) and single tokens (decode's dense form)."""
    lm, _, tok, _ = setup
    plans = [
        RoutingPlan(adapters=("sst2", "mlp"), rocs=(3, 5), scale=1.1),  # top-k ROCs at some layers
        RoutingPlan.single("qnli"),
        RoutingPlan(adapters=("qnli", "sst2"), rocs=(4, 8)),  # keeps all ROCs
        RoutingPlan(),
    ]
    enc = tok([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]], return_tensors="pt", padding=True)
    state = lm.routing_state
    try:
        state.per_row = per_row
        out = {}
        for subsets in (True, False):
            state.layer_subsets = subsets
            out[subsets] = (lm.logits(enc.input_ids, enc.attention_mask, plans=plans),
                            lm.logits(enc.input_ids[:, -1:], plans=plans))
    finally:
        state.per_row = state.layer_subsets = True
    for new, old in zip(out[True], out[False], strict=True):
        keep = enc.attention_mask.bool() if new.shape[1] > 1 else torch.ones(new.shape[:2], dtype=torch.bool)
        assert rel_err(new[keep], old[keep]) < 1e-5
    # the qnli-only rows really are routed (not the base model's logits)
    base = lm.logits(enc.input_ids[:, -1:], plans=[RoutingPlan()] * 4)
    assert rel_err(out[True][1][1], base[1]) > 1e-3
