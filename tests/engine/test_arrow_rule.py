"""The Arrow token rule of RoutedLM against PEFT's own Arrow (``create_arrow_model``) on SmolLM2.

PEFT finds each prototype (top right singular vector of B A) by 15 steps of power
iteration from a random start; we use an exact SVD. The adapters here get a clearly
dominant first ROC so that power iteration has converged and both agree closely.
"""

from __future__ import annotations

import pytest
import torch
from peft import ArrowConfig, create_arrow_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hilora_core import RoutedLM, RoutingPlan
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter, rel_err, scale_first_roc

pytestmark = pytest.mark.slow  # the real base model (SmolLM2)

NAMES = ("t0", "t1", "t2")


@pytest.fixture(scope="module")
def arrow_setup(tmp_path_factory):
    base_dir = resolve_base(None)
    tmp = tmp_path_factory.mktemp("arrow")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    paths = []
    for i, name in enumerate(NAMES):
        path = make_adapter(base, tmp / name, seed=10 + i, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        scale_first_roc(path, 3.0)
        paths.append(str(path))
    peft_arrow = create_arrow_model(base, paths, ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)).eval()
    lm = RoutedLM.from_pretrained(None, arrow_temperature=1.0)
    for name, path in zip(NAMES, paths, strict=True):
        lm.add_adapter(name, path)
    tok = AutoTokenizer.from_pretrained(base_dir)
    yield lm, peft_arrow, tok


def test_arrow_matches_peft(arrow_setup):
    lm, peft_arrow, tok = arrow_setup
    ids = tok(["Arrow routes every token to its closest adapters."], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = peft_arrow(input_ids=ids).logits
    plan = RoutingPlan(adapters=NAMES, token_rule="arrow", top_k=2, normalize=False)
    ours = lm.logits(ids, plans=[plan])
    assert rel_err(ours, ref) < 1e-3
    # and it is not the base model, nor a plain mixture of all three adapters
    base = lm.logits(ids)
    merged = lm.logits(ids, plans=[RoutingPlan(adapters=NAMES, weights=(1 / 3,) * 3, normalize=False)])
    assert rel_err(base, ref) > 1e-2
    assert rel_err(merged, ref) > 1e-3


def test_arrow_prototypes_are_computed_only_for_arrow_plans(arrow_setup):
    lm, _, tok = arrow_setup
    lm.add_adapter("lazy", lm.adapter_info("t0")["location"])
    ids = tok(["Hello there."], return_tensors="pt").input_ids
    lm.logits(ids, plans=[RoutingPlan.single("lazy")])
    layer = lm.slots.layers["model.layers.0.self_attn.q_proj"]
    slot = lm.slots.slot_of("lazy")
    assert slot is not None and float(layer.prototypes[slot].abs().sum()) == 0.0  # plain LoRA: no SVD
    lm.logits(ids, plans=[RoutingPlan(adapters=("lazy", "t1"), token_rule="arrow", top_k=1, normalize=False)])
    assert float(layer.prototypes[slot].norm()) == pytest.approx(1.0, abs=1e-5)
    lm.remove_adapter("lazy")


def test_arrow_prototypes_match_peft(arrow_setup):
    lm, peft_arrow, tok = arrow_setup
    ids = tok(["Prototypes are computed when an Arrow plan first uses the adapters."], return_tensors="pt").input_ids
    lm.logits(ids, plans=[RoutingPlan(adapters=NAMES, token_rule="arrow", top_k=2, normalize=False)])
    checked = 0
    for name, module in peft_arrow.named_modules():
        if not hasattr(module, "lora_arrow") or not hasattr(module.lora_arrow["arrow_router"], "prototypes"):
            continue
        theirs = module.lora_arrow["arrow_router"].prototypes  # (E, d_in), order task_0, task_1, ...
        module_path = name.removeprefix("base_model.model.")
        layer = lm.slots.layers[module_path]
        for e, adapter in enumerate(NAMES):
            slot = lm.slots.slot_of(adapter)
            cos = torch.nn.functional.cosine_similarity(layer.prototypes[slot], theirs[e], dim=0)
            assert abs(float(cos)) > 0.999, (module_path, adapter, float(cos))
        checked += 1
    assert checked == 2 * 30  # q_proj and v_proj of every layer
