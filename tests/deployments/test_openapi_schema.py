"""The OpenAPI schema tells the truth: schemathesis (a client the project did not write) sends generated
requests, valid and invalid, to every operation of the running service and checks each response against
the schema: declared status, content type, body and headers, no server error, invalid data refused.

The service runs with small limits (4 new tokens, 4 choices) so that about 1,300 generated requests
finish in under a minute on 2 CPU cores.

Every check runs except ``positive_data_acceptance`` (a request the schema allows must not get a 4xx).
The schema states every rule it can express: types (strictly), id patterns, list lengths, value bounds,
the policy names. What remains are rules no JSON schema holds, and they are refused with a 422 and a
message on purpose:
- registration samples that are all identical (a Gaussian needs spread), or a source that cannot be read;
- `top_logprobs` without `logprobs: true` (OpenAI's rule);
- the operator's limits from the service config (max_tokens, prompt size, messages, prompts x choices).
Those refusals are tested one by one in test_serve_app.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve_helpers import AUTH, TOKEN, running_service, seed_pool

pytestmark = pytest.mark.slow  # Ray Serve

SAMPLES = [f"Convert the number {n} into English words." for n in (3, 17, 42, 105, 260, 999)]
EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("openapi")
    manifest = seed_pool(tmp / "pool", {"alpha": {"seed": 1, "r": 4, "target_modules": ["q_proj", "v_proj"],
                                                  "samples": SAMPLES}})
    config = {
        "model": {"torch_threads": 1, "engine": {"max_slots": 4, "host_cache_size": 8},
                  "loop": {"max_rows": 4, "max_waiting": 32}},
        "registry": {"seed_manifest": str(manifest), "fit": {"eps": None}},
        "limits": {"max_prompt_chars": 400, "max_tokens": 4, "max_choices": 4, "max_messages": 8},
    }
    with running_service(tmp, config) as (base_url, _):
        yield base_url


def schemathesis_cli() -> str:
    found = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: it is in the dev extra (pip install -e '.[dev]')")
    return found


def test_every_response_matches_the_schema(url):
    cmd = [schemathesis_cli(), "run", f"{url}/openapi.json", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance",
           "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", str(EXAMPLES_PER_OPERATION),
           "--seed", "7", "--request-timeout", "120", "--phases", "examples,coverage,fuzzing",
           "--no-color", "--warnings", "off"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    # the run did test every operation and many cases, not nothing
    ops = httpx.get(f"{url}/openapi.json").json()["paths"]
    n_ops = sum(len(v) for v in ops.values())
    cases = [int(x) for x in re.findall(r"(\d+) generated", out)]
    assert cases and cases[0] >= 50 * n_ops, out[-3000:]
    assert "No issues found" in out, out[-3000:]


def test_error_bodies_are_one_shape(url):
    """Each kind of error, from FastAPI's validation to Starlette's routing, carries the same body."""
    with httpx.Client(base_url=url, timeout=60) as c:
        cases = [
            c.post("/v1/chat/completions", json={"model": "alpha"}),  # validation (missing messages)
            c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            c.post("/v1/completions", json={"model": "alpha", "prompt": "x" * 401}),  # 413
            c.get("/admin/adapters"),  # 401
            c.get("/admin/adapters", params={"limit": 0}, headers=AUTH),  # 422 from the declared bounds
            c.get("/no/such/path"),  # Starlette's 404
            c.put("/v1/models"),  # Starlette's 405
        ]
        statuses = [r.status_code for r in cases]
        assert statuses == [422, 422, 404, 413, 401, 422, 404, 405], [(r.status_code, r.text) for r in cases]
        for r in cases:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
            assert err["message"] and err["type"]
        assert cases[0].json()["error"]["param"] == "messages"
        assert "nope" in cases[2].json()["error"]["message"]
        assert cases[4].headers["www-authenticate"] == "Bearer"
        # /metrics is declared text/plain and served as such
        assert httpx.get(f"{url}/metrics").headers["content-type"].startswith("text/plain")


def test_schema_is_kept_in_docs():
    """docs/openapi.json is the schema the service serves (regenerate: python scripts/export_openapi.py)."""
    from deployments.ingress import app

    saved = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    import json

    assert json.loads(saved.read_text()) == json.loads(json.dumps(app.openapi())), \
        "docs/openapi.json is stale: run python scripts/export_openapi.py"
