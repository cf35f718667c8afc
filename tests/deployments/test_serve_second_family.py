"""End to end on a second model family: the real Ray Serve application on a tiny random Mistral base
(sliding window of 8 positions, ``tests/family_models.py``) instead of the embedded SmolLM2, a real Redis,
the real embedder and two real PEFT adapters registered over the admin REST API.

Greedy answers through the service equal PEFT's ``generate`` on the same base and adapter for prompts
longer than the window; routed requests pick the adapter whose samples they resemble; streamed deltas add
up to the whole answer. One Serve start for the whole module (the module takes ~80 s on 2 cores).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve_helpers import AUTH, running_service

pytestmark = pytest.mark.slow  # Ray Serve

ARITH_SAMPLES = ["What is 17 plus 25?", "Compute 8 times 9.", "Subtract 14 from 30 and give the result.",
                 "What is 144 divided by 12?", "Add 3, 5 and 11 together."]
FRENCH_SAMPLES = ["Translate 'good morning' into French.", "How do you say 'thank you' in French?",
                  "Translate the sentence 'the cat is black' to French.", "Give the French word for 'house'.",
                  "Translate 'I love reading books' into French."]
# routed requests phrased like each adapter's samples, and prompts longer than the window for exact checks
ARITH_QUERY = "Compute 23 times 4, then add 19 to the result."
FRENCH_QUERY = "Translate the sentence 'the weather is nice today' into French."
N_TOKENS = 12


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("ray")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hilora_core.models.base_model import resolve_base
    from tests.engine_helpers import make_adapter
    from tests.family_models import WINDOW, attention_targets, linear_targets, make_family_model

    tmp = tmp_path_factory.mktemp("serve_mistral")
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    folder = make_family_model("mistral", tmp / "base", tok)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert base.config.model_type == "mistral" and base.config.sliding_window == WINDOW
    specs = {"arith": dict(seed=1, r=4, target_modules=attention_targets(base), samples=ARITH_SAMPLES),
             "french": dict(seed=2, r=8, target_modules=linear_targets(base), samples=FRENCH_SAMPLES)}
    assert specs["arith"]["target_modules"] == ["q_proj", "v_proj"] and len(specs["french"]["target_modules"]) == 7
    for name, spec in specs.items():
        make_adapter(base, tmp / "adapters" / name, seed=spec["seed"], r=spec["r"],
                     target_modules=spec["target_modules"])
    del base
    config = {
        "model": {"base": str(folder), "torch_threads": 1, "engine": {"max_slots": 4, "host_cache_size": 8},
                  "loop": {"max_rows": 2, "max_waiting": 4}},
        "registry": {"seed_manifest": None, "fit": {"eps": None}, "adapter_dirs": [str(tmp / "adapters")]},
        "limits": {"max_prompt_chars": 2000, "max_tokens": 64},
    }
    with running_service(tmp, config) as (url, _redis):
        client = httpx.Client(base_url=url, timeout=120)
        registered = {}
        for name, spec in specs.items():  # the pool starts empty: both adapters arrive over REST
            r = client.post("/admin/adapters", json={"id": name, "source": str(tmp / "adapters" / name),
                                                     "samples": spec["samples"]}, headers=AUTH)
            assert r.status_code == 201, r.text
            registered[name] = r.json()
        yield {"client": client, "url": url, "base": str(folder), "tokenizer": tok, "registered": registered,
               "specs": specs, "adapters": {name: str(tmp / "adapters" / name) for name in specs}}
        client.close()


@pytest.fixture(scope="module")
def peft_greedy(service):
    """PEFT's greedy ``generate`` on the Mistral base with each adapter (or none): the text of N_TOKENS new
    tokens, generating past EOS as ``ignore_eos`` does, decoded as the service decodes (special tokens skipped).
    ``window=False``: the same weights with the sliding window switched off (full attention)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.engine_helpers import peft_greedy as greedy_ids

    tok = service["tokenizer"]
    models = {}

    def model(window: bool):
        if window not in models:
            extra = {} if window else {"sliding_window": None}
            base = AutoModelForCausalLM.from_pretrained(service["base"], dtype=torch.float32, **extra).eval()
            names = list(service["adapters"])
            peft = PeftModel.from_pretrained(base, service["adapters"][names[0]], adapter_name=names[0]).eval()
            for name in names[1:]:
                peft.load_adapter(service["adapters"][name], adapter_name=name)
            models[window] = peft
        return models[window]

    def generate(prompt: str, adapter: str | None, window: bool = True) -> str:
        peft = model(window)
        ids = tok(prompt)["input_ids"]  # as the replica tokenizes a completions prompt
        new = greedy_ids(peft, ids, adapter, N_TOKENS)
        return tok.decode(new, skip_special_tokens=True)

    return generate


def complete(client, model: str, prompt: str, **extra) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True,
            **extra}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_both_adapters_registered_over_rest_and_listed(service):
    c = service["client"]
    for name, spec in service["specs"].items():
        rec = service["registered"][name]
        assert rec["id"] == name and rec["rank"] == spec["r"] and rec["sample_count"] == len(spec["samples"])
    listed = c.get("/admin/adapters", headers=AUTH).json()
    assert {a["id"] for a in listed["adapters"]} == {"arith", "french"} and listed["total"] == 2
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert {"hilora", "base", "arith", "french"} <= set(ids)
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["registry"]["adapters"] == 2


def test_prompts_cross_the_sliding_window(service):
    from tests.family_models import WINDOW

    tok = service["tokenizer"]
    for prompt in (ARITH_QUERY, FRENCH_QUERY):
        assert len(tok(prompt)["input_ids"]) > WINDOW


@pytest.mark.parametrize("adapter, prompt", [("arith", ARITH_QUERY), ("french", FRENCH_QUERY),
                                             ("french", ARITH_QUERY), (None, FRENCH_QUERY)])
def test_explicit_greedy_completion_equals_peft_generate(service, peft_greedy, adapter, prompt):
    out = complete(service["client"], adapter or "base", prompt)
    choice = out["choices"][0]
    assert choice["text"] == peft_greedy(prompt, adapter), (adapter, prompt)
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == N_TOKENS
    assert out["routing"]["adapters"] == ([adapter] if adapter else [])


def test_adapters_and_the_window_change_the_answer(service, peft_greedy):
    """Each adapter's greedy answer differs from the base model's, and from its answer with full attention,
    so the service's equality with PEFT above sees both the adapter and the sliding window applied."""
    c = service["client"]
    for adapter, prompt in (("arith", ARITH_QUERY), ("french", FRENCH_QUERY)):
        served = complete(c, adapter, prompt)["choices"][0]["text"]
        assert served != peft_greedy(prompt, None), adapter
        assert served != peft_greedy(prompt, adapter, window=False), adapter


@pytest.mark.parametrize("adapter, prompt", [("arith", ARITH_QUERY), ("french", FRENCH_QUERY)])
def test_routed_request_selects_the_adapter_it_resembles(service, adapter, prompt):
    out = complete(service["client"], "hilora", prompt)
    routing = out["routing"]
    assert routing["off_pool"]["fallback"] is False, routing  # in the pool: not answered by the base alone
    assert routing["adapters"] and set(routing["adapters"]) <= {"arith", "french"}, routing
    assert routing["adapters"][0] == adapter and routing["candidates"][0] == adapter, routing
    assert len(routing["candidate_scores"]) == len(routing["candidates"])
    assert routing["candidate_scores"] == sorted(routing["candidate_scores"], reverse=True)
    # HiLoRA keeps some rank-one components (ROCs) of each chosen adapter: between 1 and its rank
    ranks = {name: spec["r"] for name, spec in service["specs"].items()}
    assert len(routing["rocs"]) == len(routing["adapters"]), routing
    assert all(1 <= k <= ranks[a] for a, k in zip(routing["adapters"], routing["rocs"], strict=True)), routing
    assert isinstance(out["choices"][0]["text"], str) and out["usage"]["completion_tokens"] == N_TOKENS


def _stream_chunks(client, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed request, checked to end with ``[DONE]``."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    return chunks


def test_streamed_completion_equals_non_streamed_and_peft(service, peft_greedy):
    c = service["client"]
    body = {"model": "french", "prompt": FRENCH_QUERY, "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}
    whole = complete(c, "french", FRENCH_QUERY)["choices"][0]["text"]
    chunks = _stream_chunks(c, "/v1/completions", body)
    content = [ch for ch in chunks if ch["choices"]]
    assert len(content) >= 2  # the answer arrives in pieces
    assert "".join(ch["choices"][0]["text"] for ch in content) == whole == peft_greedy(FRENCH_QUERY, "french")
    assert content[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_routed_chat_equals_non_streamed_with_the_openai_client(service):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{service['url']}/v1", api_key="unused")
    msgs = [{"role": "user", "content": ARITH_QUERY}]
    kwargs = dict(model="hilora", messages=msgs, max_tokens=N_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    assert full.model_extra["routing"]["adapters"][0] == "arith"
    assert full.usage.completion_tokens == N_TOKENS and full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = "".join((ch.choices[0].delta.content or "") for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].model_extra["routing"]["adapters"] == full.model_extra["routing"]["adapters"]
