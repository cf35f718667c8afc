"""HTTP ingress: the OpenAI-compatible API, routing, admin and health endpoints.

The request path is one way: ingress -> Embedder -> RegistryService (plan) ->
LoRAModel (generation) -> response. Client mistakes become 4xx JSON errors
(``{"detail": ...}``); see ``deployments/errors.py`` for the mapping.
"""


import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from .auth import check_admin
from .config import AppConfig
from .contracts import Decision, GenerateCall
from .errors import message_of, to_http
from .metrics import ServiceMetrics
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    RegisterAdapterRequest,
    RouteRequest,
    RoutingOverrides,
)


async def sse_events(items: AsyncIterator[dict], chunk: Callable[..., str], on_final: Callable[[dict], dict],
                     after_final: Callable[[dict], str | None] | None = None) -> AsyncIterator[str]:
    """Server-sent events from a replica's stream items, ``data: [DONE]`` last.

    ``chunk(delta, finish_reason, extra, role)`` formats one event; the final item's event carries
    ``on_final(item)`` (the routing), and ``after_final(item)`` may add one more event (the usage
    chunk of ``stream_options.include_usage``). The response headers are already sent when the
    replica fails, so a failure becomes one in-band ``{"error": {"message": ...}}`` event before ``[DONE]``.
    """
    first = True
    try:
        async for item in items:
            if item.get("finish_reason") is not None:
                yield chunk(item["delta"], item["finish_reason"], on_final(item), role=first)
                extra = after_final(item) if after_final is not None else None
                if extra:
                    yield extra
            elif item["delta"]:
                yield chunk(item["delta"], None, role=first)
            else:
                continue
            first = False
    except Exception as err:  # noqa: BLE001 - headers are sent: report in-band
        yield f"data: {json.dumps({'error': {'message': message_of(err)}})}\n\n"
    yield "data: [DONE]\n\n"


app = FastAPI(title="HiLoRA Serve", version="0.1.0",
              description="Serve a pool of LoRA adapters with training-free hierarchical routing.")


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, registry: DeploymentHandle, model: DeploymentHandle,
                 config: dict) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.embedder, self.registry, self.model = embedder, registry, model
        self.metrics = ServiceMetrics()

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    async def _remote(response):
        """Await a deployment call; typed errors raised there become 4xx here."""
        try:
            return await response
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - to_http re-raises anything unexpected
            raise to_http(err) from None

    def _check_admin(self, authorization: str | None) -> None:
        check_admin(self.cfg.admin_token(), authorization, self.cfg.admin_token_env)

    def _policy(self, overrides: RoutingOverrides | None) -> dict:
        r = self.cfg.routing
        policy = {"name": r.policy, "gamma": r.gamma, "max_candidates": r.max_candidates, "seed": r.seed,
                  "fallback": r.fallback}
        if overrides is not None:
            o = overrides.model_dump(exclude_none=True)
            if "policy" in o:
                policy["name"] = o.pop("policy")
            policy.update(o)
        if policy["name"] == "explicit":
            raise HTTPException(422, "policy 'explicit' is chosen by naming an adapter in `model`")
        return policy

    def _check_limits(self, text_len: int, max_tokens: int, stop) -> None:
        lim = self.cfg.limits
        if text_len > lim.max_prompt_chars:
            raise HTTPException(413, f"prompt has {text_len} characters; the limit is {lim.max_prompt_chars}")
        if max_tokens > lim.max_tokens:
            raise HTTPException(422, f"max_tokens={max_tokens} is above the limit {lim.max_tokens}")
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > lim.max_stop:
            raise HTTPException(422, f"{len(stops)} stop sequences; the limit is {lim.max_stop}")

    async def _decide(self, model: str, text: str, overrides: RoutingOverrides | None) -> Decision:
        """The routing decision for one request, by the `model` field."""
        t0 = time.perf_counter()
        try:
            if model == self.cfg.routing.model_alias:
                z = await self.embedder.embed.remote([text])
                decision = (await self.registry.route.remote(z, self._policy(overrides)))[0]
            elif model == self.cfg.base_model_name:
                decision = Decision.base_model()
            else:
                decision = await self.registry.explicit.remote(model)
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - typed errors become 4xx, others propagate
            raise to_http(err) from None
        self.metrics.routing_latency.observe(time.perf_counter() - t0)
        self.metrics.candidates.observe(len(decision.plan["adapters"]))
        return decision

    def _model_call(self, decision: Decision, body, prompt: str | None, messages: list | None) -> GenerateCall:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        return GenerateCall(plan=decision.plan, sources=decision.sources, prompt=prompt, messages=messages,
                            max_tokens=body.new_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=stop)

    def _handle(self, decision: Decision):
        adapters = decision.plan["adapters"]
        return self.model.options(multiplexed_model_id=adapters[0]) if adapters else self.model

    async def _generate(self, body, prompt: str | None, messages: list | None, route_text: str, kind: str,
                        text_len: int):
        started = time.perf_counter()
        self._check_limits(text_len, body.new_tokens, body.stop)
        decision = await self._decide(body.model, route_text, body.routing)
        call = self._model_call(decision, body, prompt, messages)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await self._stream(call, decision, body.model, rid, kind, started, include_usage)
        result = await self._remote(self._handle(decision).generate.remote(call))
        self.metrics.observe_cache(result["replica"], result["cache"])
        self.metrics.observe_batching(result["replica"], result.get("batching"))
        self.metrics.tokens.labels("prompt").inc(result["prompt_tokens"])
        self.metrics.tokens.labels("completion").inc(result["completion_tokens"])
        self.metrics.request_latency.labels(kind).observe(time.perf_counter() - started)
        usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                 "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "finish_reason": result["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": body.model, "choices": [choice],
                "usage": usage, "routing": decision.summary()}

    async def _stream(self, call: GenerateCall, decision: Decision, model: str, rid: str, kind: str, started: float,
                      include_usage: bool = False):
        gen = self._handle(decision).options(stream=True).stream.remote(call)
        try:
            first = await gen.__anext__()  # adapters loaded: errors so far are still a clean 4xx
        except Exception as err:  # noqa: BLE001
            raise to_http(err) from None
        assert first.get("event") == "start", first
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        created = int(time.time())

        last_text = [None]

        def chunk(delta: str, finish: str | None, extra: dict | None = None, role: bool = False) -> str:
            if delta:
                now = time.perf_counter()
                hist = self.metrics.ttft if last_text[0] is None else self.metrics.itl
                hist.labels(kind).observe(now - (started if last_text[0] is None else last_text[0]))
                last_text[0] = now
            if kind == "chat":
                d = {"role": "assistant", "content": delta} if role else {"content": delta}
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            body.update(extra or {})
            return f"data: {json.dumps(body)}\n\n"

        def on_final(item: dict) -> dict:
            self.metrics.observe_cache(item["replica"], item["cache"])
            self.metrics.observe_batching(item["replica"], item.get("batching"))
            self.metrics.tokens.labels("prompt").inc(item["prompt_tokens"])
            self.metrics.tokens.labels("completion").inc(item["completion_tokens"])
            return {"routing": decision.summary()}

        def usage_chunk(item: dict) -> str | None:
            if not include_usage:
                return None
            usage = {"prompt_tokens": item["prompt_tokens"], "completion_tokens": item["completion_tokens"],
                     "total_tokens": item["prompt_tokens"] + item["completion_tokens"]}
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            async for line in sse_events(gen, chunk, on_final, usage_chunk):
                yield line
            self.metrics.request_latency.labels(kind).observe(time.perf_counter() - started)

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- OpenAI-compatible API ---------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise HTTPException(422, f"send one prompt per request, got {len(prompts)}")
        return await self._generate(body, prompts[0], None, prompts[0], "completion", len(prompts[0]))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        if len(body.messages) > self.cfg.limits.max_messages:
            raise HTTPException(422, f"{len(body.messages)} messages; the limit is {self.cfg.limits.max_messages}")
        users = [m.text for m in body.messages if m.role == "user"]
        if not users:
            raise HTTPException(422, "a chat request needs at least one user message")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        total = sum(len(m.text) for m in body.messages)
        return await self._generate(body, None, messages, users[-1], "chat", total)

    @app.get("/v1/models")
    async def models(self):
        page = await self._remote(self.registry.list.remote(0, 1000))
        now = int(time.time())
        items = [{"id": self.cfg.routing.model_alias, "object": "model", "created": now, "owned_by": "hilora",
                  "description": "automatic HiLoRA routing over the adapter pool"},
                 {"id": self.cfg.base_model_name, "object": "model", "created": now, "owned_by": "hilora",
                  "description": "the base model alone"}]
        items += [{"id": a["id"], "object": "model", "created": int(a["created"]), "owned_by": "hilora",
                   "description": "a single LoRA adapter"} for a in page["adapters"]]
        return {"object": "list", "data": items}

    @app.post("/v1/route")
    async def route(self, body: RouteRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > 64:
            raise HTTPException(422, f"send 1 to 64 inputs, got {len(texts)}")
        for t in texts:
            self._check_limits(len(t), 1, None)
        t0 = time.perf_counter()
        try:
            z = await self.embedder.embed.remote(texts)
            decisions = await self.registry.route.remote(z, self._policy(body.routing))
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001
            raise to_http(err) from None
        self.metrics.routing_latency.observe(time.perf_counter() - t0)
        return {"object": "list", "data": [d.summary() for d in decisions]}

    # ---- admin -------------------------------------------------------------------------------

    @app.post("/admin/adapters", status_code=201)
    async def register_adapter(self, body: RegisterAdapterRequest, authorization: str | None = Header(None)):
        self._check_admin(authorization)
        await self._remote(self.registry.check_free.remote(body.id, body.replace))
        identity = await self._remote(self.embedder.identity.remote())
        z = await self._remote(self.embedder.embed.remote(body.samples))
        return await self._remote(self.registry.register.remote(body.model_dump(), z, identity))

    @app.get("/admin/adapters")
    async def list_adapters(self, offset: int = 0, limit: int = 100, authorization: str | None = Header(None)):
        self._check_admin(authorization)
        if offset < 0 or not 1 <= limit <= 1000:
            raise HTTPException(422, f"need offset >= 0 and 1 <= limit <= 1000, got offset={offset} limit={limit}")
        return await self._remote(self.registry.list.remote(offset, limit))

    @app.get("/admin/adapters/{adapter_id}")
    async def get_adapter(self, adapter_id: str, authorization: str | None = Header(None)):
        self._check_admin(authorization)
        return await self._remote(self.registry.get.remote(adapter_id))

    @app.delete("/admin/adapters/{adapter_id}")
    async def delete_adapter(self, adapter_id: str, authorization: str | None = Header(None)):
        self._check_admin(authorization)
        return await self._remote(self.registry.remove.remote(adapter_id))

    # ---- health ------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/health")
    async def health(self):
        """The common name of the liveness check (benchmark clients call it first)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        status = await self.registry.status.remote()
        ready = not status["degraded"]
        body = {"status": "ready" if ready else "degraded", "registry": status}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(self):
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

