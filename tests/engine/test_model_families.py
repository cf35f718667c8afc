"""Every served model family, family by check, on tiny random models against PEFT (``tests/family_models.py``).

Checks (prompts cross the family's sliding window, 8 positions):
- logits: a single-adapter plan equals PEFT, for an attention adapter and an all-linear one;
- loop: greedy generation through the serving loop equals PEFT's ``generate`` for each request, while
  requests of other lengths and plans join and leave the batch;
- token rule: a multi-adapter HiLoRA plan equals the looped per-layer reference (``route_rocs``);
- seed: a seeded sampled request gives the same text alone and in a changing batch.

``scripts/support_matrix.py`` runs this module and writes the README's support matrix from its results.
"""

from __future__ import annotations

import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hilora_core import AdapterLoadError, RoutedLM, RoutingPlan, UnsupportedModelError
from hilora_core.engine import FAMILIES, attention_layout
from hilora_core.engine.loop import GenerationLoop
from hilora_core.engine.requests import SequenceRequest
from hilora_core.engine.settings import LoopSettings
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import looped_hilora_reference, make_adapter, peft_greedy, rel_err
from tests.family_models import (
    FAMILY_CONFIGS,
    WINDOW,
    attention_targets,
    family_config,
    linear_targets,
    make_family_model,
)

TOL = 1e-4  # float32 on CPU
LONG = "The quick brown fox jumps over the lazy dog near the quiet river bank, then runs home before the rain"
SHORT = "Hello there"
MID = "One two three four five six seven eight nine ten"


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    tok.padding_side = "left"
    return tok


def test_every_served_family_has_a_tiny_model_here():
    assert sorted(FAMILY_CONFIGS) == sorted(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family(request, tmp_path_factory, tokenizer):
    """(model type, RoutedLM, PEFT model with adapters "attn" and "all", tokenizer) of one family."""
    model_type = request.param
    tmp = tmp_path_factory.mktemp(model_type)
    folder = make_family_model(model_type, tmp / "base", tokenizer)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    paths = {
        "attn": make_adapter(base, tmp / "attn", seed=1, r=4, target_modules=attention_targets(base)),
        "all": make_adapter(base, tmp / "all", seed=2, r=16, target_modules=linear_targets(base), use_rslora=True),
    }
    peft = PeftModel.from_pretrained(base, str(paths["attn"]), adapter_name="attn").eval()
    peft.load_adapter(str(paths["all"]), adapter_name="all")
    lm = RoutedLM.from_pretrained(folder, max_slots=4)
    for name, path in paths.items():
        lm.add_adapter(name, str(path))
    yield model_type, lm, peft, tokenizer
    if model_type in ("mixtral", "qwen3_moe"):  # PEFT's all-linear adds the experts as raw parameters
        make_adapter(base, tmp / "experts", seed=3, r=4, target_modules="all-linear")
        with pytest.raises(AdapterLoadError, match="target_parameters"):
            lm.add_adapter("experts", str(tmp / "experts"))
        assert lm.adapters == ["all", "attn"]
    lm.close()


def _ids(tok, text: str) -> list[int]:
    return tok(text).input_ids


def test_prompts_cross_the_sliding_window(tokenizer):
    assert len(_ids(tokenizer, LONG)) > 2 * WINDOW and len(_ids(tokenizer, MID)) > WINDOW


def test_logits_equal_peft(family):
    model_type, lm, peft, tok = family
    ids = torch.tensor([_ids(tok, LONG)])
    for adapter in ("attn", "all"):
        peft.set_adapter(adapter)
        with torch.no_grad():
            ref = peft(input_ids=ids).logits
        ours = lm.logits(ids, plans=[RoutingPlan.single(adapter)])
        assert rel_err(ours, ref) < TOL, (model_type, adapter)
    with peft.disable_adapter(), torch.no_grad():
        base = peft(input_ids=ids).logits
    assert rel_err(base, ref) > 1e-3  # the adapter changes the output


def _run(lm, joins: dict[int, list[SequenceRequest]]) -> list[list[int]]:
    """Submit ``joins[k]`` before the loop's k-th forward step; the generated ids of every request, in order.
    (A step that runs no forward pass, while adapters are read in the background, does not count.)"""
    loop = GenerationLoop(lm, LoopSettings(max_rows=6, max_tokens_per_sequence=128), start=False)
    handles, step, deadline = [], 0, time.monotonic() + 60
    try:
        while joins or loop.busy:
            for r in joins.pop(step, []):
                handles.append(loop.submit(r))
            if loop.step() or not loop.busy:
                step += 1
            assert time.monotonic() < deadline
        out = []
        for h in handles:
            events = list(h.events(timeout=60))
            assert events[-1].finished
            out.append(events[-1].token_ids)
        return out
    finally:
        loop.close()


def test_loop_greedy_equals_peft_generate_as_requests_join_and_leave(family):
    model_type, lm, peft, tok = family
    jobs = [(LONG, "all", 14, 0), (SHORT, "attn", 4, 2), (MID, None, 6, 3), (LONG + " again", "attn", 10, 5)]
    joins: dict[int, list[SequenceRequest]] = {}
    for text, adapter, n, step in jobs:
        plan = RoutingPlan() if adapter is None else RoutingPlan.single(adapter)
        joins.setdefault(step, []).append(SequenceRequest(_ids(tok, text), plan, max_new_tokens=n, ignore_eos=True))
    got = _run(lm, joins)
    for (text, adapter, n, _), ids in zip(jobs, got, strict=True):
        assert ids == peft_greedy(peft, _ids(tok, text), adapter, n), (model_type, text, adapter)


def test_hilora_plan_equals_the_looped_token_rule(family):
    model_type, lm, peft, tok = family
    ids = torch.tensor([_ids(tok, LONG)])
    ref = looped_hilora_reference(lm, peft, ids, ["attn", "all"], [2, 5], 1.3)
    ours = lm.logits(ids, plans=[RoutingPlan(adapters=("attn", "all"), rocs=(2, 5), scale=1.3)])
    assert rel_err(ours, ref) < TOL, model_type


def test_seeded_text_is_the_same_alone_and_in_a_batch(family):
    model_type, lm, _, tok = family
    plan = RoutingPlan(adapters=("attn", "all"), rocs=(3, 4))

    def sampled():
        return SequenceRequest(_ids(tok, MID), plan, max_new_tokens=8, temperature=1.0, seed=11, ignore_eos=True)

    alone = _run(lm, {0: [sampled()]})[0]
    others = {0: [SequenceRequest(_ids(tok, LONG), RoutingPlan.single("all"), max_new_tokens=12, ignore_eos=True)],
              2: [sampled()],
              4: [SequenceRequest(_ids(tok, SHORT), RoutingPlan(), max_new_tokens=3, ignore_eos=True)]}
    assert _run(lm, others)[1] == alone, model_type


def test_sliding_layers_are_read_from_the_config(tokenizer):
    layout = attention_layout(family_config("gemma2", tokenizer))
    assert layout.layer_types == ("sliding_attention", "full_attention") and layout.window == WINDOW
    assert attention_layout(family_config("qwen2", tokenizer)).layer_types == ("full_attention", "sliding_attention")
    assert attention_layout(family_config("mistral", tokenizer)).kinds == ("sliding_attention",)
    assert attention_layout(family_config("llama", tokenizer)).window is None


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "deepseek_v3"])
def test_a_family_outside_the_list_is_refused_by_name(model_type):
    with pytest.raises(UnsupportedModelError, match=model_type) as err:
        attention_layout(AutoConfig.for_model(model_type))
    assert "llama" in str(err.value) and "gemma2" in str(err.value)


def test_the_readme_support_matrix_is_the_one_these_tests_give():
    """The README's table equals what ``scripts/support_matrix.py`` writes when every check above passes (they
    are asserted here), so a new family, feature or check cannot be missing from it."""
    from scripts.support_matrix import CHECKS, END, README, START, matrix

    table = README.read_text().split(START, 1)[1].split(END, 1)[0].strip()
    assert table == matrix({(test, family): "pass" for test in CHECKS.values() for family in FAMILIES})
