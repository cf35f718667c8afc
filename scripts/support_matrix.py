"""Write the README's model-family support matrix from the family tests' results, so it cannot drift.

    .venv/bin/python -m scripts.support_matrix            # runs tests/engine/test_model_families.py (~30 s)
    .venv/bin/python -m scripts.support_matrix --check    # exit 1 if the README's matrix differs

Each cell is the outcome of one test of ``tests/engine/test_model_families.py`` for one family (every
family in ``hilora_core/engine/families.py``); the features come from the families' own configs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from transformers import AutoTokenizer

from hilora_core.engine.families import FAMILIES, attention_layout
from hilora_core.models.base_model import resolve_base
from tests.family_models import family_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TESTS = "tests/engine/test_model_families.py"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
CHECKS = {  # column -> test function
    "logits = PEFT": "test_logits_equal_peft",
    "loop greedy = PEFT, batch changing": "test_loop_greedy_equals_peft_generate_as_requests_join_and_leave",
    "token rule = looped reference": "test_hilora_plan_equals_the_looped_token_rule",
    "seeded text alone = in batch": "test_seeded_text_is_the_same_alone_and_in_a_batch",
}


def run_tests() -> dict[tuple[str, str], str]:
    """(test function, family) -> "pass" / "fail" / "skip", from one pytest run of the family tests."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS,
                        f"--junitxml={xml}"], cwd=ROOT, check=False)
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            m = re.match(r"(\w+)\[(\w+)\]$", case.get("name", ""))
            if m is None:
                continue
            state = "fail" if case.find("failure") is not None or case.find("error") is not None else (
                "skip" if case.find("skipped") is not None else "pass")
            results[(m[1], m[2])] = state
        return results


def matrix(results: dict[tuple[str, str], str]) -> str:
    """The markdown table: family by check, then what the family exercises."""
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    mark = {"pass": "yes", "fail": "**FAILS**", "skip": "skipped"}
    head = ["family (`model_type`)", *CHECKS, "sliding window", "fused projections", "MoE: attention / experts",
            "what else it exercises"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, fam in sorted(FAMILIES.items()):
        layout = attention_layout(family_config(name, tok))
        window = ("hybrid (per layer type)" if len(layout.kinds) > 1 else "every layer") if layout.window else "none"
        fused = "qkv_proj, gate_up_proj" if any("fused" in f for f in fam.features) else "-"
        moe = "attention LoRA yes; expert LoRA refused" if any("MoE" in f for f in fam.features) else "-"
        extra = ", ".join(f for f in fam.features if "MoE" not in f and "fused" not in f and "sliding" not in f)
        cells = [mark.get(results.get((test, name), "missing"), "not run") for test in CHECKS.values()]
        lines.append("| " + " | ".join([f"{fam.architecture} (`{name}`)", *cells, window, fused, moe,
                                         extra or "-"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the README instead of writing it")
    args = parser.parse_args(argv)
    table = matrix(run_tests())
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{table}\n{END}{after}"
    if args.check:
        if new != text:
            print("README.md's support matrix is out of date: run python -m scripts.support_matrix", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
