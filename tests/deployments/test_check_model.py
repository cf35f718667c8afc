"""``hilora check-model`` on real files: tiny random bases of served and unserved families, real PEFT adapters
(good, DoRA, pickle-only, lm_head, other base, rank too large), and its memory figures against what the engine
really allocates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from deployments.check_model import check_family, check_model, format_report, human_bytes
from deployments.cli import main
from hilora_core.engine.adapter_files import inspect_adapter, load_adapter
from hilora_core.engine.families import FAMILIES
from hilora_core.engine.kv_slots import SlotKVCache
from hilora_core.engine.settings import EngineSettings, LoopSettings
from hilora_core.models.base_model import resolve_base
from tests.engine_helpers import make_adapter, make_tiny_llama
from tests.family_models import WINDOW, family_config, make_family_model


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_base(None))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny Mistral base and adapters for it (and one for a smaller Llama), on disk."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("check-model")
    base_dir = make_family_model("mistral", d / "mistral", tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    out = {"base": base_dir}
    out["good"] = make_adapter(base, d / "good", 1, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    out["big"] = make_adapter(base, d / "big", 5, r=80, target_modules=["q_proj", "o_proj"])  # > a pool's 64 rows
    out["dora"] = make_adapter(base, d / "dora", 2, r=4, target_modules=["q_proj"], use_dora=True)
    out["lm_head"] = make_adapter(base, d / "lm_head", 3, r=4, target_modules=["q_proj", "lm_head"])
    out["pickle"] = d / "pickle"
    shutil.copytree(out["good"], out["pickle"])
    (out["pickle"] / "adapter_model.safetensors").rename(out["pickle"] / "adapter_model.bin")
    small = AutoModelForCausalLM.from_pretrained(make_tiny_llama(d / "small", tokenizer, hidden=32))
    out["other_base"] = make_adapter(small, d / "other_base", 4, r=4, target_modules=["q_proj", "v_proj"])
    return {k: str(v) for k, v in out.items()}


def test_served_family_with_a_good_adapter(files):
    result = check_model(files["base"], [files["good"]])
    assert result.ok
    fam = result.family
    assert fam.served and fam.model_type == "mistral" and fam.architecture == "MistralForCausalLM"
    assert fam.window == WINDOW and fam.sliding_layers == [0, 1] and fam.n_layers == 2
    (adapter,) = result.adapters
    assert adapter.accepted and adapter.reason is None and adapter.rank == 4 and adapter.max_module_rank == 4
    assert adapter.modules == {"down_proj": 2, "q_proj": 2, "v_proj": 2}
    text = format_report(result)
    assert f"all 2 layers slide over the last {WINDOW} positions" in text
    assert "down_proj x2 layers, q_proj x2 layers, v_proj x2 layers" in text and text.endswith("OK: served")
    assert main(["check-model", files["base"], files["good"]]) == 0


def test_refusals_name_the_field_and_the_fix(files):
    locations = [files[k] for k in ("good", "dora", "pickle", "lm_head", "other_base")]
    result = check_model(files["base"], locations)
    assert not result.ok
    good, dora, pickle, lm_head, other = result.adapters
    assert good.accepted  # one bad adapter does not hide the others
    assert not dora.accepted and "use_dora" in dora.reason and "DoRA" in dora.reason
    assert dora.target_modules == ["q_proj"] and dora.rank == 4  # what its config says is still reported
    assert not pickle.accepted and "adapter_model.bin" in pickle.reason
    assert "safe_serialization=True" in pickle.reason  # how to convert it
    assert not lm_head.accepted and "lm_head" in lm_head.reason and lm_head.outside_decoder == ["lm_head"]
    assert not other.accepted and "does not fit the base model" in other.reason and "(r, 64)" in other.reason
    # the device slots are sized for the union of the accepted adapters' modules only
    assert result.memory is not None and result.memory.adapted_layers == 6
    text = format_report(result)
    assert text.count("REFUSED") == 4 and "target_modules ['lm_head'] are not linear layers inside" in text


def test_rank_above_max_rank_and_adapter_above_the_budget_are_refused(files):
    from hilora_core.engine.routed_model import RoutedModel
    from hilora_core.errors import AdapterLoadError

    result = check_model(files["base"], [files["good"]], EngineSettings(max_rank=2))
    assert not result.ok and "rank 4" in result.adapters[0].reason and "max_rank=2" in result.adapters[0].reason
    tight = EngineSettings(adapter_memory_bytes=10_000)  # the good adapter takes 13,312 bytes in float32
    (refused,) = check_model(files["base"], [files["good"]], tight).adapters
    assert not refused.accepted and "adapter_memory_bytes" in refused.reason and refused.nbytes == 13_312
    with pytest.raises(AdapterLoadError, match="adapter_memory_bytes"):  # as the engine refuses it
        RoutedModel.from_pretrained(files["base"], settings=tight).add_adapter("good", files["good"])


def test_unsupported_family_lists_the_served_ones(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    result = check_model(str(tmp_path))
    assert not result.ok and not result.family.served and result.family.model_type == "gpt2"
    assert "served families: " + ", ".join(sorted(FAMILIES)) in (result.family.error or "")
    assert main(["check-model", str(tmp_path)]) == 1
    assert "family: NOT SERVED: unsupported base model family 'gpt2'" in capsys.readouterr().out


def test_a_folder_without_a_config_is_a_clear_error(tmp_path, capsys):
    assert main(["check-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read a model config" in err and "config.json" in err and "Traceback" not in err


def test_every_served_family_is_reported_with_its_layout(tokenizer):
    for model_type in FAMILIES:
        fam = check_family(family_config(model_type, tokenizer))
        assert fam.served and fam.error is None, model_type
    assert check_family(family_config("qwen2", tokenizer)).sliding_layers == [1]  # hybrid: layer 1 slides
    assert check_family(family_config("llama", tokenizer)).window is None


def test_memory_equals_what_the_engine_allocates(files):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hilora_core.engine.routed_model import RoutedModel
    from hilora_core.engine.slots import AdapterSlots

    engine, loop = EngineSettings(max_slots=3, adapter_memory_bytes=1 << 20), LoopSettings(max_rows=6,
                                                                                          max_tokens_per_sequence=300)
    result = check_model(files["base"], [files["good"], files["big"]], engine, loop)
    mem = result.memory
    assert result.ok and mem is not None and mem.adapters_fit_at_once
    rm = RoutedModel.from_pretrained(files["base"], settings=engine)
    for name in ("good", "big"):
        rm.add_adapter(name, files[name])
        rm.pin_adapter(name)  # resident, as check_model loads them
    assert mem.adapted_layers == len(rm.slots.layers) == 8  # q, v, down and o in 2 layers
    assert mem.adapter_pool_bytes == rm.slots.allocated_bytes()
    assert mem.adapters_bytes == rm.slots.used_bytes == rm.adapter_bytes("good") + rm.adapter_bytes("big")
    assert mem.base_bytes == sum(p.numel() * p.element_size() for p in rm.model.parameters())
    cache = SlotKVCache.for_model(AutoConfig.from_pretrained(files["base"]), 6, 300, "cpu", torch.float32)
    cache.reserve(6, 300)  # grown to its bound (6 rows, 300 columns: not powers of two)
    assert mem.kv_bytes == cache.nbytes()
    assert mem.device_total_bytes == mem.base_bytes + mem.kv_bytes + mem.adapter_pool_bytes
    assert mem.device_bound_bytes == mem.base_bytes + mem.kv_bytes + (1 << 20)
    host = load_adapter(inspect_adapter("good", files["good"], rm._linears, 8), torch.float32)
    assert result.adapters[0].nbytes == host.nbytes == rm.adapter_bytes("good")

    one = check_model(files["base"], [files["good"], files["big"]], EngineSettings(max_slots=1))
    assert one.ok and one.memory is not None and not one.memory.adapters_fit_at_once
    assert any("cannot all be resident at once" in n for n in one.notes)

    half = check_model(files["base"], [], engine, loop, dtype="bfloat16").memory
    model = AutoModelForCausalLM.from_pretrained(files["base"], dtype=torch.bfloat16)
    assert half is not None and half.base_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert half.kv_bytes * 2 == mem.kv_bytes
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert half.adapted_layers == len(linears) == 14  # no adapter: every linear inside the decoder layers
    slots = AdapterSlots(1 << 20, 128, "cpu", torch.bfloat16)
    for n, m in linears.items():
        slots.add_layer(n, m.in_features, m.out_features)
    assert half.adapter_pool_bytes == slots.allocated_bytes() and half.adapters_bytes == 0


def test_cli_json(files):
    out = subprocess.run([sys.executable, "-m", "deployments.cli", "check-model", files["base"], files["good"],
                          files["dora"], "--json", "--max-slots", "2", "--dtype", "float16",
                          "--adapter-memory-bytes", "64MiB"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] is False and data["family"]["served"] is True and data["family"]["window"] == WINDOW
    assert [a["accepted"] for a in data["adapters"]] == [True, False]
    assert data["adapters"][0]["modules"] == {"down_proj": 2, "q_proj": 2, "v_proj": 2}
    assert data["memory"]["dtype_bytes"] == 2 and data["memory"]["max_slots"] == 2
    assert data["memory"]["adapter_memory_bytes"] == 64 << 20


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(3 << 20) == "3.00 MiB" and human_bytes(5 << 30) == "5.00 GiB"
