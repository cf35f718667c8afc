"""Adapters as users bring them, in one pool and one batch: ranks 1 to 128, different target sets, rsLoRA,
``rank_pattern`` / ``alpha_pattern``; and what the engine refuses at registration, by name."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hilora_core import AdapterLoadError, RoutedLM, RoutingPlan
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter, rel_err
from tests.family_models import make_family_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
POOL = {  # name: LoraConfig kwargs
    "r1": dict(r=1, target_modules=["q_proj"]),
    "r4": dict(r=4, target_modules=ATTN),
    "r16": dict(r=16, target_modules=ATTN + MLP, use_rslora=True),
    "r64": dict(r=64, target_modules=MLP, rank_pattern={"down_proj": 8}, alpha_pattern={"up_proj": 32}),
    "r128": dict(r=128, target_modules=["v_proj", "o_proj"]),
}
PROMPTS = ["Add 17 and 25, then explain the sum", "Translate good night into French", "Hi",
           "Name three colours of the rainbow please", "Summarise: the cat sat on the mat all day", "Why?"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mix")
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    tok.padding_side = "left"
    folder = make_family_model("llama", tmp / "base", tok)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    paths = {n: make_adapter(base, tmp / n, seed=i, **kw) for i, (n, kw) in enumerate(POOL.items())}
    peft = PeftModel.from_pretrained(base, str(paths["r1"]), adapter_name="r1").eval()
    for name in list(POOL)[1:]:
        peft.load_adapter(str(paths[name]), adapter_name=name)
    lm = RoutedLM.from_pretrained(folder, max_slots=8, max_rank=128)
    for name, path in paths.items():
        lm.add_adapter(name, str(path))
    yield lm, peft, tok, base, tmp
    lm.close()


def test_the_pool_holds_every_rank_and_target_set(pool):
    lm, *_ = pool
    assert [lm.adapter_info(n)["rank"] for n in POOL] == [1, 4, 16, 64, 128]
    assert lm.adapter_info("r64")["max_rank"] == 64 and lm.adapter_info("r1")["targets"] == ["q_proj"]


def test_one_batch_of_every_adapter_equals_peft_row_by_row(pool):
    lm, peft, tok, *_ = pool
    names = list(POOL)
    enc = tok(PROMPTS[: len(names)], return_tensors="pt", padding=True)
    ours = lm.logits(enc.input_ids, enc.attention_mask, plans=[RoutingPlan.single(n) for n in names])
    for i, name in enumerate(names):
        keep = enc.attention_mask[i].bool()
        peft.set_adapter(name)
        with torch.no_grad():
            ref = peft(input_ids=enc.input_ids[i: i + 1, keep]).logits[0]
        assert rel_err(ours[i, keep], ref) < 1e-4, name


def test_a_generated_batch_mixing_their_plans_equals_each_request_alone(pool):
    lm, peft, tok, *_ = pool
    plans = [
        RoutingPlan.single("r128"),
        RoutingPlan(adapters=("r1", "r16", "r64"), rocs=(1, 5, 12)),  # HiLoRA over ranks 1, 16, 64
        RoutingPlan(),
        RoutingPlan(adapters=("r4", "r128"), ensemble=True, weights=(0.4, 0.6)),
        RoutingPlan.single("r64"),
        RoutingPlan(adapters=("r4", "r16"), token_rule="global_topk", top_k=10),
    ]
    batch = lm.generate_detailed(PROMPTS, plans=plans, max_new_tokens=8, ignore_eos=True)
    for i, plan in enumerate(plans):
        alone = lm.generate_detailed([PROMPTS[i]], plans=[plan], max_new_tokens=8, ignore_eos=True)[0]
        assert batch[i].token_ids == alone.token_ids, plan
    for i in (0, 4):  # single plans also equal PEFT's generate
        peft.set_adapter(plans[i].adapters[0])
        enc = tok(PROMPTS[i: i + 1], return_tensors="pt")
        with torch.no_grad():
            ref = peft.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert batch[i].token_ids == ref[0, enc.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("kwargs,field", [
    (dict(target_modules=["lm_head"]), "lm_head"),
    (dict(target_modules=["embed_tokens"]), "embed_tokens"),
    (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj"], use_dora=True), "use_dora"),
])
def test_what_the_engine_does_not_implement_is_refused_by_name(pool, kwargs, field):
    lm, _, tok, base, tmp = pool
    folder = make_adapter(base, tmp / f"bad_{field}", seed=9, r=4, **kwargs)
    before = lm.logits(tok(["Hi"], return_tensors="pt").input_ids, plans=[RoutingPlan.single("r4")])
    with pytest.raises(AdapterLoadError, match=field):
        lm.add_adapter("bad", str(folder))
    assert lm.adapters == sorted(POOL)
    after = lm.logits(tok(["Hi"], return_tensors="pt").input_ids, plans=[RoutingPlan.single("r4")])
    assert torch.equal(before, after)
