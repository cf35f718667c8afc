"""Model replicas: the routed LLM with its two-tier adapter cache.

Requests arrive with a decision from the registry (a RoutingPlan plus where each
adapter's weights live). Adapters are registered with the engine on first
sight and their tensors loaded on demand.

Every request, streamed or not, is submitted to the engine's one generation loop
(:class:`hilora_core.engine.loop.GenerationLoop`); it joins the running batch at the next step and
leaves when it finishes. A client that goes away (the Serve call is cancelled, or the stream is
closed) cancels its request within one step. A full queue answers 503 (:class:`QueueFullError`).

Affinity: the ingress sends each request with ``multiplexed_model_id`` set to
its top adapter, so Serve prefers a replica that already served that adapter;
any replica can still serve any plan.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import torch
from ray import serve

from hilora_core.engine.generation import StreamEvent, TokenLogprob
from hilora_core.engine.requests import Item, SequenceHandle, SequenceRequest
from hilora_core.engine.routed_lm import RoutedLM
from hilora_core.engine.threads import use_torch_threads
from hilora_core.errors import InvalidInputError
from hilora_core.models.chat_turns import UserTurnMarkers, last_user_turn, user_turn_markers

from .config import AppConfig
from .contracts import (
    AdapterLocation,
    GenerateCall,
    GenerationChunk,
    GenerationReply,
    LogprobEntry,
    ReplicaStats,
    StreamStarted,
    TokenEntry,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_and_dtype(cfg: AppConfig) -> tuple[str, torch.dtype]:
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = _DTYPES[cfg.model.dtype]
    return device, dtype


def generation_threads(cfg: AppConfig) -> int:
    """torch CPU threads of the thread that generates: ``model.torch_threads``, else torch's default."""
    return cfg.model.torch_threads or torch.get_num_threads()


def build_engine(cfg: AppConfig) -> RoutedLM:
    """The replica's engine from the config (device, dtype, cache sizes).

    Loads with one torch thread in the calling thread. Every thread that has run a parallel op keeps
    its OpenMP team: a loading team of N threads beside the generation thread's team of N
    oversubscribes the cores, and OpenMP then wakes its workers by syscall on every op (measured with
    ``benchmarks/thread_teams.py``, ``docs/load-test.md``). Generation threads set their own count
    (:func:`generation_threads`) with :func:`use_torch_threads`, which no other thread can undo.
    """
    use_torch_threads(1)
    device, dtype = _device_and_dtype(cfg)
    return RoutedLM.from_pretrained(
        cfg.model.base, device=device, dtype=dtype, settings=cfg.model.engine,
    )


ADAPTER_METRICS_TOP_K = 20  # adapters exported by name in /metrics; the rest are summed as "other"


class ModelReplica:
    """A model replica (the plain class; :data:`LoRAModel` is its Serve deployment).

    Args:
        config: the application config (``AppConfig`` as a dict).
        engine: the :class:`RoutedLM` to serve (default: :func:`build_engine` from ``config``).
    """

    def __init__(self, config: dict, engine: RoutedLM | None = None) -> None:
        cfg = AppConfig.model_validate(config)
        self.threads = generation_threads(cfg)  # read before build_engine sets this thread to one
        self.lm = engine if engine is not None else build_engine(cfg)
        self.user_markers = user_turn_markers(self.lm.tokenizer)
        self.replica = f"{os.getpid()}"
        self._known: dict[str, tuple[str, str | None]] = {}
        self._adapters_lock = threading.Lock()
        self.loop = self.lm.start_loop(cfg.model.loop, threads=self.threads)

    # ---- adapters --------------------------------------------------------------------------

    def _ensure_adapters(self, sources: dict[str, AdapterLocation]) -> None:
        """Register unseen adapters (or ones whose source changed) with the engine."""
        with self._adapters_lock:
            for name, src in sources.items():
                key = (src.location, src.revision)
                if self._known.get(name) == key:
                    continue
                if name in self.lm.adapters:
                    self.lm.remove_adapter(name)
                self.lm.add_adapter(name, src.location, revision=src.revision)
                self._known[name] = key

    @serve.multiplexed(max_num_models_per_replica=64)
    async def _affinity(self, adapter_id: str) -> str:
        # Serve tracks which ids each replica has served and routes matching requests here.
        return adapter_id

    async def _note_affinity(self) -> None:
        mid = serve.get_multiplexed_model_id()
        if mid:
            await self._affinity(mid)

    # ---- helpers ---------------------------------------------------------------------------

    def _prompt(self, req: GenerateCall) -> str:
        if req.messages is not None:
            return self.lm.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        if req.prompt is None:
            raise InvalidInputError("a generate call needs a prompt, prompt ids or messages")
        return req.prompt

    def _prompt_ids(self, req: GenerateCall) -> list[int]:
        """Token ids as :meth:`RoutedLM.encode` makes them (chat: the template's text, no extra specials)."""
        if req.prompt_ids is not None:
            vocab = len(self.lm.tokenizer)
            bad = [t for t in req.prompt_ids if not 0 <= t < vocab]
            if bad or not req.prompt_ids:
                raise InvalidInputError(f"prompt token ids must be in [0, {vocab}), got {bad[:5] or 'none'}")
            return list(req.prompt_ids)
        text = self._prompt(req)
        return list(self.lm.tokenizer(text, add_special_tokens=req.messages is None)["input_ids"])

    def chat_markers(self) -> UserTurnMarkers | None:
        """How the base model's chat template opens and closes a user turn (None: no template)."""
        return self.user_markers

    def routing_text(self, token_ids: list[int]) -> str:
        """The text a prompt sent as token ids is routed on: its last user turn when the ids are a rendered
        chat prompt (as evaluation harnesses send), else its whole text."""
        vocab = len(self.lm.tokenizer)
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidInputError(f"prompt token ids must be in [0, {vocab})")
        rendered = self.lm.tokenizer.decode(token_ids, skip_special_tokens=False)
        return last_user_turn(rendered, self.user_markers) or self.lm.tokenizer.decode(token_ids,
                                                                                     skip_special_tokens=True)

    def _prompt_entries(self, ids: list[int], entries: list[TokenLogprob | None]) -> list[LogprobEntry]:
        """The prompt tokens' logprob entries (``echo``); the first token has logprob None."""
        first = LogprobEntry(**self._token_fields(ids[0]), logprob=None)
        return [first] + [self._logprob(e) for e in entries[1:] if e is not None]

    def _token_fields(self, token_id: int) -> dict:
        """A token's ``token`` (text), ``bytes`` (UTF-8) and ``id``, as OpenAI reports them."""
        text = self.lm.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode("utf-8")), "id": token_id}

    def _logprob(self, entry: TokenLogprob) -> LogprobEntry:
        """One token's OpenAI-style logprob entry: token, logprob, bytes, top_logprobs."""
        return LogprobEntry(**self._token_fields(entry.token_id), logprob=entry.logprob,
                            top_logprobs=[TokenEntry(**self._token_fields(t), logprob=lp) for t, lp in entry.top])

    def residency(self) -> dict:
        """``{"replica", "adapters": {name: "device" | "host"}}``; adapters not listed are not loaded here."""
        return {"replica": self.replica, "adapters": self.lm.residency()}

    def stats(self) -> ReplicaStats:
        usage = self.lm.usage.top(ADAPTER_METRICS_TOP_K, self.lm.residency())
        return ReplicaStats(replica=self.replica, cache=self.lm.cache_stats(), loop=self.loop.stats(), adapters=usage)

    def _submit(self, req: GenerateCall, sink: Callable[[Item], None]) -> SequenceHandle:
        """Register the adapters and queue the request (adapter files are read here, off the event loop)."""
        use_torch_threads(1)  # a helper thread: no OpenMP team beside the loop's (see build_engine)
        self._ensure_adapters(req.sources)
        return self.loop.submit(SequenceRequest(
            self._prompt_ids(req), req.plan, max_new_tokens=req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed, stop=tuple(req.stop), logprobs=req.logprobs,
            prompt_logprobs=req.echo_logprobs, ignore_eos=req.ignore_eos), sink)

    async def _events(self, req: GenerateCall) -> AsyncGenerator[StreamEvent | None, None]:
        """Submit to the loop; yield None once queued, then its events. Cancelling or closing this generator
        (the caller went away) cancels the request in the loop."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Item] = asyncio.Queue()

        def sink(item: Item) -> None:  # called on the loop's thread
            loop.call_soon_threadsafe(items.put_nowait, item)

        handle = await asyncio.to_thread(self._submit, req, sink)
        try:
            yield None
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            handle.cancel()

    # ---- generation ------------------------------------------------------------------------

    async def _chunks(self, req: GenerateCall) -> AsyncGenerator[StreamStarted | GenerationChunk, None]:
        """:class:`StreamStarted`, then the loop's events as chunks; the first chunk of an echo request adds
        ``prompt_logprobs`` and ``prompt_text``, the finishing one the replica's stats."""
        started = time.perf_counter()
        async with aclosing(self._events(req)) as events:  # closing this closes the request's events now
            async for ev in events:
                if ev is None:
                    yield StreamStarted()
                    continue
                chunk = GenerationChunk(delta=ev.delta, prompt_tokens=ev.prompt_tokens,
                                        completion_tokens=ev.completion_tokens)
                if ev.logprobs is not None:
                    chunk.logprobs = [self._logprob(t) for t in ev.logprobs]
                if ev.prompt_logprobs is not None:
                    ids = self._prompt_ids(req)
                    chunk.prompt_logprobs = self._prompt_entries(ids, ev.prompt_logprobs)
                    chunk.prompt_text = self.lm.tokenizer.decode(ids, skip_special_tokens=False)
                if ev.finished:
                    chunk.finish_reason = ev.finish_reason
                    chunk.seconds = time.perf_counter() - started
                    chunk.stats = self.stats()
                yield chunk

    async def generate(self, req: GenerateCall) -> GenerationReply:
        """One request, whole."""
        await self._note_affinity()
        text: list[str] = []
        logprobs: list[LogprobEntry] = []
        first = last = None
        async with aclosing(self._chunks(req)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, StreamStarted):
                    continue
                first = first or chunk
                last = chunk
                text.append(chunk.delta)
                logprobs += chunk.logprobs or []
        assert first is not None and last is not None and last.stats is not None and last.seconds is not None
        return GenerationReply(
            text="".join(text), finish_reason=last.finish_reason or "length", prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens, logprobs=logprobs if req.logprobs is not None else None,
            prompt_logprobs=first.prompt_logprobs, prompt_text=first.prompt_text, seconds=last.seconds,
            stats=last.stats)

    async def stream(self, req: GenerateCall) -> AsyncGenerator[StreamStarted | GenerationChunk, None]:
        """:class:`StreamStarted` once queued, then :class:`GenerationChunk` items; the last one finishes."""
        await self._note_affinity()
        async with aclosing(self._chunks(req)) as chunks:
            async for chunk in chunks:
                yield chunk


LoRAModel = serve.deployment(ModelReplica, name="LoRAModel")
