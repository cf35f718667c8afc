"""LoGo and qa-FLoRA (the instance-level baselines of the evaluation) on SmolLM2 with real PEFT adapters."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hilora_core import InvalidInputError, RoutedLM
from hilora_core.baselines.logo import LogoSettings, logo_plans, logo_signals, measured_module
from hilora_core.baselines.qa_flora import QaFloraSettings, fusion_weights, layer_divergences, qa_flora_plans
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter

pytestmark = pytest.mark.slow  # the real base model (SmolLM2)

PROMPTS = ["Write 42 in words.", "What is the largest number in 3, 9, 4?", "Uppercase: hello"]


def scale_lora_b(src, dst, factor: float):
    shutil.copytree(src, dst)
    path = dst / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: (t * factor if "lora_B" in k else t) for k, t in tensors.items()}, str(path))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None), dtype=torch.float32).eval()
    q = make_adapter(base, tmp / "q", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    paths = {
        "q": q,
        "q_x3": scale_lora_b(q, tmp / "q_x3", 3.0),
        "mlp": make_adapter(base, tmp / "mlp", seed=2, r=4, target_modules=["up_proj", "down_proj"]),
        "zero": scale_lora_b(q, tmp / "zero", 0.0),  # changes nothing
    }
    lm = RoutedLM.from_pretrained(None, max_slots=8)
    for name, path in paths.items():
        lm.add_adapter(name, str(path))
    ids, mask = lm.encode(PROMPTS)
    yield lm, ids, mask


def test_logo_signal_scales_with_the_adapter_and_falls_back_for_mlp_adapters(setup):
    lm, ids, mask = setup
    last = lm.n_layers - 1
    assert measured_module(lm, "q") == f"model.layers.{last}.self_attn.q_proj"
    assert measured_module(lm, "mlp") == f"model.layers.{last}.mlp.up_proj"
    names = ["q", "q_x3", "mlp", "zero"]
    rel = logo_signals(lm, ids, mask, names)
    assert rel.shape == (3, 4)
    np.testing.assert_allclose(rel[:, 1], 3 * rel[:, 0], rtol=1e-4)
    assert np.all(rel[:, 2] > 0) and np.all(rel[:, 3] == 0)
    absolute = logo_signals(lm, ids, mask, names, LogoSettings(signal="absolute"))
    ratio = absolute[:, 0] / rel[:, 0]  # ||W_q x||, common to the q adapters
    np.testing.assert_allclose(absolute[:, 1] / rel[:, 1], ratio, rtol=1e-4)
    plans = logo_plans(rel, names, top_k=2)
    assert all(p.adapters[0] in ("q_x3", "mlp") and "zero" not in p.adapters for p in plans)
    for p, row in zip(plans, rel, strict=True):
        assert sum(p.weights) == pytest.approx(1.0)
        chosen = [row[names.index(a)] for a in p.adapters]
        assert p.weights[0] / p.weights[1] == pytest.approx(chosen[0] / chosen[1])
    out = lm.logits(ids, mask, plans)
    assert torch.isfinite(out).all()


def test_logo_plans_edge_cases():
    plans = logo_plans(np.zeros((1, 3)), ["a", "b", "c"], top_k=2)
    assert plans[0].adapters == ("a", "b") and plans[0].weights == (0.5, 0.5)
    assert logo_plans(np.array([[0.1, 0.5]]), ["a", "b"], top_k=5)[0].adapters == ("b", "a")
    with pytest.raises(InvalidInputError, match="columns"):
        logo_plans(np.zeros((1, 3)), ["a", "b"])
    with pytest.raises(InvalidInputError):
        LogoSettings(module="lm_head")


def test_qa_flora_divergences_and_fused_plans(setup):
    lm, ids, mask = setup
    names = ["q", "q_x3", "zero"]
    div = layer_divergences(lm, ids, mask, names)
    assert div.shape == (3, lm.n_layers, 3)
    assert np.all(div[:, :, 2] < 1e-5)  # the zero adapter does not move the distribution
    assert div[:, -1, 1].mean() > div[:, -1, 0].mean() > 1e-4  # a 3x stronger delta diverges more
    plans = qa_flora_plans(div, names)
    for p in plans:
        w = np.array(p.layer_weights)
        assert w.shape == (lm.n_layers, 3)
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-9)
        assert w[-1, 1] > w[-1, 0]
    top = qa_flora_plans(div, names, QaFloraSettings(top_k=2))
    assert all(set(p.adapters) == {"q", "q_x3"} for p in top)
    out = lm.logits(ids, mask, plans)
    assert torch.isfinite(out).all()
    js = layer_divergences(lm, ids[:1], mask[:1], names, divergence="js")
    assert np.all(js <= np.log(2) + 1e-6)


def test_fusion_weights():
    d = np.array([[[1.0, 3.0], [0.0, 0.0]]])
    w = fusion_weights(d)
    np.testing.assert_allclose(w, [[[0.25, 0.75], [0.5, 0.5]]])
    s = fusion_weights(d, temperature=1.0)
    np.testing.assert_allclose(s[0, 0], np.exp([1, 3]) / np.exp([1, 3]).sum())
    with pytest.raises(InvalidInputError):
        QaFloraSettings(temperature=0)
    with pytest.raises(InvalidInputError, match="divergences must be"):
        qa_flora_plans(np.zeros((1, 2)), ["a", "b"])
