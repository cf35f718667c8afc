"""The demo adapter pool: task generators, splits, manifest and committed adapters (no training)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from examples.demo_pool import build_pool
from examples.demo_pool import tasks as T

ROOT = Path(__file__).resolve().parents[2]
POOL_DIR = ROOT / "examples" / "demo_pool"


@pytest.fixture(scope="module")
def manifest() -> list[dict]:
    return json.loads((POOL_DIR / "manifest.json").read_text())


def _roman_value(s: str) -> int:
    values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
    total = 0
    for a, b in zip(s, s[1:] + " ", strict=True):
        v = values[a]
        total += -v if b != " " and values[b] > v else v
    return total


def test_converters() -> None:
    assert T.number_to_words(0) == "zero"
    assert T.number_to_words(40) == "forty"
    assert T.number_to_words(347) == "three hundred forty-seven"
    assert T.number_to_words(1013) == "one thousand thirteen"
    for n in range(1, 3000):
        r = T.int_to_roman(n)
        assert _roman_value(r) == n, (n, r)
        assert re.fullmatch(r"M{0,3}(CM|CD|D?C{0,3})(XC|XL|L?X{0,3})(IX|IV|V?I{0,3})", r), r
    assert [T.ordinal_suffix(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 112, 123)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "112th", "123rd"]


def test_exact_match_normalisation() -> None:
    assert T.exact_match(" 42.\n", "42")
    assert T.exact_match("May 5, 2020", "May 5, 2020.")
    assert not T.exact_match("may 5, 2020", "May 5, 2020")
    assert not T.exact_match("42 is the answer", "42")


def test_pool_shape() -> None:
    pool = T.pool_tasks()
    clusters = Counter(t.cluster for t in pool)
    assert len(pool) >= 12
    assert len(clusters) >= 4 and min(clusters.values()) >= 3, clusters
    assert len({t.name for t in pool}) == len(pool)
    for t in pool:
        assert len(t.templates) >= 3 and all("{x}" in s for s in t.templates), t.name
        assert t.name in build_pool.SPECS


def test_get_task_rejects_unknown_name() -> None:
    with pytest.raises(KeyError, match="no_such_task"):
        T.get_task("no_such_task")


@pytest.mark.parametrize("name", T.TASK_NAMES)
def test_splits_deterministic_and_disjoint(name: str) -> None:
    task = T.get_task(name)
    a = T.split_keys_and_items(task, seed=0, n_train=300)
    b = T.split_keys_and_items(task, seed=0, n_train=300)
    assert a == b
    other = T.make_splits(task, seed=1, n_train=0)
    assert other["test"] != [it for _, it in a["test"]]
    keys = {split: [k for k, _ in pairs] for split, pairs in a.items()}
    assert len(keys["test"]) == 100 and len(keys["sample"]) == 20 and len(keys["train"]) == 300
    assert len(set(keys["test"])) == 100 and len(set(keys["sample"])) == 20
    assert not set(keys["test"]) & set(keys["sample"])
    assert not set(keys["train"]) & (set(keys["test"]) | set(keys["sample"]))
    for _, item in a["test"] + a["sample"] + a["train"]:
        assert item["inputs"] and item["targets"]
        assert item["targets"] == item["targets"].strip() and not item["targets"].endswith(".")
    # The template set is exercised: more than one phrasing among the test items.
    firsts = {next(s for s in task.templates if _matches(s, it["inputs"])) for _, it in a["test"]}
    assert len(firsts) > 1


def _matches(template: str, text: str) -> bool:
    pre, post = template.split("{x}")
    return text.startswith(pre) and text.endswith(post)


def test_format_prompt_is_the_models_chat_template() -> None:
    from transformers import AutoTokenizer

    from hilora_core.models.base_model import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    x = "Write the number 12 in words."
    expected = tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False,
                                       add_generation_prompt=True)
    assert T.format_prompt(x) == expected
    assert tok.convert_tokens_to_ids(T.END_OF_TURN) == tok.eos_token_id


def test_manifest_matches_generators(manifest: list[dict]) -> None:
    names = [e["model_name"] for e in manifest]
    assert names == list(T.TASK_NAMES)
    for e in manifest:
        task = T.get_task(e["model_name"])
        spec = build_pool.SPECS[task.name]
        assert e["cluster"] == task.cluster
        assert e["rank"] == spec.rank
        assert e["adapter"] == f"adapters/{task.name}"
        assert len(e["sample"]) == 20
        assert all(set(s) == {"inputs", "targets"} for s in e["sample"])
        splits = build_pool.splits_for(task, spec)
        assert e["sample"] == splits["sample"]
        test = [json.loads(line) for line in (POOL_DIR / "data" / task.name / "test.jsonl").open()]
        assert [{"inputs": t["inputs"], "targets": t["targets"]} for t in test] == splits["test"]
        assert {t["task"] for t in test} == {task.name} and {t["cluster"] for t in test} == {task.cluster}
        test_inputs = {t["inputs"] for t in test}
        assert not test_inputs & {s["inputs"] for s in e["sample"]}
        assert not test_inputs & {s["inputs"] for s in splits["train"]}


def test_adapters_load_with_their_manifest_rank(manifest: list[dict]) -> None:
    from peft import LoraConfig
    from safetensors import safe_open

    total = 0
    for e in manifest:
        folder = POOL_DIR / e["adapter"]
        spec = build_pool.SPECS[e["model_name"]]
        cfg = LoraConfig.from_pretrained(str(folder))
        assert cfg.r == e["rank"]
        assert set(cfg.target_modules) == set(spec.target_modules)
        assert cfg.base_model_name_or_path == build_pool.BASE_NAME
        weights = folder / "adapter_model.safetensors"
        total += weights.stat().st_size
        modules, layers = set(), set()
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for name in names:
                m = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$", name)
                assert m, name
                layers.add(int(m.group(1)))
                modules.add(m.group(2))
                shape = f.get_slice(name).get_shape()
                assert (shape[0] if m.group(3) == "A" else shape[1]) == e["rank"], (name, shape)
        assert modules == set(spec.target_modules)
        assert layers == set(range(30))
    assert total < 20 * 2**20
