"""lm-evaluation-harness against the service: a local multiple-choice task, and a per-item comparison.

    pip install -e '.[bench]'
    python benchmarks/lmeval_check.py make-task --out /tmp/hilora-lmeval          # task YAML + data
    lm_eval --model local-completions --include_path /tmp/hilora-lmeval --tasks hilora_list_max \
        --model_args model=list_max,base_url=http://127.0.0.1:8000/v1/completions,tokenizer=TOKENIZER_DIR,\
tokenizer_backend=huggingface \
        --log_samples --output_path /tmp/hilora-lmeval/served
    lm_eval --model hf --include_path /tmp/hilora-lmeval --tasks hilora_list_max \
        --model_args pretrained=TOKENIZER_DIR,peft=examples/demo_pool/adapters/list_max,dtype=float32 \
        --log_samples --output_path /tmp/hilora-lmeval/local
    python benchmarks/lmeval_check.py compare /tmp/hilora-lmeval/served /tmp/hilora-lmeval/local

The task is made from the demo pool's `list_max` test items: the context is the item in the base
model's chat template, the choices are the numbers of the list, the answer is the largest. Nothing
is downloaded. TOKENIZER_DIR is the embedded base model's folder
(`python -c "from hilora_core.models.base_model import resolve_base; print(resolve_base(None))"`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import POOL_DATA, print_table

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_task(out: Path, task: str, limit: int) -> None:
    from transformers import AutoTokenizer

    from hilora_core.models.base_model import resolve_base

    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    rows = [json.loads(x) for x in (POOL_DATA / task / "test.jsonl").read_text().splitlines()][:limit]
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for r in rows:
        choices = re.findall(r"\d+", r["inputs"].split("\n")[0] if "\n" in r["inputs"] else r["inputs"])
        choices = list(dict.fromkeys(choices))
        if r["targets"] not in choices:
            continue
        context = tok.apply_chat_template([{"role": "user", "content": r["inputs"]}], tokenize=False,
                                          add_generation_prompt=True)
        docs.append({"context": context, "choices": choices, "gold": choices.index(r["targets"])})
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / f"hilora_{task}.yaml").write_text(TASK_YAML.format(name=f"hilora_{task}", data=data))
    print(f"{len(docs)} items -> {data}; task hilora_{task} in {out}")


def samples(folder: Path) -> dict[int, list[float]]:
    """doc_id -> loglikelihood of each choice, from an lm_eval --log_samples output folder."""
    files = sorted(folder.rglob("samples_*.jsonl"))
    if not files:
        raise SystemExit(f"no samples_*.jsonl under {folder}")
    out = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        out[s["doc_id"]] = [float(r[0]) for r in s["filtered_resps"]]
    return out


def compare(served: Path, local: Path) -> None:
    a, b = samples(served), samples(local)
    common = sorted(set(a) & set(b))
    diffs = [abs(x - y) for d in common for x, y in zip(a[d], b[d], strict=True)]
    same_pick = sum(max(range(len(a[d])), key=a[d].__getitem__) == max(range(len(b[d])), key=b[d].__getitem__)
                    for d in common)
    print_table(["items", "choices compared", "max abs diff of loglikelihood", "mean abs diff", "same argmax"],
                [[len(common), len(diffs), f"{max(diffs):.2e}", f"{sum(diffs) / len(diffs):.2e}",
                  f"{same_pick}/{len(common)}"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-task")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--task", default="list_max")
    mk.add_argument("--limit", type=int, default=40)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("served", type=Path)
    cmp_.add_argument("local", type=Path)
    args = ap.parse_args()
    if args.cmd == "make-task":
        make_task(args.out, args.task, args.limit)
    else:
        compare(args.served, args.local)


if __name__ == "__main__":
    main()
