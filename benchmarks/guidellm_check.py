"""guidellm against the service, on the same prompts as benchmarks/load_test.py, and a side-by-side table.

    pip install -e '.[bench]'
    make serve                                   # in another terminal
    python benchmarks/guidellm_check.py make-data --out /tmp/hilora-guidellm/data.jsonl
    for c in 1 8; do
      guidellm run --backend kind=openai_http,target=http://127.0.0.1:8000,model=hilora \
        --tokenizer kind=huggingface_auto,model=TOKENIZER_DIR \
        --data kind=json_file,path=/tmp/hilora-guidellm/data.jsonl \
        --profile kind=concurrent,streams=$c --constraint kind=max_requests,count=24 \
        --output kind=json,path=/tmp/hilora-guidellm/c$c.json --disable-progress
    done
    python benchmarks/load_test.py --requests 24 --concurrency 1 8 --stream-only --ignore-eos \
        --out /tmp/hilora-guidellm/own.json
    python benchmarks/guidellm_check.py compare /tmp/hilora-guidellm/c1.json /tmp/hilora-guidellm/c8.json \
        --own /tmp/hilora-guidellm/own.json

`make-data` writes the load test's prompts (round-robin over the demo pool's tasks) with a fixed output
length, so both clients send the same requests. TOKENIZER_DIR is the embedded base model's folder
(`python -c "from hilora_core.models.base_model import resolve_base; print(resolve_base(None))"`);
guidellm only uses it to count tokens on its side. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import load_prompts, print_table


def make_data(out: Path, requests: int, tasks: int, max_tokens: int) -> None:
    prompts = load_prompts(tasks, (requests + tasks - 1) // tasks)[:requests]
    out.parent.mkdir(parents=True, exist_ok=True)
    # guidellm's generative column mapper reads `prompt` and `output_tokens_count`.
    out.write_text("".join(json.dumps({"prompt": text, "output_tokens_count": max_tokens}) + "\n"
                           for _, text in prompts))
    print(f"{len(prompts)} prompts, {max_tokens} output tokens each -> {out}")


def _stat(metric: dict, key: str) -> float:
    """A guidellm metric's distribution value (successful requests), e.g. 'median' or 'mean'."""
    dist = metric["successful"]
    if key.startswith("p"):
        return float(dist["percentiles"][key])
    return float(dist[key])


def guidellm_rows(path: Path) -> list[dict]:
    """One row per benchmark in a guidellm JSON report: concurrency, counts, req/s, TTFT, ITL, tok/s."""
    report = json.loads(path.read_text())
    rows = []
    for b in report["benchmarks"]:
        m = b["metrics"]
        totals = m["request_totals"]
        streams = b["config"]["strategy"].get("streams")
        rows.append({
            "client": "guidellm", "concurrency": streams,
            "ok": int(totals["successful"]), "errors": int(totals["errored"]) + int(totals["incomplete"]),
            "req_s": _stat(m["requests_per_second"], "mean"),
            "ttft_p50_s": _stat(m["time_to_first_token_ms"], "median") / 1e3,
            "itl_p50_ms": _stat(m["inter_token_latency_ms"], "median"),
            "latency_p50_s": _stat(m["request_latency"], "median"),
            "out_tok_s": _stat(m["output_tokens_per_second"], "mean"),
            "out_tokens_min": _stat(m["output_token_count"], "min"),
        })
    return rows


def own_rows(path: Path) -> list[dict]:
    """The matching rows of benchmarks/load_test.py's JSON (model hilora, streamed)."""
    rows = []
    for r in json.loads(path.read_text())["rows"]:
        if r["mode"] != "hilora" or not r["stream"]:
            continue
        rows.append({"client": "load_test.py", "concurrency": r["concurrency"], "ok": r["requests"] - r["errors"],
                     "errors": r["errors"], "req_s": r["req_per_s"], "ttft_p50_s": r["ttft_p50"],
                     "itl_p50_ms": None, "latency_p50_s": r["p50"], "out_tok_s": r["tok_per_s"],
                     "out_tokens_min": None})
    return rows


def compare(reports: list[Path], own: Path | None, out: Path | None) -> None:
    rows = [r for p in reports for r in guidellm_rows(p)]
    if own:
        rows += own_rows(own)
    rows.sort(key=lambda r: (r["concurrency"] or 0, r["client"]))

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    print_table(["concurrency", "client", "ok", "errors", "req/s", "TTFT p50 (s)", "ITL p50 (ms)", "latency p50 (s)",
                 "output tok/s", "fewest output tokens"],
                [[r["concurrency"], r["client"], r["ok"], r["errors"], fmt(r["req_s"], ".2f"),
                  fmt(r["ttft_p50_s"], ".3f"), fmt(r["itl_p50_ms"], ".1f"), fmt(r["latency_p50_s"], ".2f"),
                  fmt(r["out_tok_s"], ".1f"), fmt(r["out_tokens_min"], ".0f")] for r in rows])
    if out:
        out.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-data")
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--requests", type=int, default=24)
    mk.add_argument("--tasks", type=int, default=6)
    mk.add_argument("--max-tokens", type=int, default=16)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("reports", type=Path, nargs="+", help="guidellm --output kind=json files")
    cmp_.add_argument("--own", type=Path, help="benchmarks/load_test.py --out JSON on the same prompts")
    cmp_.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.cmd == "make-data":
        make_data(args.out, args.requests, args.tasks, args.max_tokens)
    else:
        compare(args.reports, args.own, args.out)


if __name__ == "__main__":
    main()
