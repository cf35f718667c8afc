"""End to end: the real Ray Serve application, a real Redis, the real SmolLM2 base, real PEFT adapters.

One Serve start for the whole module (~30-60 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from tests.serve_helpers import AUTH, TOKEN, running_service, seed_pool

pytestmark = pytest.mark.slow  # Ray Serve

ALPHA_SAMPLES = [f"Convert the number {n} into English words." for n in (3, 17, 42, 105, 260, 999)]
BETA_SAMPLES = [f"Reverse the letters of the word '{w}'." for w in ("apple", "river", "stone", "garden", "cloud")]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pytest.importorskip("ray")
    from transformers import AutoModelForCausalLM

    from hilora_core.models.base_model import resolve_base
    from tests.engine_helpers import make_adapter

    tmp = tmp_path_factory.mktemp("serve")
    # a seed pool of one adapter (registered at start) and a second adapter registered over REST
    manifest = seed_pool(tmp / "pool", {"alpha": {"seed": 1, "r": 4, "target_modules": ["q_proj", "v_proj"],
                                                  "samples": ALPHA_SAMPLES}})
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None))
    make_adapter(base, tmp / "beta", seed=2, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    del base
    config = {
        "model": {"torch_threads": 1, "engine": {"max_slots": 4, "host_cache_size": 8},
                  "loop": {"max_rows": 2, "max_waiting": 2}},
        "registry": {"seed_manifest": str(manifest), "fit": {"eps": None}, "adapter_dirs": [str(tmp)]},
        "limits": {"max_prompt_chars": 2000, "max_tokens": 64},
    }
    # Serve may hand the replica more requests than its rows and queue hold (by default it stops at
    # max_rows + max_waiting and queues the rest itself), so that the replica's own bound is what refuses
    with running_service(tmp, config, deployments={"LoRAModel": {"max_ongoing_requests": 8}}) as (url, redis_srv):
        client = httpx.Client(base_url=url, timeout=120)
        yield {"client": client, "port": int(url.rsplit(":", 1)[1]), "beta": str(tmp / "beta"),
               "alpha": str(tmp / "pool" / "adapters" / "alpha"), "redis": redis_srv}
        client.close()


def chat(client, model, text, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_health_and_models(service):
    c = service["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["registry"]["adapters"] >= 1
    ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert {"hilora", "base", "alpha"} <= set(ids)


def test_register_over_rest_and_route_without_restart(service):
    c = service["client"]
    body = {"id": "beta", "source": service["beta"], "samples": BETA_SAMPLES}
    r = c.post("/admin/adapters", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    rec = r.json()
    assert rec["id"] == "beta" and rec["rank"] == 8 and rec["sample_count"] == len(BETA_SAMPLES)
    assert c.get("/admin/adapters/beta", headers=AUTH).json()["rank"] == 8
    listed = c.get("/admin/adapters", headers=AUTH).json()
    assert {a["id"] for a in listed["adapters"]} == {"alpha", "beta"} and listed["total"] == 2
    # routable at once: a reversal request goes to beta first, a number request to alpha first
    routes = c.post("/v1/route", json={"input": ["Reverse the letters of the word 'planet'.",
                                                  "Convert the number 58 into English words."]}).json()["data"]
    assert routes[0]["adapters"][0] == "beta"
    assert routes[1]["adapters"][0] == "alpha"
    assert all(sum(d["rocs"]) >= 1 for d in routes)


def test_routed_and_explicit_completions(service):
    c = service["client"]
    routed = c.post("/v1/completions", json={"model": "hilora", "prompt": "Convert the number 12 into English words.",
                                              "max_tokens": 6})
    assert routed.status_code == 200, routed.text
    out = routed.json()
    assert out["object"] == "text_completion" and isinstance(out["choices"][0]["text"], str)
    assert out["routing"]["adapters"] and out["usage"]["completion_tokens"] >= 1
    explicit = chat(c, "alpha", "Say hi")
    assert explicit.status_code == 200, explicit.text
    ej = explicit.json()
    assert ej["routing"]["adapters"] == ["alpha"] and ej["routing"]["rocs"] is None
    base = chat(c, "base", "Say hi")
    assert base.status_code == 200 and base.json()["routing"]["adapters"] == []


def test_openai_request_fields_as_real_clients_send_them(service):
    c = service["client"]
    assert c.get("/health").json() == {"status": "ok"}
    q = "Convert the number 12 into English words."
    plain = chat(c, "alpha", q, max_tokens=6).json()["choices"][0]["message"]["content"]
    # content as a list of text parts (guidellm, the OpenAI SDK with parts), max_completion_tokens, user
    parts = {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": q}]}],
             "max_completion_tokens": 6, "user": "someone", "response_format": {"type": "text"}}
    r = c.post("/v1/chat/completions", json=parts)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain
    # fields that would change the answer are refused with a message, never silently ignored
    for extra, word in (({"logit_bias": {"42": 5}}, "logit_bias"),
                        ({"response_format": {"type": "json_object"}}, "response_format"),
                        ({"presence_penalty": 0.5}, "presence_penalty"),
                        ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"n": 17}, "n"), ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens")):
        r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": q}],
                                                 **extra})
        assert r.status_code == 422 and word in r.text, (extra, r.text)
    image = {"model": "alpha", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.invalid/x.png"}}]}]}
    r = c.post("/v1/chat/completions", json=image)
    assert r.status_code == 422 and "text" in r.text
    r = c.post("/v1/completions", json={"model": "alpha", "prompt": [10, 99999999], "max_tokens": 2})
    assert r.status_code == 422 and "token ids" in r.text


def test_logprobs_and_echo_equal_peft_with_the_adapter(service):
    """Completions with echo + logprobs (as lm-evaluation-harness's local-completions asks) against PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hilora_core.models.base_model import resolve_base

    c = service["client"]
    text = "Convert the number 31 into English words. thirty-one"
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    ids = tok(text)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, service["alpha"]).eval()
    with torch.no_grad():
        logp = torch.log_softmax(peft(torch.tensor([ids])).logits[0].float(), dim=-1)
    for prompt in (text, ids):  # as a string, and as token ids (lm-eval's default)
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": prompt, "max_tokens": 1, "logprobs": 1,
                                            "echo": True, "temperature": 0})
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert ch["text"].startswith(tok.decode(ids))
        for j in range(1, len(ids)):
            assert abs(lp["token_logprobs"][j] - float(logp[j - 1, ids[j]])) < 1e-3
            assert max(lp["top_logprobs"][j].values()) == pytest.approx(float(logp[j - 1].max()), abs=1e-3)
        assert abs(lp["token_logprobs"][-1] - float(logp[-1].max())) < 1e-3  # greedy: the top token
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_chat_logprobs_streamed_and_not_with_the_openai_client(service):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{service['port']}/v1", api_key="unused")
    msgs = [{"role": "user", "content": "Name two fruits."}]
    full = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, logprobs=True,
                                          top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert "".join(t.token for t in content) == full.choices[0].message.content
    assert len(content) == full.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)  # greedy
    streamed = [t for ch in client.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, logprobs=True,
                                                           top_logprobs=2, stream=True)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_n_choices_and_prompt_lists(service):
    c = service["client"]
    body = {"model": "hilora", "messages": [{"role": "user", "content": "Convert the number 7 into English words."}],
            "max_tokens": 6, "n": 2, "temperature": 1.0, "seed": 5}  # n <= the test service's max_waiting
    one = c.post("/v1/chat/completions", json=body).json()
    again = c.post("/v1/chat/completions", json=body).json()
    assert [ch["index"] for ch in one["choices"]] == [0, 1]
    assert [ch["message"]["content"] for ch in one["choices"]] == [ch["message"]["content"] for ch in again["choices"]]
    assert one["usage"]["completion_tokens"] >= 2
    # each seed + i alone gives choice i
    solo = c.post("/v1/chat/completions", json={**body, "n": 1, "seed": 6}).json()
    assert solo["choices"][0]["message"]["content"] == one["choices"][1]["message"]["content"]
    # a list of prompts: one choice each, each routed on its own
    r = c.post("/v1/completions", json={"model": "hilora", "max_tokens": 4, "prompt": [
        "Convert the number 8 into English words.", "Reverse the letters of the word 'lamp'."]}).json()
    assert [ch["index"] for ch in r["choices"]] == [0, 1] and all("routing" in ch for ch in r["choices"])
    # streamed with n = 2: both choices arrive, each with its own finish
    finishes = {}
    with c.stream("POST", "/v1/chat/completions", json={**body, "n": 2, "stream": True}) as s:
        for ln in s.iter_lines():
            if ln.startswith("data: {"):
                ch = json.loads(ln[6:])["choices"][0]
                if ch["finish_reason"]:
                    finishes[ch["index"]] = ch["finish_reason"]
    assert set(finishes) == {0, 1}


def test_rendered_chat_prompt_is_routed_on_its_user_turn(service):
    """lm-evaluation-harness sends the chat-templated context plus a candidate answer, as text or ids."""
    from transformers import AutoTokenizer

    from hilora_core.models.base_model import resolve_base

    c = service["client"]
    q = "Convert the number 12 into English words."
    tok = AutoTokenizer.from_pretrained(resolve_base(None))
    rendered = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) + "twelve"
    as_chat = chat(c, "hilora", q, max_tokens=1).json()["routing"]
    assert as_chat["adapters"]  # in-pool
    for prompt in (rendered, tok(rendered)["input_ids"]):
        r = c.post("/v1/completions", json={"model": "hilora", "prompt": prompt, "max_tokens": 1})
        routing = r.json()["routing"]
        assert routing["adapters"] == as_chat["adapters"], (type(prompt), routing)
        assert routing["candidate_scores"] == pytest.approx(as_chat["candidate_scores"], abs=1e-5)


def test_pool_view_positions_and_timing(service):
    """What the playground draws, through the public API."""
    c = service["client"]
    answer = chat(c, "alpha", "Say hi", max_tokens=2).json()
    assert answer["timing"]["routing_s"] >= 0 and answer["timing"]["generation_s"] > 0
    pool = c.get("/v1/pool").json()
    ids = [a["id"] for a in pool["adapters"]]
    assert "alpha" in ids and pool["total"] == len(ids) and pool["degraded"] is False
    alpha = pool["adapters"][ids.index("alpha")]
    assert alpha["rank"] == 4 and alpha["sample_count"] == len(ALPHA_SAMPLES) and alpha["residency"] == "device"
    assert {"x", "y", "tags", "targets"} <= set(alpha)
    routed = c.post("/v1/route", json={"input": [ALPHA_SAMPLES[0], "plain"], "position": True}).json()["data"]
    assert all(len(d["position"]) == 2 for d in routed)
    assert "position" not in c.post("/v1/route", json={"input": "plain"}).json()["data"][0]
    assert c.get("/v1/pool", params={"limit": 0}).status_code == 422
    page = c.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "ui/app.js" in page.text
    assert c.get("/ui/app.js").status_code == 200 and c.get("/ui/secret.py").status_code == 404


def test_off_pool_request_is_answered_by_the_base_model(service):
    c = service["client"]
    q = "What is the capital of France?"
    routed = chat(c, "hilora", q, max_tokens=12)
    assert routed.status_code == 200, routed.text
    r = routed.json()["routing"]
    assert r["adapters"] == [] and r["off_pool"]["fallback"] is True and r["off_pool"]["enabled"] is True
    assert r["off_pool"]["best_score"] < r["off_pool"]["threshold"]
    base = chat(c, "base", q, max_tokens=12).json()
    assert routed.json()["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
    # per request, the paper's behaviour: always route to adapters
    paper = chat(c, "hilora", q, max_tokens=4, routing={"fallback": False}).json()["routing"]
    assert paper["adapters"] and paper["off_pool"]["fallback"] is False and paper["off_pool"]["enabled"] is False
    shown = c.post("/v1/route", json={"input": q}).json()["data"][0]
    assert shown["adapters"] == [] and shown["off_pool"]["fallback"] is True


def test_streaming_equals_non_streaming(service):
    c = service["client"]
    full = chat(c, "alpha", "Name a colour.", max_tokens=10).json()["choices"][0]["message"]["content"]
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 10,
            "stream": True, "stream_options": {"include_usage": True}}
    pieces, final, usage = [], None, None
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        chunk = json.loads(ln.removeprefix("data: "))
        if not chunk["choices"]:  # the usage chunk of stream_options.include_usage, after the last content
            usage = chunk["usage"]
            continue
        assert "usage" not in chunk
        pieces.append(chunk["choices"][0]["delta"].get("content", ""))
        if chunk["choices"][0]["finish_reason"] is not None:
            final = chunk
    assert "".join(pieces) == full
    assert final is not None and final["routing"]["adapters"] == ["alpha"]
    assert usage is not None and usage["completion_tokens"] >= 1 and json.loads(lines[-2][6:])["choices"] == []


def test_vllm_extensions_benchmark_clients_send(service):
    """guidellm's body: ignore_eos, stop null, stream_options.continuous_usage_stats, text parts."""
    c = service["client"]
    q = "Name a colour."
    natural = chat(c, "alpha", q, max_tokens=40).json()
    assert natural["choices"][0]["finish_reason"] == "stop"  # the adapter ends early on its own
    budget = natural["usage"]["completion_tokens"] + 5
    body = {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": q}]}],
            "max_completion_tokens": budget, "stop": None, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    content = [ch for ch in chunks if ch["choices"]]
    counts = [ch["usage"]["completion_tokens"] for ch in content]
    assert counts == sorted(counts) and counts[-1] == budget, counts
    assert all(ch["usage"]["prompt_tokens"] == natural["usage"]["prompt_tokens"] for ch in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == budget
    # the non-streamed path honours ignore_eos too; vLLM sampling fields are refused unless neutral
    r = c.post("/v1/chat/completions", json={**body, "stream": False, "stream_options": None})
    assert r.json()["usage"]["completion_tokens"] == budget
    for extra in ({"top_k": 5}, {"repetition_penalty": 1.2}, {"min_tokens": 3}):
        r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": q}],
                                                 **extra})
        assert r.status_code == 422 and next(iter(extra)) in r.text, (extra, r.text)
    ok = c.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "user", "content": q}],
                                              "max_tokens": 2, "top_k": -1, "repetition_penalty": 1.0})
    assert ok.status_code == 200, ok.text


def test_openai_client(service):
    openai = pytest.importorskip("openai")
    c = service["client"]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{service['port']}/v1", api_key="unused")
    msg = [{"role": "user", "content": "Convert the number 7 into English words."}]
    resp = client.chat.completions.create(model="hilora", messages=msg, max_tokens=5)
    direct = chat(c, "hilora", msg[0]["content"], max_tokens=5).json()
    # the SDK sees the same greedy answer and routing as a plain HTTP client
    assert resp.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert resp.model_extra["routing"]["adapters"] == direct["routing"]["adapters"] == ["alpha"]
    comp = client.completions.create(model="alpha", prompt="One, two,", max_tokens=3)
    http_comp = c.post("/v1/completions", json={"model": "alpha", "prompt": "One, two,", "max_tokens": 3}).json()
    assert comp.choices[0].text == http_comp["choices"][0]["text"] and comp.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True)
    streamed = "".join((ch.choices[0].delta.content or "") for ch in stream if ch.choices)
    assert streamed == chat(c, "alpha", "Hi", max_tokens=4).json()["choices"][0]["message"]["content"]
    assert "alpha" in [m.id for m in client.models.list().data]
    # the other request fields as the SDK sends them: text parts, max_completion_tokens, stop, seed, n, user
    parts = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": [{"type": "text", "text": msg[0]["content"]}]}],
        max_completion_tokens=5, user="someone", stop=["zzz"], seed=3, n=2, temperature=0.8)
    assert [ch.index for ch in parts.choices] == [0, 1] and parts.usage.completion_tokens >= 2
    # vLLM's extensions go through extra_body / stream_options, as vLLM's users write them
    long = client.chat.completions.create(model="alpha", messages=msg, max_tokens=12, extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 12 and long.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="alpha", messages=msg, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True,
                                                                 "continuous_usage_stats": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(ch.usage is not None for ch in chunks)
    # errors arrive as the SDK's typed exceptions, with the server's message and type
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model="alpha", messages=msg, logit_bias={"42": 5})
    assert "logit_bias" in err.value.message and err.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-adapter", messages=msg)
    assert "no-such-adapter" in err.value.message and str(err.value.code) == "404"


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("post", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, {}, 404),
        ("post", "/v1/chat/completions", {"model": "hilora"}, {}, 422),
        ("post", "/v1/chat/completions", {"model": "hilora", "messages": [{"role": "system", "content": "x"}]},
         {}, 422),
        ("post", "/v1/completions", {"model": "hilora", "prompt": "x" * 2001}, {}, 413),
        ("post", "/v1/completions", {"model": "hilora", "prompt": "x", "max_tokens": 65}, {}, 422),
        ("post", "/v1/completions", {"model": "hilora", "prompt": "x", "temperature": -1}, {}, 422),
        ("post", "/v1/completions", {"model": "hilora", "prompt": "x", "routing": {"gamma": 2}}, {}, 422),
        ("post", "/v1/completions", {"model": "hilora", "prompt": "x", "routing": {"policy": "zz"}}, {}, 422),
        ("post", "/v1/route", {"input": []}, {}, 422),
        ("get", "/admin/adapters", None, {}, 401),
        ("get", "/admin/adapters", None, {"Authorization": "Bearer wrong"}, 401),
        ("get", "/admin/adapters/nope", None, AUTH, 404),
        ("delete", "/admin/adapters/nope", None, AUTH, 404),
        ("post", "/admin/adapters", {"id": "alpha", "source": "/tmp", "samples": ["a", "b"]}, AUTH, 409),
        ("post", "/admin/adapters", {"id": "bad id!", "source": "/tmp", "samples": ["a", "b"]}, AUTH, 422),
        ("post", "/admin/adapters", {"id": "gamma", "source": "/no/such/dir", "samples": ["a", "b"]}, AUTH, 422),
        ("post", "/admin/adapters", {"id": "gamma", "source": "/tmp", "samples": ["same", "same"]}, AUTH, 422),
        ("post", "/admin/adapters", {"id": "gamma", "source": "/tmp"}, AUTH, 422),
        # a local folder outside the allowed ones (registry.adapter_dirs and the seed pool's folder)
        ("post", "/admin/adapters", {"id": "gamma", "source": "/tmp", "samples": ["one", "two"]}, AUTH, 403),
    ],
)
def test_client_errors_are_4xx_and_change_nothing(service, method, path, body, headers, status):
    c = service["client"]
    before = c.get("/admin/adapters", headers=AUTH).json()["total"]
    r = c.request(method.upper(), path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]  # one error body for every error: OpenAI's shape
    assert err["code"] == status and isinstance(err["message"], str) and err["message"] and err["type"]
    assert c.get("/admin/adapters", headers=AUTH).json()["total"] == before


def test_admin_disabled_without_token():
    from fastapi import HTTPException

    from deployments.auth import check_admin

    with pytest.raises(HTTPException) as e:
        check_admin(None, TOKEN, "HILORA_ADMIN_TOKEN")
    assert e.value.status_code == 403 and "HILORA_ADMIN_TOKEN" in e.value.detail
    check_admin(TOKEN, TOKEN, "HILORA_ADMIN_TOKEN")  # accepted
    with pytest.raises(HTTPException) as e:
        check_admin(TOKEN, None, "HILORA_ADMIN_TOKEN")
    assert e.value.status_code == 401


STORY = "Write a long story about a dragon who learns to cook. Describe every dish in detail."


def loop_metric(client, quantity: str) -> float:
    """The latest generation-loop number the ingress exports for the (single) model replica."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("hilora_generation_loop{") and f'quantity="{quantity}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def open_stream(stack, client, text: str):
    # ignore_eos: the stream holds its row for all 64 tokens, however short the model's own answer
    body = {"model": "base", "messages": [{"role": "user", "content": text}], "max_tokens": 64, "stream": True,
            "ignore_eos": True}
    r = stack.enter_context(client.stream("POST", "/v1/chat/completions", json=body))
    assert r.status_code == 200, r.read()
    return r


def test_abandoned_streams_are_cancelled_and_a_full_queue_answers_503(service):
    from contextlib import ExitStack

    c = service["client"]
    cancelled_before = loop_metric(c, "cancelled")
    with httpx.Client(base_url=c.base_url, timeout=120) as other, ExitStack() as stack:
        streams, readers = [], []
        for i in range(4):  # 2 rows running (each has sent text), then 2 queued behind them
            streams.append(open_stream(stack, other, f"{STORY} ({i})"))
            if i < 2:
                readers.append(streams[-1].iter_lines())  # kept: a dropped reader closes its stream
                next(ln for ln in readers[-1] if ln.startswith("data: "))
        full = chat(c, "base", "Say hi", max_tokens=4)
        assert full.status_code == 503 and "max_waiting=2" in full.json()["error"]["message"], full.text
        assert full.headers["retry-after"] == "1"
        # now every client goes away: two mid-stream, two while queued
    # the service is free again at once: the abandoned requests left the batch and the queue
    deadline = time.time() + 60
    while True:
        ok = chat(c, "base", "Say hi", max_tokens=4)
        assert ok.status_code in (200, 503), ok.text
        if ok.status_code == 200 and loop_metric(c, "cancelled") >= cancelled_before + 4:
            break
        assert time.time() < deadline, (ok.status_code, loop_metric(c, "cancelled"))
        time.sleep(0.5)
    assert loop_metric(c, "running") <= 1 and loop_metric(c, "waiting") == 0


def test_metrics_exported(service):
    c = service["client"]
    chat(c, "alpha", "ping")
    text = c.get("/metrics").text
    for name in ("hilora_request_latency_seconds", "hilora_routing_latency_seconds", "hilora_tokens_total",
                 "hilora_candidates_per_request", "hilora_adapter_cache_events", "hilora_adapters_resident",
                 "hilora_generation_loop"):
        assert name in text, name
    requests = [line for line in text.splitlines()
                if line.startswith("hilora_adapter{") and 'adapter="alpha"' in line and 'quantity="requests"' in line]
    assert requests and float(requests[0].rsplit(" ", 1)[1]) >= 1  # per-adapter heat


def test_replica_restart_loses_nothing(service):
    import ray

    c = service["client"]
    before = {a["id"] for a in c.get("/admin/adapters", headers=AUTH).json()["adapters"]}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"] if isinstance(actor, dict) else actor
        if "LoRAModel" in name or "RegistryService" in name:
            ray.kill(ray.get_actor(name, namespace=actor.get("namespace", "serve") if isinstance(actor, dict)
                                   else "serve"), no_restart=False)
    deadline = time.time() + 120
    while True:
        r = chat(c, "beta", "hello", max_tokens=4)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(2)
    assert r.status_code == 200, r.text
    assert {a["id"] for a in c.get("/admin/adapters", headers=AUTH).json()["adapters"]} == before


def test_batch_registration_reports_each_adapter(service):
    c = service["client"]
    gamma = {"id": "gamma", "source": service["beta"], "samples": BETA_SAMPLES, "tags": ["batch"]}
    taken = {"id": "alpha", "source": service["alpha"], "samples": ALPHA_SAMPLES}
    r = c.post("/admin/adapters/batch", json={"adapters": [gamma, taken]}, headers=AUTH)
    assert r.status_code == 207, r.text
    body = r.json()
    assert [a["id"] for a in body["created"]] == ["gamma"] and body["created"][0]["tags"] == ["batch"]
    assert body["errors"][0]["id"] == "alpha" and body["errors"][0]["status"] == 409
    assert c.get("/admin/adapters/gamma", headers=AUTH).json()["sample_count"] == len(BETA_SAMPLES)
    routes = c.post("/v1/route", json={"input": ["Reverse the letters of the word 'planet'."]}).json()["data"]
    assert set(routes[0]["adapters"]) & {"beta", "gamma"}  # routable at once
    r = c.post("/admin/adapters/batch", json={"adapters": [gamma, gamma]}, headers=AUTH)
    assert r.status_code == 422 and "repeat" in r.text
    assert c.post("/admin/adapters/batch", json={"adapters": [gamma]}).status_code == 401
    assert c.delete("/admin/adapters/gamma", headers=AUTH).status_code == 200


def test_delete_adapter(service):
    c = service["client"]
    r = c.delete("/admin/adapters/beta", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert chat(c, "beta", "x").status_code == 404
    assert os.path.isdir(service["beta"])  # weights are the user's: never deleted


def test_a_stream_that_fails_after_its_headers_ends_with_an_in_band_error_event():
    import asyncio

    from deployments.streaming import merge_streams, sse_events

    async def items():
        yield {"delta": "Hel"}
        yield {"delta": ""}  # nothing new: no event
        raise RuntimeError("Traceback (most recent call last): ...\nCapacityError: no free adapter slot")

    def render(index, item, first):
        return json.dumps({"delta": item["delta"], "first": first}) if item["delta"] else None

    async def collect():
        return [line async for line in sse_events(merge_streams([(0, items())]), render)]

    out = asyncio.run(collect())
    assert len(out) == 3 and json.loads(out[0]) == {"delta": "Hel", "first": True}
    assert json.loads(out[1].removeprefix("data: "))["error"]["message"] == "CapacityError: no free adapter slot"
    assert out[2] == "data: [DONE]\n\n"


def test_capacity_errors_map_to_retry_or_refuse():
    from ray.exceptions import RayTaskError

    from deployments.errors import status_for
    from hilora_core.errors import CapacityError, PlanTooLargeError, QueueFullError

    assert status_for(PlanTooLargeError("needs 300 MiB; the budget is 256 MiB")) == 422  # can never fit
    assert status_for(QueueFullError("queue full")) == 503  # busy: retry
    assert status_for(CapacityError("held by pinned adapters")) == 503
    wrapped = RayTaskError("generate", "traceback", PlanTooLargeError("x"))  # as a deployment call raises it
    assert status_for(wrapped) == 422
