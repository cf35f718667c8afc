"""Per-layer plan weights and the introspection used by the LoGo / qa-FLoRA baselines, on SmolLM2."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hilora_core import InvalidInputError, RoutedLM, RoutingPlan
from hilora_core.engine import introspection
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter, rel_err

pytestmark = pytest.mark.slow  # the real base model (SmolLM2)

PROMPTS = ["Write the number 42 in words.", "Reverse the words: red green blue"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base_dir = resolve_base(None)
    tmp = tmp_path_factory.mktemp("lw")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    path_a = make_adapter(base, tmp / "a", seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    path_b = make_adapter(base, tmp / "b", seed=4, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"])
    peft = PeftModel.from_pretrained(base, str(path_a), adapter_name="a").eval()
    lm = RoutedLM.from_pretrained(None, max_slots=4)
    lm.add_adapter("a", str(path_a))
    lm.add_adapter("b", str(path_b))
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    yield lm, peft, enc["input_ids"], enc["attention_mask"]


def test_uniform_layer_weights_equal_plan_weights(setup):
    lm, _, ids, mask = setup
    n_layers = lm.n_layers
    weighted = RoutingPlan(adapters=("a", "b"), weights=(0.7, 0.2), normalize=False)
    by_layer = RoutingPlan(adapters=("a", "b"), normalize=False, layer_weights=((0.7, 0.2),) * n_layers)
    plain = RoutingPlan(adapters=("a", "b"), normalize=False)
    ref = lm.logits(ids, mask, [weighted] * 2)
    ours = lm.logits(ids, mask, [by_layer] * 2)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours, lm.logits(ids, mask, [plain] * 2)) > 1e-3  # the weights really act


def test_one_layer_only_equals_peft_with_other_layers_zeroed(setup):
    lm, peft, ids, mask = setup
    keep = 7
    rows = tuple((1.0,) if layer == keep else (0.0,) for layer in range(lm.n_layers))
    ours = lm.logits(ids, mask, [RoutingPlan(adapters=("a",), normalize=False, layer_weights=rows)] * 2)
    saved = {}
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name and f".layers.{keep}." not in name:
                saved[name] = p.detach().clone()
                p.zero_()
        try:
            ref = peft(input_ids=ids, attention_mask=mask).logits
        finally:
            for name, p in peft.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    valid = mask.bool()
    assert rel_err(ours[valid], ref[valid]) < 1e-4
    full = lm.logits(ids, mask, [RoutingPlan.single("a")] * 2)
    assert rel_err(ours[valid], full[valid]) > 1e-3


def test_mixed_batch_with_and_without_layer_weights(setup):
    lm, _, ids, mask = setup
    rows = tuple((0.5 + layer / 100, 1.0) for layer in range(lm.n_layers))
    p1 = RoutingPlan(adapters=("a", "b"), normalize=False, layer_weights=rows)
    p2 = RoutingPlan.single("b")
    mixed = lm.logits(ids, mask, [p1, p2])
    alone1 = lm.logits(ids[:1], mask[:1], [p1])
    alone2 = lm.logits(ids[1:], mask[1:], [p2])
    v0, v1 = mask[0].bool(), mask[1].bool()
    assert rel_err(mixed[0][v0], alone1[0][mask[0, -alone1.shape[1]:].bool()]) < 1e-4
    assert rel_err(mixed[1][v1], alone2[0][mask[1, -alone2.shape[1]:].bool()]) < 1e-4


def test_bad_layer_weights_are_refused(setup):
    lm, _, ids, mask = setup
    with pytest.raises(InvalidInputError, match="one row per decoder layer"):
        lm.logits(ids, mask, [RoutingPlan(adapters=("a",), layer_weights=((1.0,),) * 3)] * 2)
    with pytest.raises(InvalidInputError, match="layer_weights must be"):
        RoutingPlan(adapters=("a", "b"), layer_weights=((1.0,),))
    with pytest.raises(InvalidInputError, match="finite"):
        RoutingPlan(adapters=("a",), layer_weights=((float("nan"),),))
    with pytest.raises(InvalidInputError, match="ensemble"):
        RoutingPlan(adapters=("a",), ensemble=True, layer_weights=((1.0,),))
    assert RoutingPlan(adapters=("a",), layer_weights=[[2.0]]).to_dict()["layer_weights"] == [[2.0]]


def test_logit_lens_of_the_last_layer_is_the_model_output(setup):
    lm, _, ids, mask = setup
    plans = [RoutingPlan.single("a"), RoutingPlan()]
    states = introspection.last_token_states(lm, ids, mask, plans)
    assert states.shape == (2, lm.n_layers, lm.model.config.hidden_size)
    lens = introspection.lens_logprobs(lm, states[:, -1])
    ref = torch.log_softmax(lm.logits(ids, mask, plans)[:, -1].float(), dim=-1)
    assert rel_err(lens, ref) < 1e-4
    base_states = introspection.last_token_states(lm, ids, mask)
    assert torch.allclose(base_states[1], states[1])  # the base row is the base model
    assert not torch.allclose(base_states[0], states[0])


def test_adapter_delta_equals_peft_lora_output(setup):
    lm, peft, ids, mask = setup
    module = f"model.layers.{lm.n_layers - 1}.self_attn.q_proj"
    assert module in introspection.adapter_modules(lm, "a")
    assert not any(m.endswith("q_proj") for m in introspection.adapter_modules(lm, "b"))
    x = introspection.linear_inputs(lm, ids, mask, [module])[module]
    assert x.shape == (2, lm.model.config.hidden_size)
    ours = introspection.adapter_delta(lm, "a", module, x)
    layer = peft.get_submodule(f"base_model.model.{module}")
    with torch.no_grad():
        ref = layer.lora_B["a"](layer.lora_A["a"](x)) * layer.scaling["a"]
    assert rel_err(ours, ref) < 1e-4
    with pytest.raises(InvalidInputError, match="does not adapt"):
        introspection.adapter_delta(lm, "b", module, x)
