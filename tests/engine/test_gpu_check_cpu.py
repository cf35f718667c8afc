"""The GPU check (``benchmarks/gpu_check.py``, docs/gpu-check.md) run with ``--device cpu --quick``, so that it
keeps working between the sessions that have a GPU: every part runs, the correctness checks pass and the
numbers are sane. Its sync-site summary, which only runs on CUDA, is checked on made-up stacks."""

from __future__ import annotations

import json
import math
import traceback
import warnings

import torch

from benchmarks.common import ROOT
from benchmarks.gpu_check import captured_syncs, main, sync_sites


def test_quick_cpu_run_writes_sane_results(tmp_path):
    out = tmp_path / "gpu-check"
    # a generous run budget: the parts take about a second each, but this machine may be loaded
    assert main(["--out", str(out), "--device", "cpu", "--quick", "--budget-s", "600"]) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "results.md").read_text()
    assert "done in" in (out / "progress.log").read_text()

    assert results["meta"]["dtype"] == "float32" and results["meta"]["quick"] is True
    assert set(results["shapes"]) == {"small", "large"}
    for name, part in results["parts"].items():
        assert part["status"] == "done", (name, part)

    correctness = results["correctness"]
    assert correctness["passed"] and correctness["complete"]
    names = [c["check"] for c in correctness["checks"]]
    assert "logits explicit plan = PEFT" in names and "seeded sampling: in a batch = alone" in names
    for check in correctness["checks"]:
        assert check["passed"] is True, check
        if "rel" in check:
            assert check["rel"] <= 1e-4 < check["adapter_effect_rel"]  # the adapter matters, and we match PEFT
        else:
            assert all(r["identical"] and r["new_tokens"] > 0 for r in check["requests"])

    bench = results["bench"]["rows"]
    assert {(r["shape"], r["plan"], r["batch"]) for r in bench} == {
        (s, p, b) for s in ("tiny-64", "tiny-96") for p in ("base", "explicit", "hilora") for b in (1, 4)}
    for r in bench:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_steps"] == 2, r
        assert math.isfinite(r["decode_vs_base"]) and r["decode_vs_base"] > 0
        if r["plan"] == "base":
            assert r["decode_vs_base"] == 1.0

    load = results["load"]["rows"]
    assert {(r["shape"], r["plan"]) for r in load} == {(s, p) for s in ("tiny-64", "tiny-96")
                                                       for p in ("explicit", "hilora")}
    for r in load:
        assert r["completed"] == r["requests"] == 8 and r["errors"] == r["rejected"] == 0, r
        assert r["req_s"] > 0 and r["tok_s"] > 0 and r["peak_running"] <= 4 and r["peak_in_flight"] >= 1
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p99"] and 0 < r["itl_ms_p50"] <= r["itl_ms_p99"]

    assert results["syncs"]["applicable"] is False
    for heading in ("## 1. Correctness", "## 2. Engine benchmark", "## 3. Load test", "## 4. Host syncs"):
        assert heading in report
    assert "Correctness: passed." in report and "not applicable on cpu" in report


def _frame(path: str, line: int, name: str, code: str) -> traceback.FrameSummary:
    return traceback.FrameSummary(path, line, name, lookup_line=False, line=code)


def test_sync_sites_name_our_frame_and_flag_the_unexpected():
    caller = _frame(str(ROOT / "benchmarks" / "gpu_check.py"), 1, "run_syncs", "loop.step()")
    step = _frame(str(ROOT / "hilora_core" / "engine" / "loop.py"), 10, "step", "self._finish(...)")
    readback = [caller, step, _frame(str(ROOT / "hilora_core" / "engine" / "output.py"), 67, "advance",
                                     "tokens = self.choose(seqs, out.scores).tolist()")]
    inside_hf = [caller, step, _frame(str(ROOT / "hilora_core" / "engine" / "runner.py"), 120, "decode",
                                      "logits = lm.forward(...)"),
                 _frame("/usr/lib/python3/site-packages/transformers/masking_utils.py", 5, "check", "bool(x.all())")]
    rows = sync_sites([readback] * 4 + [inside_hf] * 2, steps=4)
    assert [(r["ours"], r["where"], r["count"], r["per_step"], r["expected"]) for r in rows] == [
        ("hilora_core/engine/output.py:67 (advance)", "", 4, 1.0, True),
        ("hilora_core/engine/runner.py:120 (decode)", "transformers/masking_utils.py:5 (check)", 2, 0.5, False),
    ]


def test_captured_syncs_keep_the_stack_of_each_sync_warning(monkeypatch):
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)  # the CPU build has no debug mode

    def read_back() -> None:
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    with captured_syncs() as stacks:
        read_back()
        read_back()  # the same warning again: every occurrence counts
        warnings.warn("something else", stacklevel=1)
    assert modes == ["warn", "default"]
    assert len(stacks) == 2 and all(any(f.name == "read_back" for f in stack) for stack in stacks)
