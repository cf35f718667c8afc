"""HTTP ingress: the OpenAI-compatible API, routing, admin and health endpoints.

The request path is one way: ingress -> Embedder -> RegistryService (plan) ->
LoRAModel (generation) -> response. Client mistakes become 4xx JSON errors
(``{"detail": ...}``); see ``deployments/errors.py`` for the mapping.
"""


import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, HTTPException, Path, Query, Security
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.serve.handle import DeploymentHandle

from hilora_core.models.chat_turns import UserTurnMarkers, last_user_turn

from .auth import ADMIN_BEARER, check_admin
from .config import AppConfig
from .contracts import Decision, GenerateCall, GenerationReply, StreamStarted
from .errors import declared, http_errors, install_error_handlers
from .metrics import ServiceMetrics
from .openai_format import Completion, Kind, Timing, Usage, choice
from .schemas import (
    ADAPTER_ID,
    MAX_BATCH_SAMPLES,
    ChatCompletionRequest,
    CompletionRequest,
    RegisterAdapterRequest,
    RegisterAdaptersRequest,
    RouteRequest,
    RoutingOverrides,
)
from .streaming import StreamState, merge_streams, sse_events


@dataclass
class PromptInput:
    """One prompt of a request: text, token ids or chat messages, and the text it is routed on."""

    route_text: str
    chars: int
    text: str | None = None
    ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None


T = TypeVar("T")
app = FastAPI(title="HiLoRA Serve", version="0.1.0",
              description="Serve a pool of LoRA adapters with training-free hierarchical routing. Every error "
                          "response has one body: `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.")
install_error_handlers(app)

# A generation route answers JSON, or server-sent events when the body has "stream": true.
GENERATION_RESPONSES = {200: {"description": "the completion; with `stream: true`, server-sent events ending "
                                             "with `data: [DONE]`",
                              "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
                        **declared(400, 404, 413, 422, 503, 504)}
UI_DIR = FilePath(__file__).with_name("ui")  # the playground at /ui: plain HTML, CSS and JS, no build step
UI_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
AdminToken = Annotated[HTTPAuthorizationCredentials | None, Security(ADMIN_BEARER)]
AdapterId = Annotated[str, Path(pattern=ADAPTER_ID, description="an adapter id")]


def _token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, embedder: DeploymentHandle, registry: DeploymentHandle, model: DeploymentHandle,
                 config: dict) -> None:
        self.cfg = AppConfig.model_validate(config)
        self.embedder, self.registry, self.model = embedder, registry, model
        self.metrics = ServiceMetrics()
        self._markers: UserTurnMarkers | None = None
        self._markers_known = False

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    async def _remote(response: Awaitable[T]) -> T:
        """Await a deployment call; typed errors raised there become 4xx here (:func:`http_errors`)."""
        with http_errors():
            return await response

    async def _chat_markers(self) -> UserTurnMarkers | None:
        """The base model's user-turn markers, asked of a model replica once."""
        if not self._markers_known:
            self._markers = await self._remote(self.model.chat_markers.remote())
            self._markers_known = True
        return self._markers

    def _check_admin(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        check_admin(self.cfg.admin_token(), _token(credentials), self.cfg.admin_token_env)

    def _policy(self, overrides: RoutingOverrides | None) -> dict:
        r = self.cfg.routing
        policy = {"name": r.policy, "gamma": r.gamma, "max_candidates": r.max_candidates, "seed": r.seed,
                  "fallback": r.fallback}
        if overrides is not None:
            o = overrides.model_dump(exclude_none=True)
            if "policy" in o:
                policy["name"] = o.pop("policy")
            policy.update(o)
        return policy

    def _check_limits(self, text_len: int, max_tokens: int) -> None:
        lim = self.cfg.limits
        if text_len > lim.max_prompt_chars:
            raise HTTPException(413, f"prompt has {text_len} characters; the limit is {lim.max_prompt_chars}")
        if max_tokens > lim.max_tokens:
            raise HTTPException(422, f"max_tokens={max_tokens} is above the limit {lim.max_tokens}")

    async def _decide(self, model: str, text: str, overrides: RoutingOverrides | None) -> Decision:
        """The routing decision for one request, by the `model` field."""
        t0 = time.perf_counter()
        if model == self.cfg.routing.model_alias:
            z = await self._remote(self.embedder.embed.remote([text]))
            decision: Decision = (await self._remote(self.registry.route.remote(z, self._policy(overrides))))[0]
        elif model == self.cfg.base_model_name:
            decision = Decision()  # model "base": no adapter
        else:
            decision = await self._remote(self.registry.explicit.remote(model))
        self.metrics.routing_latency.observe(time.perf_counter() - t0)
        self.metrics.candidates.observe(len(decision.plan.adapters))
        return decision

    def _model_call(self, decision: Decision, body, prompt: PromptInput, seed: int | None) -> GenerateCall:
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        logprobs, echo = body.logprob_count, body.echo_prompt
        return GenerateCall(plan=decision.plan, sources=decision.sources, prompt=prompt.text, prompt_ids=prompt.ids,
                            messages=prompt.messages, max_tokens=body.budget(self.cfg.limits.max_tokens),
                            temperature=body.temperature,
                            top_p=body.top_p, seed=seed, stop=stop, logprobs=logprobs,
                            echo_logprobs=echo and logprobs is not None, ignore_eos=body.ignore_eos)

    def _handle(self, decision: Decision):
        adapters = decision.plan.adapters
        return self.model.options(multiplexed_model_id=adapters[0]) if adapters else self.model

    async def _generate(self, body, prompts: list[PromptInput], kind: Kind):
        """Route every prompt once, run ``n`` choices per prompt on the model replicas, answer in OpenAI form."""
        started = time.perf_counter()
        if len(prompts) * body.n > self.cfg.limits.max_choices:
            raise HTTPException(422, f"{len(prompts)} prompts x n={body.n} choices; the limit is "
                                     f"{self.cfg.limits.max_choices}")
        for p in prompts:
            self._check_limits(p.chars, body.budget(self.cfg.limits.max_tokens))
        decisions = list(await asyncio.gather(*(self._decide(body.model, p.route_text, body.routing)
                                                for p in prompts)))
        routed = time.perf_counter()
        calls = []  # (choice index, prompt index, decision, call); choice i of a seeded request uses seed + i
        for pi, (p, d) in enumerate(zip(prompts, decisions, strict=True)):
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                calls.append((pi * body.n + j, pi, d, self._model_call(d, body, p, seed)))
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return await self._stream(calls, prompts, decisions, body, rid, kind, started, routed)
        results: list[GenerationReply] = await asyncio.gather(
            *(self._remote(self._handle(d).generate.remote(c)) for _, _, d, c in calls))
        choices = []
        for (index, pi, d, _), result in zip(calls, results, strict=True):
            self.metrics.observe_replica(result.stats)
            echo = (prompts[pi].text if prompts[pi].text is not None else result.prompt_text or "") \
                if body.echo_prompt else None
            choices.append(choice(kind, index, result, echo, d.summary() if len(prompts) > 1 else None))
        prompt_tokens = sum(results[i * body.n].prompt_tokens for i in range(len(prompts)))
        completion_tokens = sum(r.completion_tokens for r in results)
        self.metrics.tokens.labels("prompt").inc(prompt_tokens)
        self.metrics.tokens.labels("completion").inc(completion_tokens)
        self.metrics.request_latency.labels(kind).observe(time.perf_counter() - started)
        return Completion(id=rid, object="chat.completion" if kind == "chat" else "text_completion",
                          created=int(time.time()), model=body.model, choices=choices,
                          usage=Usage.of(prompt_tokens, completion_tokens), routing=decisions[0].summary(),
                          timing=Timing.since(started, routed)).model_dump()

    async def _stream(self, calls, prompts: list[PromptInput], decisions: list[Decision], body, rid: str, kind: Kind,
                      started: float, routed: float) -> StreamingResponse:
        gens = [(index, self._handle(d).options(stream=True).stream.remote(c)) for index, _, d, c in calls]
        try:
            with http_errors():  # adapters loaded and queued: errors so far are still a clean 4xx
                for _, gen in gens:
                    first = await gen.__anext__()
                    assert isinstance(first, StreamStarted), first
        except BaseException:
            for _, gen in gens:
                gen.cancel()
            raise
        opts = body.stream_options
        state = StreamState(
            kind=kind, base={"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                             "created": int(time.time()), "model": body.model},
            prompt_of={index: pi for index, pi, _, _ in calls}, decisions=decisions, echo=body.echo_prompt,
            echo_text=[p.text for p in prompts], include_usage=bool(opts and opts.include_usage),
            running_usage=bool(opts and opts.continuous_usage_stats), metrics=self.metrics, started=started,
            routed=routed)
        return StreamingResponse(sse_events(merge_streams(gens), state.render, state.closing),
                                 media_type="text/event-stream")

    # ---- OpenAI-compatible API ---------------------------------------------------------------

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(self, body: CompletionRequest):
        prompts = []
        routed = body.model == self.cfg.routing.model_alias
        for p in body.prompts():
            if isinstance(p, str):
                # a prompt rendered with the chat template is routed on its last user turn, as a chat request
                turn = last_user_turn(p, await self._chat_markers()) if routed else None
                prompts.append(PromptInput(route_text=turn or p, chars=len(p), text=p))
                continue
            text = await self._remote(self.model.routing_text.remote(p)) if routed else ""
            prompts.append(PromptInput(route_text=text, chars=len(p), ids=list(p)))
        return await self._generate(body, prompts, "completion")

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(self, body: ChatCompletionRequest):
        if len(body.messages) > self.cfg.limits.max_messages:
            raise HTTPException(422, f"{len(body.messages)} messages; the limit is {self.cfg.limits.max_messages}")
        users = [m.text for m in body.messages if m.role == "user"]
        if not users:
            raise HTTPException(422, "a chat request needs at least one user message")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        total = sum(len(m.text) for m in body.messages)
        return await self._generate(body, [PromptInput(route_text=users[-1], chars=total, messages=messages)], "chat")

    @app.get("/v1/models", responses=declared(503))
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

    @app.post("/v1/route", responses=declared(400, 413, 422, 503))
    async def route(self, body: RouteRequest):
        texts = [body.input] if isinstance(body.input, str) else body.input
        for t in texts:
            self._check_limits(len(t), 1)
        t0 = time.perf_counter()
        z = await self._remote(self.embedder.embed.remote(texts))
        decisions = await self._remote(self.registry.route.remote(z, self._policy(body.routing)))
        positions = await self._remote(self.registry.project.remote(z)) if body.position else None
        self.metrics.routing_latency.observe(time.perf_counter() - t0)
        data = [d.summary().model_dump() for d in decisions]
        for item, xy in zip(data, positions or [], strict=False):
            item["position"] = xy
        return {"object": "list", "data": data}

    @app.get("/v1/pool", responses=declared(422, 503))
    async def pool(self, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                   offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                   q: Annotated[str | None, Query(max_length=128)] = None,
                   tag: Annotated[str | None, Query(max_length=40)] = None):
        """The pool as the playground shows it, a page at a time: the adapters matching ``q`` (part of the id)
        and ``tag`` from ``offset``, each with its tags, rank, targets, sample count, place on the pool map
        (x, y) and residency on one model replica; every adapter's map point; the tags; the registry's epoch
        and whether it is degraded."""
        view = await self._remote(self.registry.pool_view.remote(limit, offset, q, tag))
        try:
            where = await self.model.residency.remote()
        except Exception:  # noqa: BLE001 - residency is informative; the pool is still shown
            where = {"replica": None, "adapters": {}}
        for a in view["adapters"]:
            a["residency"] = where["adapters"].get(a["id"], "not loaded")
        view["residency_of"] = where["replica"]
        return view

    # ---- admin -------------------------------------------------------------------------------

    @app.post("/admin/adapters", status_code=201, responses=declared(400, 401, 403, 409, 413, 422, 503))
    async def register_adapter(self, body: RegisterAdapterRequest,
                               authorization: AdminToken):
        self._check_admin(authorization)
        await self._remote(self.registry.check_free.remote(body.id, body.replace))
        identity = await self._remote(self.embedder.identity.remote())
        z = await self._remote(self.embedder.embed.remote(body.samples))
        return await self._remote(self.registry.register.remote(body.model_dump(), z, identity))

    @app.post("/admin/adapters/batch", status_code=201,
              responses={**declared(400, 401, 403, 413, 422, 503),
                         207: {"description": "some adapters were registered: each failure with its status and "
                                             "message in errors"}})
    async def register_adapters(self, body: RegisterAdaptersRequest, authorization: AdminToken):
        """Register up to 1,000 adapters at once: every sample is embedded in one call (batched by the
        embedder) and the pool catches up once."""
        self._check_admin(authorization)
        ids = [a.id for a in body.adapters]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise HTTPException(422, f"ids repeat within the batch: {repeated[:5]}")
        texts = [t for a in body.adapters for t in a.samples]
        if len(texts) > MAX_BATCH_SAMPLES:
            raise HTTPException(413, f"{len(texts)} samples in one batch; at most {MAX_BATCH_SAMPLES}")
        identity = await self._remote(self.embedder.identity.remote())
        z = await self._remote(self.embedder.embed.remote(texts))
        result = await self._remote(self.registry.register_many.remote([a.model_dump() for a in body.adapters], z,
                                                                       identity))
        return JSONResponse(result, status_code=201 if not result["errors"] else 207)

    @app.get("/admin/adapters", responses=declared(401, 403, 422, 503))
    async def list_adapters(self, authorization: AdminToken, offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        self._check_admin(authorization)
        return await self._remote(self.registry.list.remote(offset, limit))

    @app.get("/admin/adapters/{adapter_id}", responses=declared(401, 403, 404, 422, 503))
    async def get_adapter(self, adapter_id: AdapterId, authorization: AdminToken):
        self._check_admin(authorization)
        return await self._remote(self.registry.get.remote(adapter_id))

    @app.delete("/admin/adapters/{adapter_id}", responses=declared(401, 403, 404, 422, 503))
    async def delete_adapter(self, adapter_id: AdapterId, authorization: AdminToken):
        self._check_admin(authorization)
        return await self._remote(self.registry.remove.remote(adapter_id))

    # ---- the playground: static files; the page calls the public API above ----------------------

    @app.get("/", include_in_schema=False)
    async def home(self):
        return RedirectResponse("ui")

    @app.get("/ui", include_in_schema=False)
    async def ui(self):
        return FileResponse(UI_DIR / "index.html", media_type="text/html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(self, name: str):
        if name not in UI_FILES:
            raise HTTPException(404, f"no playground file {name!r}")
        return FileResponse(UI_DIR / name, media_type=UI_FILES[name])

    # ---- health ------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/health")
    async def health(self):
        """The common name of the liveness check (benchmark clients call it first)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "degraded: the registry is unreachable (same body as 200)",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def readyz(self):
        status = await self.registry.status.remote()
        ready = not status["degraded"]
        body = {"status": "ready" if ready else "degraded", "registry": status}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format 0.0.4"}})
    async def prometheus(self):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

