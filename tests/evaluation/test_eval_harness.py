"""The evaluation harness (hilora_core.evaluation.harness): its splits, its prompts, and one tiny end-to-end
run of the benchmark script over it (benchmarks/eval_routing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import hilora_core.evaluation.harness as harness
from hilora_core.models.base_model import resolve_base

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    """The benchmark script, as a module."""
    from benchmarks import eval_routing

    return eval_routing


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_base(None))


@pytest.fixture(scope="module")
def demo(tokenizer):
    return harness.load_pool(ROOT / "examples" / "demo_pool", 3, tokenizer)


def test_chat_prompt_is_the_pools_training_format(tokenizer):
    from examples.demo_pool.tasks import format_prompt

    text = "Spell out 45 in English words."
    assert harness.chat_prompt(tokenizer, text) == format_prompt(text)


def test_demo_loads_limited_items_and_samples(demo):
    assert len(demo.names) == 12 and all(len(v) == 3 for v in demo.items.values())
    assert all(len(s) == 20 and all(isinstance(x, str) for x in s) for s in demo.samples.values())
    assert all(4 < n < 40 for n in demo.max_new.values())


def test_an_offset_reads_a_development_split_disjoint_from_the_report_items(tokenizer, demo):
    """``--offset`` tunes on later test items; the items a report reads (offset 0) stay untouched."""
    dev = harness.load_pool(ROOT / "examples" / "demo_pool", 3, tokenizer, offset=50)
    for task in demo.names:
        rows = [json.loads(line) for line in (ROOT / "examples" / "demo_pool" / "data" / task / "test.jsonl").open()]
        assert [it.index for it in dev.items[task]] == [50, 51, 52]
        assert [it.inputs for it in dev.items[task]] == [r["inputs"] for r in rows[50:53]]
        assert {it.index for it in dev.items[task]}.isdisjoint(it.index for it in demo.items[task])
    assert dev.max_new == demo.max_new  # answer budgets come from the whole test set either way


def test_settings_follow_the_papers_protocol(demo):
    units = harness.make_units(demo, ["within", "cross"], seed=0, folds=None, cross_seen_limit=1)
    within, cross = units[0], units[1:]
    assert within.setting == "within" and sorted(within.pool) == sorted(within.seen)
    assert set(within.seen).isdisjoint(within.unseen) and len(within.seen) + len(within.unseen) == 12
    for c in set(demo.cluster.values()):  # per cluster: 2 of 3 tasks seen
        assert sum(demo.cluster[t] == c for t in within.seen) == 2
    assert [u.fold for u in cross] == sorted(set(demo.cluster.values()))
    for u in cross:
        assert all(demo.cluster[t] == u.fold for t in u.unseen) and len(u.unseen) == 3
        assert all(demo.cluster[t] != u.fold for t in u.pool) and len(u.pool) == 9
        items = harness.unit_items(u, demo)
        assert len(items) == 9 * 1 + 3 * 3  # seen tasks cut to cross_seen_limit
    other = harness.make_units(demo, ["within"], seed=1, folds=None)[0]
    assert other.seen != within.seen  # the split is seeded


def test_engine_slots_cover_a_whole_example_pool(tokenizer):
    """Merged and Ensemble put every adapter of a pool in one batch: the engine must hold them all."""
    for name in ("demo_pool", "transfer_pool"):
        pool = harness.load_pool(ROOT / "examples" / name, 1, tokenizer)
        assert harness.slots_for(ROOT / "examples" / name) >= max(16, len(pool.names))
    assert harness.slots_for(ROOT / "examples" / "transfer_pool") == 21


@pytest.mark.slow  # the real base model (SmolLM2)
def test_tiny_run_writes_tables_plots_and_json(script, tmp_path):
    res = script.main(["--limit", "1", "--methods", "base", "oracle", "hilora", "retriever", "--settings", "within",
                        "--gammas", "0.4", "1.0", "--sequence-limit", "2", "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "eval-demo-pool.json").read_text())
    assert saved["results"].keys() == res["results"].keys()
    oracle = res["results"]["within|all|oracle"]
    assert len(oracle["per_task"]) == 12 and oracle["own_in_plan"] == 1.0 and oracle["mean_plan_size"] == 1.0
    hilora = res["results"]["within|all|hilora"]
    assert hilora["mean_plan_size"] >= 1 and 0 <= hilora["seen"] <= 1
    assert res["results"]["within|all|retriever"]["mean_plan_size"] == 3
    assert res["results"]["within|all|base"]["mean_plan_size"] == 0
    assert [g["gamma"] for g in res["gamma"]] == [0.4, 1.0]
    assert {r["embedder"] for r in res["sequence"]} >= {"MiniLM + instruction (default)", "MiniLM, no instruction"}
    report = (tmp_path / "eval-demo-pool.md").read_text()
    assert "| HiLoRA |" in report and "Gamma sweep" in report and "Sequence-level" in report
    for png in ("eval-accuracy.png", "eval-gamma.png"):
        assert (tmp_path / "img" / png).read_bytes()[:4] == b"\x89PNG"
    saved_path = str(tmp_path / "eval-demo-pool.json")
    again = script.main(["--limit", "1", "--methods", "base", "oracle", "hilora", "retriever", "--settings",
                          "within", "--out", str(tmp_path / "re"), "--from-json", saved_path])
    assert again["results"] == saved["results"]
    assert (tmp_path / "re" / "eval-demo-pool.md").read_text().split("\n", 3)[3] == report.split("\n", 3)[3]
