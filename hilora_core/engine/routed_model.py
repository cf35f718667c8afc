"""RoutedModel: one base causal LM serving many LoRA adapters, each sequence under its own routing plan.

    lm = RoutedModel.from_pretrained(None)              # SmolLM2-135M-Instruct, CPU, float32
    lm.add_adapter("sst2", "/path/to/peft_adapter")     # checked now, tensors read on first use
    lm.logits(input_ids, attention_mask, plans=[RoutingPlan.single("sst2")])      # (B, T, V)

It owns the model, the adapters (host LRU -> device slots) and the forward pass: a batch's plans
become routing metadata (:func:`build_batch_routing`), placed on the shared :class:`RoutingState`
around each forward pass, and every :class:`RoutedLinear` routes its tokens with it. Generation is
:class:`hilora_core.engine.routed_lm.RoutedLM`, a client of the generation loop.

Ensemble plans are expanded into one row per adapter (plain LoRA with that adapter, the plan's
scale); the rows share the sequence's tokens and their next-token distributions are averaged with
the plan's weights (normalised to sum 1).

Threading: forward passes and model surgery are serialised by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from hilora_core.engine.adapter_files import (
    HostAdapter,
    InspectedAdapter,
    check_fits_budget,
    inspect_adapter,
    load_adapter,
)
from hilora_core.engine.adapter_loader import AdapterLoader
from hilora_core.engine.batch_routing import BatchRouting, build_batch_routing
from hilora_core.engine.ensemble import ExpandedBatch, expand_ensembles, mix_logits
from hilora_core.engine.families import check_architecture
from hilora_core.engine.host_cache import HostAdapterCache
from hilora_core.engine.routed_linear import RoutedLinear, RoutingState, layer_index
from hilora_core.engine.settings import EngineSettings
from hilora_core.engine.slots import AdapterSlots, SlotLease
from hilora_core.engine.usage import AdapterUsage
from hilora_core.errors import AdapterNotReadyError, InvalidInputError, UnknownAdapterError
from hilora_core.models.base_model import DEFAULT_BASE, resolve_base
from hilora_core.plan import RoutingPlan, TokenRule


class RoutedModel:
    """A base causal LM plus a pool of LoRA adapters, run with one :class:`RoutingPlan` per sequence.

    Args:
        model: a ``*ForCausalLM`` of a served family (``families.py``; eval mode is set here).
        tokenizer: its tokenizer (left padding is set here).
        settings: cache sizes and routing settings.
    """

    def __init__(self, model: Any, tokenizer: Any, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.architecture = check_architecture(model.config)
        self.model = model.eval()  # a transformers *ForCausalLM (untyped)
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._state = RoutingState()
        self._lock = threading.RLock()  # forward passes and model surgery
        self._registry_lock = threading.Lock()
        self._sources: dict[str, InspectedAdapter] = {}
        self.usage = AdapterUsage()  # per-adapter requests, tokens, reads, placements, evictions
        self.slots = AdapterSlots(self.settings.adapter_memory_bytes, self.settings.max_rank, self.device, self.dtype,
                                  size_of=self.adapter_bytes, max_adapters=self.settings.max_slots, usage=self.usage)
        self.host_cache = HostAdapterCache(self.settings.host_cache_size, self._load_host,
                                           self.settings.host_cache_bytes)
        self.loader = AdapterLoader(self._fetch, self._ready, usage=self.usage)
        self._routed: dict[str, RoutedLinear] = {}
        self._linears = {
            name: (mod.in_features, mod.out_features)
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and layer_index(name) is not None  # inside a decoder layer
        }
        self.eos_ids = self._find_eos_ids()
        self.n_layers = int(self.model.config.num_hidden_layers)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        settings: EngineSettings | None = None,
        revision: str | None = None,
        **overrides,
    ) -> Self:
        """Load a base model: None or ``"smollm2-135m-instruct"`` (embedded default), a ``.gguf`` file
        (converted once to safetensors), a HuggingFace folder or a hub id.

        ``settings``, or keyword ``overrides`` of :class:`EngineSettings` fields (``max_slots=4``,
        ``adapter_memory_bytes=64 << 20``)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if settings is None:
            settings = EngineSettings(**overrides)
        elif overrides:
            raise InvalidInputError(f"pass settings or keyword overrides, not both: {sorted(overrides)}")
        base_str = None if base is None else str(base)
        path = resolve_base(base_str) if base_str in (None, DEFAULT_BASE) or base_str.endswith(".gguf") else base_str
        try:
            config = AutoConfig.from_pretrained(path, revision=revision)
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"cannot read a model config from {path!r}: {exc}") from exc
        check_architecture(config)
        model: Any = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        return cls(model, tokenizer, settings)

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_cfg = getattr(self.model, "generation_config", None)
        for src in (getattr(gen_cfg, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src is not None:
                ids.update(int(i) for i in src)
        return ids

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, source: str | Path, revision: str | None = None) -> dict:
        """Register a PEFT LoRA adapter (local folder or hub id) under ``name``.

        The config and the tensor shapes are checked now (:class:`AdapterLoadError` if they do not
        fit); the tensors are read on first use. Re-adding a name replaces the adapter.
        Returns :meth:`adapter_info`.
        """
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"adapter name must be a non-empty string, got {name!r}")
        src = inspect_adapter(name, str(source), self._linears, self.settings.max_rank, revision,
                              self.settings.max_adapter_bytes)
        check_fits_budget(src, self.slots.element_size, self.settings.adapter_memory_bytes)
        if any(m not in self._routed for m in src.modules):  # else no surgery: never wait for a forward pass
            with self._lock:  # model surgery must not overlap a forward pass
                for module_name, (_, d_in, d_out) in src.modules.items():
                    if module_name not in self._routed:
                        self._wrap(module_name, d_in, d_out)
        with self._registry_lock:
            if name in self._sources:
                self._forget(name)
            self._sources[name] = src
        return self.adapter_info(name)

    def _wrap(self, module_name: str, d_in: int, d_out: int) -> None:
        parent_name, _, leaf = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        assert isinstance(base, nn.Linear), f"{module_name} is {type(base).__name__}, not nn.Linear"
        layer_slots = self.slots.add_layer(module_name, d_in, d_out)
        routed = RoutedLinear(base, layer_slots, self._state, layer_index(module_name))
        setattr(parent, leaf, routed)
        self._routed[module_name] = routed

    def _forget(self, name: str) -> None:
        self.slots.drop(name)
        self.host_cache.drop(name)
        self.loader.forget(name)

    def remove_adapter(self, name: str) -> bool:
        """Unregister ``name``; batches already running with it finish normally. True if it existed."""
        with self._registry_lock:
            if self._sources.pop(name, None) is None:
                return False
            self._forget(name)
            self.usage.forget(name)
            return True

    @property
    def adapters(self) -> list[str]:
        with self._registry_lock:
            return sorted(self._sources)

    def adapter_info(self, name: str) -> dict:
        """``rank``, ``alpha``, ``use_rslora``, ``targets``, ``max_rank``, ``n_layers``, ``base_model``,
        ``location``, ``revision``, ``resident`` (in a device slot), ``cached`` (in host memory)."""
        src = self._source(name)
        return {
            "name": name,
            "rank": src.config.rank,
            "alpha": src.config.alpha,
            "use_rslora": src.config.use_rslora,
            "targets": list(src.targets),
            "max_rank": src.max_rank,
            "n_layers": len(src.modules),
            "base_model": src.config.base_model,
            "location": src.location,
            "revision": src.revision,
            "resident": self.slots.slot_of(name) is not None,
            "cached": name in self.host_cache.names(),
        }

    def pin_adapter(self, name: str) -> bool:
        """Keep ``name`` resident in a device slot until :meth:`unpin_adapter`."""
        self._source(name)
        return self.slots.pin(name, self._fetch)

    def unpin_adapter(self, name: str) -> bool:
        return self.slots.unpin(name)

    def cache_stats(self) -> dict:
        """Counters of both tiers and the loader: ``{"device", "host", "loader": {...}, "adapters": n}``."""
        hist = self.loader.latency.snapshot()  # read latency, cumulative buckets (seconds)
        loader = {"reads": self.loader.loads, "failures": self.loader.failures, "loading": self.loader.loading(),
                  "read_seconds_sum": hist.sum, **{f"read_le_{b:g}": n for b, n in zip(hist.buckets, hist.cumulative,
                                                                                        strict=True)}}
        return {"device": self.slots.stats(), "host": self.host_cache.stats(), "loader": loader,
                "adapters": len(self._sources)}

    def residency(self) -> dict[str, str]:
        """Where each loaded adapter is: ``"device"`` (in a slot) or ``"host"`` (host cache only)."""
        out = {name: "host" for name in self.host_cache.names()}
        out.update({name: "device" for name in self.slots.lru_order()})
        return out

    def _source(self, name: str) -> InspectedAdapter:
        with self._registry_lock:
            src = self._sources.get(name)
            if src is None:
                raise UnknownAdapterError(f"unknown adapter {name!r}; registered: {sorted(self._sources)[:20]}")
            return src

    def _load_host(self, source: InspectedAdapter) -> HostAdapter:
        host = load_adapter(source, self.dtype)  # on a loader thread
        return host.pinned() if self.device.type == "cuda" else host

    def _fetch(self, name: str) -> HostAdapter:
        return self.host_cache.get(self._source(name))

    def _fetch_cached(self, name: str) -> HostAdapter:
        host = self.host_cache.peek(self._source(name))
        if host is None:
            raise AdapterNotReadyError(name)
        return host

    def _ready(self, name: str) -> bool:
        return self.slots.slot_of(name) is not None or self.host_cache.cached(name)

    def prefetch(self, names: Sequence[str]) -> None:
        """Start reading these adapters into host memory on the loader's threads (returns at once)."""
        self.loader.prefetch(names)

    def adapters_ready(self, names: Sequence[str]) -> bool:
        """Whether these adapters can be placed on the device without a read (reads the missing ones in the
        background); a failed read raises its :class:`AdapterLoadError` here."""
        return self.loader.ready(names)

    # ---- batches -------------------------------------------------------------------------------------
    def _expand(self, plans: Sequence[RoutingPlan] | None, n: int) -> ExpandedBatch:
        """Check the plans (known adapters) and expand ensembles (:func:`expand_ensembles`)."""
        batch = expand_ensembles(plans, n, self.device)
        names = {a for p in batch.rows for a in p.adapters}
        with self._registry_lock:
            unknown = sorted(names - set(self._sources))
            if unknown:
                raise UnknownAdapterError(f"unknown adapter(s) {unknown}; registered: {sorted(self._sources)[:20]}")
        return batch

    # ---- the hooks of the decode loop and the introspection API --------------------------------------
    def start_batch(self, rows: Sequence[RoutingPlan]) -> tuple[SlotLease, BatchRouting]:
        """Make the rows' adapters resident (held until the lease is released) and build their routing."""
        lease = self.acquire(rows)
        try:
            routing = self.build_routing(rows, lease.slots)
        except BaseException:
            lease.release()
            raise
        return lease, routing

    def acquire(self, rows: Sequence[RoutingPlan], read: bool = True) -> SlotLease:
        """Hold device slots for the rows' adapters until the lease is released. ``read``: read adapters
        missing from host memory now; else they raise :class:`AdapterNotReadyError` (the loop never reads)."""
        names = list(dict.fromkeys(a for p in rows for a in p.adapters))
        lease = self.slots.acquire(names, self._fetch if read else self._fetch_cached)
        if any(p.token_rule == TokenRule.ARROW for p in rows):
            self.slots.ensure_prototypes(lease.slots.values())
        return lease

    def build_routing(self, rows: Sequence[RoutingPlan], slot_of: dict[str, int],
                      ranks: dict[str, int] | None = None) -> BatchRouting:
        """The routing metadata of a batch of (non-ensemble) rows whose adapters sit in ``slot_of``;
        ``ranks``: adapter -> nominal rank (default: read from the registered adapters)."""
        names = list(dict.fromkeys(a for p in rows for a in p.adapters))
        if ranks is None:
            ranks = self.adapter_ranks(names)
        routing = build_batch_routing(
            rows, slot_of, {slot_of[a]: self.slots.slot_rank(slot_of[a]) for a in names}, ranks,
            self.device, self.dtype, self.settings.arrow_temperature, n_layers=self.n_layers,
        )
        routing.slot_writes = self.slots.writes(routing.active.tolist())
        return routing

    def adapter_bytes(self, name: str) -> int:
        """Bytes ``name`` takes in device adapter memory (its rows at every layer it adapts)."""
        return self._source(name).nbytes(self.slots.element_size)

    def adapter_ranks(self, names: Sequence[str]) -> dict[str, int]:
        """Nominal LoRA rank of each named adapter."""
        return {a: self._source(a).config.rank for a in names}

    @property
    def routing_state(self) -> RoutingState:
        """The routing state every routed layer reads (its ``per_row`` switch selects the prefill form)."""
        return self._state

    def forward(self, routing: BatchRouting | None, **inputs) -> torch.Tensor:
        """One forward pass of the base model with ``routing`` in force (None: the base model); logits."""
        with self._lock, torch.inference_mode():
            self._state.current = routing
            try:
                return self.model(**inputs).logits
            finally:
                self._state.current = None

    @staticmethod
    def positions(attention_mask: torch.Tensor) -> torch.Tensor:
        """Position ids (B, T) of a left-padded batch."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        plans: Sequence[RoutingPlan] | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) of a batch, each sequence under its own plan.

        Left padding is handled (positions come from ``attention_mask``). For ensemble plans the
        result is the log of the averaged probability distribution (valid logits).
        """
        if input_ids.ndim != 2:
            raise InvalidInputError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InvalidInputError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        batch = self._expand(plans, n)
        rows, matrix = batch.rows, batch.matrix
        idx = torch.tensor(batch.row_seq, device=self.device)
        ids = input_ids.to(self.device).index_select(0, idx)
        mask = attention_mask.to(self.device).index_select(0, idx)
        lease, routing = self.start_batch(rows)
        with lease:
            out = self.forward(routing, input_ids=ids, attention_mask=mask, position_ids=self.positions(mask))
        return mix_logits(out, matrix)

    def encode(self, prompts: Sequence[str], chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids (B, T), attention_mask (B, T)) as :meth:`generate` builds them."""
        return self._encode(prompts, chat)

    def _encode(self, prompts: Sequence[str], chat: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompts must be a list of strings")
        if not prompts:
            raise InvalidInputError("prompts is empty")
        if chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        if enc["input_ids"].shape[1] == 0 or bool((enc["attention_mask"].sum(1) == 0).any()):
            raise InvalidInputError("every prompt must have at least one token")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
