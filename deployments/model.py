"""Model replicas: the routed LLM with its two-tier adapter cache.

Requests arrive with a decision from the registry (a RoutingPlan plus where each
adapter's weights live). Adapters are registered with the engine on first
sight and their tensors loaded on demand.

Scheduling (``model.scheduler``):
- ``continuous`` (default): every request, streamed or not, is submitted to the replica's
  one generation loop (:class:`hilora_core.engine.batching.ContinuousBatcher`); it joins the
  running batch at the next step and leaves when it finishes. A client that goes away
  (the Serve call is cancelled, or the stream is closed) cancels its request within one step.
  A full queue answers 503 (:class:`QueueFullError`).
- ``static``: the earlier path, kept to measure against: ``@serve.batch`` merges non-streaming
  requests into one batch that runs to its longest member, and streams run one at a time.

Affinity: the ingress sends each request with ``multiplexed_model_id`` set to
its top adapter, so Serve prefers a replica that already served that adapter;
any replica can still serve any plan.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import defaultdict
from contextlib import aclosing

import torch
from ray import serve

from hilora_core.engine import RoutedLM
from hilora_core.engine.batching import ContinuousBatcher, SequenceRequest
from hilora_core.engine.generation import TokenLogprob
from hilora_core.engine.threads import use_torch_threads
from hilora_core.errors import CapacityError, InvalidInputError
from hilora_core.models.chat_turns import UserTurnMarkers, last_user_turn, user_turn_markers

from .config import AppConfig
from .contracts import AdapterLocation, GenerateCall

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
    oversubscribes the cores, and OpenMP then wakes its workers by syscall on every op (1.65x slower
    generation on 2 cores: ``benchmarks/thread_teams.py``). Generation threads set their own count
    (:func:`generation_threads`) with :func:`use_torch_threads`, which no other thread can undo.
    """
    use_torch_threads(1)
    device, dtype = _device_and_dtype(cfg)
    return RoutedLM.from_pretrained(
        cfg.model.base, device=device, dtype=dtype, max_slots=cfg.model.max_slots,
        host_cache_size=cfg.model.host_cache_size, max_rank=cfg.model.max_rank,
        max_adapter_bytes=cfg.model.max_adapter_bytes,
    )


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
        self._engine_lock = threading.Lock()  # static scheduler only
        self.batcher = ContinuousBatcher(self.lm, cfg.model.batching(), threads=self.threads) \
            if cfg.model.scheduler == "continuous" else None
        self._generate_batch.set_max_batch_size(cfg.model.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(cfg.model.batch_wait_timeout_s)

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

    def _prompt_entries(self, ids: list[int], entries) -> list[dict]:
        """The prompt tokens' logprob entries (``echo``); the first token has logprob None."""
        out = [self._token(ids[0]) | {"logprob": None, "top_logprobs": []}]
        return out + [self._logprob(e) for e in entries[1:]]

    def _token(self, token_id: int) -> dict:
        text = self.lm.tokenizer.decode([token_id])
        return {"token": text, "bytes": list(text.encode("utf-8")), "id": token_id}

    def _logprob(self, entry: TokenLogprob | None) -> dict | None:
        """One token's OpenAI-style logprob entry: token, logprob, bytes, top_logprobs."""
        if entry is None:
            return None
        out = self._token(entry.token_id) | {"logprob": entry.logprob}
        out["top_logprobs"] = [self._token(t) | {"logprob": lp} for t, lp in entry.top]
        return out

    def residency(self) -> dict:
        """``{"replica", "adapters": {name: "device" | "host"}}``; adapters not listed are not loaded here."""
        return {"replica": self.replica, "adapters": self.lm.residency()}

    def stats(self) -> dict:
        out = {"replica": self.replica, "cache": self.lm.cache_stats()}
        if self.batcher is not None:
            out["batching"] = self.batcher.stats()
        return out

    def _submit(self, req: GenerateCall, sink):
        """Register the adapters and queue the request (adapter files are read here, off the event loop)."""
        use_torch_threads(1)  # a helper thread: no OpenMP team beside the loop's (see build_engine)
        self._ensure_adapters(req.sources)
        return self.batcher.submit(SequenceRequest(
            self._prompt_ids(req), req.routing_plan(), max_new_tokens=req.max_tokens, temperature=req.temperature,
            top_p=req.top_p, seed=req.seed, stop=tuple(req.stop), logprobs=req.logprobs,
            prompt_logprobs=req.echo_logprobs, ignore_eos=req.ignore_eos), sink)

    async def _events(self, req: GenerateCall):
        """Submit to the loop; yield ``"start"``, then its events. Cancelling or closing this generator
        (the caller went away) cancels the request in the loop."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        handle = await asyncio.to_thread(self._submit, req, lambda item: loop.call_soon_threadsafe(items.put_nowait,
                                                                                                  item))
        try:
            yield "start"
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

    async def _items(self, req: GenerateCall):
        """The loop's events as plain items: ``{"event": "start"}``, then ``{"delta", "logprobs"?}``; the first
        item of an echo request adds ``prompt_logprobs`` and ``prompt_text``, the last one the summary
        (finish_reason, token counts, :meth:`stats`, seconds)."""
        started = time.perf_counter()
        async with aclosing(self._events(req)) as events:  # closing this closes the request's events now
            async for ev in events:
                if ev == "start":
                    yield {"event": "start"}
                    continue
                item = {"delta": ev.delta, "prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens}
                if ev.logprobs is not None:
                    item["logprobs"] = [self._logprob(t) for t in ev.logprobs]
                if ev.prompt_logprobs is not None:
                    ids = self._prompt_ids(req)
                    item["prompt_logprobs"] = self._prompt_entries(ids, ev.prompt_logprobs)
                    item["prompt_text"] = self.lm.tokenizer.decode(ids, skip_special_tokens=False)
                if ev.finished:
                    item.update(finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                                completion_tokens=ev.completion_tokens, **self.stats(),
                                seconds=time.perf_counter() - started)
                yield item

    async def generate(self, req: GenerateCall) -> dict:
        """One request -> {text, finish_reason, prompt_tokens, completion_tokens, logprobs?, prompt_logprobs?,
        prompt_text?, replica, cache, batching, seconds}."""
        await self._note_affinity()
        if self.batcher is None:
            self._static_check(req)
            result = await self._generate_batch(req)
            if "error" in result:
                raise result["error"]
            return result
        text, logprobs, out = [], [], {}
        async with aclosing(self._items(req)) as items:
            async for item in items:
                if item.get("event") == "start":
                    continue
                text.append(item.pop("delta"))
                logprobs += item.pop("logprobs", None) or []
                out.update(item)
        out["text"] = "".join(text)
        if req.logprobs is not None:
            out["logprobs"] = logprobs
        return out

    async def stream(self, req: GenerateCall):
        """Yields {"event": "start"}, then {"delta": str, "logprobs"?} chunks, then a final summary dict."""
        await self._note_affinity()
        if self.batcher is None:
            self._static_check(req)
            async for item in self._static_stream(req):
                yield item
            return
        async with aclosing(self._items(req)) as items:
            async for item in items:
                yield item

    # ---- the static scheduler (the earlier path, for comparison) ----------------------------------

    @staticmethod
    def _static_check(req: GenerateCall) -> None:
        if req.logprobs is not None or req.echo_logprobs:
            raise InvalidInputError("logprobs and echo need model.scheduler 'continuous'")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, reqs: list[GenerateCall]) -> list[dict]:
        return await asyncio.to_thread(self.run_batch, reqs)
    def run_batch(self, reqs: list[GenerateCall]) -> list[dict]:
        """Run calls as mixed engine batches (one per seed); results in request order.

        A failed engine call gives ``{"error": exception}`` to its requests; a batch whose plans
        together need more adapters than the device slots is split into single requests.
        """
        use_torch_threads(self.threads)  # this worker thread generates (see build_engine)
        out: list[dict] = [{} for _ in reqs]
        # requests with different seeds cannot share one sampling generator: one engine call per seed
        # (and per ignore_eos, a setting of the whole call)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            groups[(r.seed, r.ignore_eos)].append(i)
        with self._engine_lock:
            for (seed, _), idx in groups.items():
                try:
                    results = self._generate_group(reqs, idx, seed)
                except CapacityError:
                    if len(idx) == 1:
                        out[idx[0]] = {"error": CapacityError(
                            f"plan needs more distinct adapters than the replica's {self.lm.settings.max_slots} slots")}
                        continue
                    # the union of the plans does not fit the device slots: run the requests one by one
                    results = []
                    for i in idx:
                        try:
                            results.extend(self._generate_group(reqs, [i], seed))
                        except Exception as err:  # noqa: BLE001 - handed back to that caller
                            results.append(err)
                except Exception as err:  # noqa: BLE001 - handed back to each caller of the group
                    results = [err] * len(idx)
                stats = self.lm.cache_stats()
                for i, res in zip(idx, results, strict=True):
                    if isinstance(res, BaseException):
                        out[i] = {"error": res}
                        continue
                    out[i] = {"text": res.text, "finish_reason": res.finish_reason,
                              "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                              "replica": self.replica, "cache": stats}
        return out

    def _generate_group(self, reqs: list[GenerateCall], idx: list[int], seed: int | None) -> list:
        """One engine call for the requests ``idx`` (same seed): a mixed batch of their plans."""
        for i in idx:
            self._ensure_adapters(reqs[i].sources)
        return self.lm.generate_detailed(
            [self._prompt(reqs[i]) for i in idx], [reqs[i].routing_plan() for i in idx],
            max_new_tokens=[reqs[i].max_tokens for i in idx], temperature=[reqs[i].temperature for i in idx],
            top_p=[reqs[i].top_p for i in idx], seed=seed, stop=[tuple(reqs[i].stop) for i in idx],
            ignore_eos=reqs[idx[0]].ignore_eos,
        )

    async def _static_stream(self, req: GenerateCall):
        """The static scheduler's stream: the whole generation holds the engine."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def run() -> None:
            use_torch_threads(self.threads)  # this worker thread generates (see build_engine)
            try:
                with self._engine_lock:
                    self._ensure_adapters(req.sources)
                    loop.call_soon_threadsafe(queue.put_nowait, {"event": "start"})
                    events = self.lm.stream(
                        [self._prompt(req)], [req.routing_plan()], max_new_tokens=req.max_tokens,
                        temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=[tuple(req.stop)],
                        ignore_eos=req.ignore_eos,
                    )
                    for ev in events:
                        item = {"delta": ev.delta}
                        if ev.finished:
                            item.update(finish_reason=ev.finish_reason, prompt_tokens=ev.prompt_tokens,
                                        completion_tokens=ev.completion_tokens, replica=self.replica,
                                        cache=self.lm.cache_stats())
                        loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as err:  # noqa: BLE001 - re-raised in the caller's task below
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, done)

        worker = threading.Thread(target=run, name="hilora-stream", daemon=True)
        started = time.perf_counter()
        worker.start()
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            if item.get("finish_reason") is not None:
                item["seconds"] = time.perf_counter() - started
            yield item


LoRAModel = serve.deployment(ModelReplica, name="LoRAModel")
