"""The transfer adapter pool: its converters, cluster structure, manifest and committed adapters (no training)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from examples.demo_pool import build_pool
from examples.demo_pool.tasks import make_splits, split_keys_and_items
from examples.transfer_pool import tasks as T
from examples.transfer_pool.specs import SPECS

ROOT = Path(__file__).resolve().parents[2]
POOL_DIR = ROOT / "examples" / "transfer_pool"


def _answer_shape(target: str) -> str:
    """A coarse class of an answer: what a cluster's tasks (and a partner cluster's) must share."""
    if target in ("positive", "negative"):
        return "label"
    if "@" in target:
        return "email"
    if len(target) == 10 and target[4] == target[7] == "-":
        return "iso_date"
    assert target.isdigit(), target
    return "integer"


def test_spoken_number_converters() -> None:
    assert [T.year_words(y) for y in (1951, 1905, 1900, 2003, 2012, 1801)] == [
        "nineteen fifty-one", "nineteen oh five", "nineteen hundred", "two thousand three", "twenty twelve",
        "eighteen oh one"]
    assert [T.ordinal_words(n) for n in (1, 2, 3, 12, 20, 21, 40, 83, 300, 243)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty-first", "fortieth", "eighty-third",
        "three hundredth", "two hundred forty-third"]
    assert T._mixed(4250) == "4 thousand 250" and T._mixed(17000) == "17 thousand"


def test_clusters_share_answer_shape_and_partners_exist() -> None:
    """Every cluster's tasks answer in one shape; three shapes span two clusters (the cross-cluster partners)."""
    shapes: dict[str, set[str]] = defaultdict(set)
    for task in T.pool_tasks():
        split = make_splits(task, seed=0, n_train=20, n_sample=5, n_test=5)
        shapes[task.cluster] |= {_answer_shape(it["targets"]) for it in split["test"] + split["train"]}
        assert task.test_templates and not set(task.test_templates) & set(task.templates), task.name
        assert task.name in SPECS
    assert all(len(s) == 1 for s in shapes.values()), shapes
    clusters_per_shape = Counter(next(iter(s)) for s in shapes.values())
    assert clusters_per_shape == {"iso_date": 2, "label": 2, "integer": 2, "email": 1}
    assert Counter(t.cluster for t in T.pool_tasks()) == {c: 3 for c in shapes}


@pytest.mark.parametrize("name", T.TASK_NAMES)
def test_splits_deterministic_and_disjoint(name: str) -> None:
    task = T.get_task(name)
    a = split_keys_and_items(task, seed=0, n_train=200)
    assert a == split_keys_and_items(task, seed=0, n_train=200)
    keys = {split: {k for k, _ in pairs} for split, pairs in a.items()}
    assert len(keys["test"]) == 100 and len(keys["sample"]) == 20
    assert not keys["test"] & keys["sample"] and not keys["train"] & (keys["test"] | keys["sample"])


def test_manifest_matches_generators_and_adapters() -> None:
    from peft import LoraConfig

    manifest = json.loads((POOL_DIR / "manifest.json").read_text())
    assert [e["model_name"] for e in manifest] == list(T.TASK_NAMES)
    total = 0
    for e in manifest:
        task, spec = T.get_task(e["model_name"]), SPECS[e["model_name"]]
        assert (e["cluster"], e["rank"]) == (task.cluster, spec.rank)
        assert e["sample"] == make_splits(task, build_pool.SEED, n_train=spec.steps * spec.batch_size,
                                            n_sample=build_pool.N_SAMPLE, n_test=build_pool.N_TEST)["sample"]
        folder = POOL_DIR / e["adapter"]
        cfg = LoraConfig.from_pretrained(str(folder))
        assert cfg.r == spec.rank and set(cfg.target_modules) == set(spec.target_modules)
        total += (folder / "adapter_model.safetensors").stat().st_size
    assert total < 40 * 2**20
