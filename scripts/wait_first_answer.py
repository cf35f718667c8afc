"""Poll a starting service until it answers a routed chat completion; print the seconds waited.

    python scripts/wait_first_answer.py [--url http://127.0.0.1:8000] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--prompt", default="Spell out 45 in English words.")
    args = ap.parse_args()
    body = json.dumps({"model": "hilora", "messages": [{"role": "user", "content": args.prompt}],
                       "max_tokens": 16}).encode()
    start = time.monotonic()
    while time.monotonic() - start < args.timeout:
        req = urllib.request.Request(f"{args.url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                out = json.loads(resp.read())
            print(f"first answer after {time.monotonic() - start:.1f} s: "
                  f"{out['choices'][0]['message']['content']!r} via {out['routing']['adapters']}")
            return 0
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(1)
    print(f"no answer within {args.timeout} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
