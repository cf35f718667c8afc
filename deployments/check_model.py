"""``hilora check-model``: will this base model and these adapters be served, and in how much memory?

Reads configs and adapter headers only. The base model is built on the ``meta`` device (no weights read or
allocated) to learn its ``nn.Linear`` layers and parameter count; each adapter goes through the engine's
own checks (:func:`hilora_core.engine.adapter_files.inspect_adapter`, then ``RoutedModel.add_adapter``'s
budget check); the adapter memory is allocated by the engine's own :class:`AdapterSlots` on ``meta``.
``format_report(check_model(base, [adapter, ...]))`` is the command's output.

Memory, in bytes of the chosen dtype:

- base weights: parameters x dtype size (tied embeddings counted once);
- KV memory at its bound (``kv_slots.py``): layers x 2 (keys, values) x max_rows x kv_heads x
  max_tokens_per_sequence x head_dim x dtype size;
- an adapter (host cache and device adapter memory alike): sum over its layers of r x (d_in + d_out) x dtype
  size; the resident adapters' rows stay within ``adapter_memory_bytes``;
- the adapter memory allocated (``slots.py``): the row pools and tables of the routed layers with the accepted
  adapters resident (every decoder linear and no adapter when none is given).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hilora_core.adapter_config import CONFIG_FILE, MAX_CONFIG_BYTES
from hilora_core.engine import adapter_files as files
from hilora_core.engine.adapter_files import WEIGHTS_FILE, HostAdapter, InspectedAdapter, LayerLoRA, inspect_adapter
from hilora_core.engine.families import SLIDING, attention_layout, family_of
from hilora_core.engine.kv_slots import kv_geometry
from hilora_core.engine.routed_linear import layer_index
from hilora_core.engine.settings import EngineSettings, LoopSettings
from hilora_core.engine.slots import AdapterSlots
from hilora_core.errors import AdapterLoadError, InvalidInputError, UnsupportedModelError
from hilora_core.models.base_model import DEFAULT_BASE, resolve_base

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FamilyCheck:
    """Is the base model's family served, and which layers slide.

    ``served``: the family and its attention layout are served, else ``error`` says why; ``architecture``: the
    served class, else the config's ``architectures``; ``sliding_layers`` attend to a window of the last ``window``
    positions; ``features``: what the family exercises beyond Llama (``families.py``).
    """

    served: bool
    model_type: str | None
    architecture: str | None
    n_layers: int | None = None
    sliding_layers: list[int] = field(default_factory=list)
    window: int | None = None
    features: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class AdapterCheck:
    """One adapter against the base model and the settings.

    Attributes:
        location: the folder or hub id given; accepted: the engine would register it; reason: why not.
        target_modules, rank, alpha: what its config says (None where it cannot be read).
        modules: adapted module leaf name -> its number of decoder layers; max_module_rank: the largest rank.
        nbytes: its A and B factors in the dtype, in host memory and in device adapter memory alike (bytes).
        file_bytes: its ``adapter_model.safetensors`` on disk (bytes; None: not found).
        outside_decoder: names of a listed ``target_modules`` that are no linear layer inside the decoder
            layers (``lm_head``, ``embed_tokens``, ...): LoRA there is not served.
    """

    location: str
    accepted: bool
    reason: str | None = None
    target_modules: list[str] | str | None = None
    rank: int | None = None
    alpha: float | None = None
    modules: dict[str, int] = field(default_factory=dict)
    max_module_rank: int | None = None
    nbytes: int | None = None
    file_bytes: int | None = None
    outside_decoder: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemoryCheck:
    """Memory the engine allocates with the checked settings (bytes).

    Attributes:
        dtype, dtype_bytes, parameters, base_bytes: the model's dtype, its element size, parameters and weights.
        kv_layers, kv_heads, head_dim, max_rows, max_tokens_per_sequence: the KV memory's geometry;
        kv_bytes: the KV memory at its bound (it grows by doubling, only as far as the longest running row needs).
        adapter_memory_bytes, max_slots, max_rank: the adapter memory settings (budget, optional count cap).
        adapted_layers, adapted_basis: the linear layers routed, and which (the accepted adapters' modules, or
            every linear inside the decoder layers when no adapter is given).
        adapters_bytes: the accepted adapters together; adapters_fit_at_once: they can all be resident at once.
        adapter_pool_bytes: what ``AdapterSlots`` allocates for those layers with the accepted adapters loaded.
        device_total_bytes: base + KV + adapter pools; device_bound_bytes: the same with the adapter memory
            filled to its budget.
        host_cache_bytes, host_cache_size: the host cache's budget and optional count cap.
    """

    dtype: str
    dtype_bytes: int
    parameters: int
    base_bytes: int
    kv_layers: int
    kv_heads: int
    head_dim: int
    max_rows: int
    max_tokens_per_sequence: int
    kv_bytes: int
    adapter_memory_bytes: int
    max_slots: int | None
    max_rank: int
    adapted_layers: int
    adapted_basis: str
    adapters_bytes: int
    adapters_fit_at_once: bool
    adapter_pool_bytes: int
    device_total_bytes: int
    device_bound_bytes: int
    host_cache_bytes: int
    host_cache_size: int | None


@dataclass(frozen=True)
class ModelCheck:
    """The whole answer of :func:`check_model`; ``ok`` is the command's success."""

    model: str
    path: str
    family: FamilyCheck
    adapters: list[AdapterCheck]
    memory: MemoryCheck | None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The family is served and every adapter is accepted."""
        return self.family.served and all(a.accepted for a in self.adapters)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def element_size(dtype: torch.dtype) -> int:
    """Bytes per value of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes(config: Any, max_rows: int, max_columns: int, dtype: torch.dtype) -> int:
    """Bytes of ``SlotKVCache`` grown to ``max_rows`` rows of ``max_columns`` tokens (its bound)."""
    n_layers, kv_heads, head_dim = kv_geometry(config)
    return n_layers * 2 * max_rows * kv_heads * max_columns * head_dim * element_size(dtype)


def load_config(model: str | None) -> tuple[str, Any]:
    """(resolved path or hub id, transformers config) of ``model``: None / ``"smollm2-135m-instruct"`` (the
    embedded default), a ``.gguf`` file, a folder with ``config.json`` or a hub id."""
    from transformers import AutoConfig

    path = resolve_base(model)
    try:
        return path, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:  # missing folder / config.json, unreachable hub id, unknown model_type
        where = "a folder without a readable config.json" if Path(path).is_dir() else \
            "neither a local folder nor a hub id that could be read"
        raise InvalidInputError(f"cannot read a model config from {path!r} ({where}): {exc}") from exc


def meta_skeleton(config: Any) -> nn.Module:
    """The ``*ForCausalLM`` of ``config`` on the meta device: its modules and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def decoder_linears(model: nn.Module) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) of every ``nn.Linear`` inside a decoder layer (what the
    engine can adapt; ``RoutedModel._linears``)."""
    return {name: (mod.in_features, mod.out_features) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and layer_index(name) is not None}


def check_family(config: Any) -> FamilyCheck:
    """:class:`FamilyCheck` of a config (``families.py``)."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    try:
        family = family_of(config)
        layout = attention_layout(config)
    except UnsupportedModelError as exc:
        return FamilyCheck(False, model_type, ", ".join(archs) or None, error=str(exc))
    sliding = [i for i, t in enumerate(layout.layer_types) if t == SLIDING]
    return FamilyCheck(True, model_type, family.architecture, len(layout.layer_types), sliding, layout.window,
                       list(family.features))


def _raw_config(path: Path) -> dict[str, Any]:
    """What a (possibly refused) adapter config says, read leniently: {} when it is not a readable JSON object."""
    try:
        with open(path, "rb") as fh:
            raw = json.loads(fh.read(MAX_CONFIG_BYTES + 1))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _refused(location: str, reason: str, linears: Mapping[str, tuple[int, int]]) -> AdapterCheck:
    """A refused adapter, with what its config says when it is a local folder (a hub one is not fetched again)."""
    folder = Path(location).expanduser()
    raw = _raw_config(folder / CONFIG_FILE)
    targets, rank, alpha = raw.get("target_modules"), raw.get("r"), raw.get("lora_alpha")
    listed = targets if isinstance(targets, list) and all(isinstance(t, str) for t in targets) else None
    leaves = {m.rsplit(".", 1)[-1] for m in linears}
    weights = folder / WEIGHTS_FILE
    return AdapterCheck(
        location, False, reason, targets if isinstance(targets, str) else listed,
        rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
        file_bytes=weights.stat().st_size if weights.is_file() else None,
        outside_decoder=sorted(t for t in listed or () if t not in leaves))


def _check_adapter(location: str, linears: Mapping[str, tuple[int, int]], engine: EngineSettings,
                   dtype: torch.dtype) -> tuple[AdapterCheck, InspectedAdapter | None]:
    """Check one adapter as ``RoutedModel.add_adapter`` does; a refusal is reported, not raised."""
    try:
        src = inspect_adapter(location, location, linears, engine.max_rank, max_bytes=engine.max_adapter_bytes)
    except AdapterLoadError as exc:
        return _refused(location, str(exc), linears), None
    need, reason = src.nbytes(element_size(dtype)), None
    try:  # RoutedModel.add_adapter's budget rule
        files.check_fits_budget(src, element_size(dtype), engine.adapter_memory_bytes)
    except AdapterLoadError as exc:
        reason = str(exc)
    tm = src.config.target_modules
    check = AdapterCheck(
        location, reason is None, reason, tm if isinstance(tm, str) else list(tm), src.config.rank,
        src.config.alpha, dict(sorted(Counter(m.rsplit(".", 1)[-1] for m in src.modules).items())), src.max_rank,
        need, (src.directory / WEIGHTS_FILE).stat().st_size)
    return check, (src if reason is None else None)


def adapter_pools(layers: Mapping[str, tuple[int, int]], adapters: Sequence[InspectedAdapter],
                  engine: EngineSettings, dtype: torch.dtype) -> tuple[int, bool]:
    """(bytes ``AdapterSlots`` allocates for ``layers`` with ``adapters`` loaded, whether they are all resident
    at once), run by the engine's own class on the meta device: all at once when they fit, else one by one."""
    slots = AdapterSlots(engine.adapter_memory_bytes, engine.max_rank, "meta", dtype, max_adapters=engine.max_slots)
    for name, (d_in, d_out) in layers.items():
        slots.add_layer(name, d_in, d_out)
    meta = torch.device("meta")  # the adapters' tensors as shapes only
    hosts = {src.name: HostAdapter(src, {m: LayerLoRA(torch.empty((r, d_in), device=meta), torch.empty(
        (d_out, r), device=meta), 1.0) for m, (r, d_in, d_out) in src.modules.items()}) for src in adapters}
    fit = sum(slots.nbytes_of(h) for h in hosts.values()) <= engine.adapter_memory_bytes and (
        engine.max_slots is None or len(hosts) <= engine.max_slots)
    for batch in [list(hosts)] if fit else [[n] for n in hosts]:
        slots.acquire(batch, hosts.__getitem__).release()
    return slots.allocated_bytes(), fit


def check_model(model: str | None, adapters: Sequence[str] = (), engine: EngineSettings | None = None,
                loop: LoopSettings | None = None, dtype: str = "float32") -> ModelCheck:
    """Check a base model and adapters against the engine without loading weights.

    Args:
        model: None / ``"smollm2-135m-instruct"`` (embedded default), a ``.gguf`` file, a folder with
            ``config.json`` or a hub id.
        adapters: adapter folders or hub ids (hub adapters: only their config and weights are downloaded).
        engine, loop: the settings to size the memory with (defaults: the service's).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``, the model's dtype.

    Returns:
        The :class:`ModelCheck`. Raises :class:`InvalidInputError` only when no config can be read.
    """
    engine, loop = engine or EngineSettings(), loop or LoopSettings()
    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path, config = load_config(model)
    family = check_family(config)
    notes: list[str] = []
    try:
        skeleton = meta_skeleton(config)
    except Exception as exc:  # noqa: BLE001 - any failure to build it is reported, not raised
        notes.append(f"cannot build the model from its config, so adapters and memory were not checked: {exc}")
        refused = [AdapterCheck(a, False, "not checked: the base model could not be built") for a in adapters]
        return ModelCheck(model or DEFAULT_BASE, path, family, refused, None, notes)
    linears = decoder_linears(skeleton)
    checked = [_check_adapter(a, linears, engine, DTYPES[dtype]) for a in adapters]
    accepted = [src for _, src in checked if src is not None]
    try:
        kv_geometry(config)
    except (AttributeError, TypeError, ValueError) as exc:  # a config without the usual attention fields
        notes.append(f"cannot size the KV memory from this config: {exc}")
        memory = None
    else:
        memory = _memory(config, skeleton, linears, accepted, bool(adapters), engine, loop, dtype)
    if family.window is not None:
        notes.append(f"sliding layers keep all {loop.max_tokens_per_sequence} columns of KV memory; the window is "
                     "applied by the attention mask")
    if memory is not None and not memory.adapters_fit_at_once:
        notes.append("the accepted adapters cannot all be resident at once (adapter_memory_bytes / max_slots): "
                     "a plan needing them all together is refused; they are served in turn")
    notes.append("not counted: activations and the adapter stacks each batch gathers from the row pools")
    return ModelCheck(model or DEFAULT_BASE, path, family, [c for c, _ in checked], memory, notes)


def _memory(config: Any, skeleton: nn.Module, linears: Mapping[str, tuple[int, int]],
            accepted: Sequence[InspectedAdapter], from_adapters: bool, engine: EngineSettings, loop: LoopSettings,
            dtype: str) -> MemoryCheck:
    """The :class:`MemoryCheck` (formulas in the module docstring)."""
    torch_dtype = DTYPES[dtype]
    size = element_size(torch_dtype)
    layers = {m: (d_in, d_out) for src in accepted for m, (_, d_in, d_out) in src.modules.items()} \
        if from_adapters else dict(linears)
    n_layers, kv_heads, head_dim = kv_geometry(config)
    params = sum(p.numel() for p in skeleton.parameters())
    kv = kv_bytes(config, loop.max_rows, loop.max_tokens_per_sequence, torch_dtype)
    pools, fit = adapter_pools(layers, accepted, engine, torch_dtype)
    basis = "the accepted adapters' modules" if from_adapters else "every linear layer inside the decoder layers"
    return MemoryCheck(
        dtype, size, params, params * size, n_layers, kv_heads, head_dim, loop.max_rows,
        loop.max_tokens_per_sequence, kv, engine.adapter_memory_bytes, engine.max_slots, engine.max_rank,
        len(layers), basis, sum(src.nbytes(size) for src in accepted), fit, pools, params * size + kv + pools,
        params * size + kv + max(pools, engine.adapter_memory_bytes), engine.host_cache_bytes, engine.host_cache_size)


def human_bytes(n: int) -> str:
    """``n`` bytes as KiB / MiB / GiB (binary units)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _layers_text(family: FamilyCheck) -> str:
    if family.window is None:
        return f"full attention in all {family.n_layers} layers"
    if len(family.sliding_layers) == family.n_layers:
        return f"all {family.n_layers} layers slide over the last {family.window} positions"
    return (f"layers {family.sliding_layers} of {family.n_layers} slide over the last {family.window} positions, "
            "the others attend fully")


def _memory_lines(m: MemoryCheck, n_accepted: int) -> list[str]:
    cap = f", at most {m.max_slots} resident" if m.max_slots is not None else ""
    host_cap = f", at most {m.host_cache_size} adapters" if m.host_cache_size is not None else ""
    fit = "fit" if m.adapters_fit_at_once else "do NOT fit"
    lines = [
        f"memory ({m.dtype}):",
        f"  base weights     {human_bytes(m.base_bytes):>12}  ({m.parameters:,} parameters)",
        f"  KV memory        {human_bytes(m.kv_bytes):>12}  ({m.kv_layers} layers x 2 x {m.max_rows} rows x "
        f"{m.kv_heads} kv heads x {m.max_tokens_per_sequence} tokens x {m.head_dim})",
        f"  adapter pools    {human_bytes(m.adapter_pool_bytes):>12}  (allocated for {m.adapted_layers} layers: "
        f"{m.adapted_basis}; {n_accepted} adapters loaded)",
        f"  adapter budget   {human_bytes(m.adapter_memory_bytes):>12}  (adapter_memory_bytes{cap}; rank <= "
        f"{m.max_rank})",
    ]
    if n_accepted:
        lines.append(f"  adapters         {human_bytes(m.adapters_bytes):>12}  (the {n_accepted} accepted together: "
                     f"they {fit} at once)")
    lines += [f"  device total     {human_bytes(m.device_total_bytes):>12}  (base + KV + adapter pools)",
              f"  device bound     {human_bytes(m.device_bound_bytes):>12}  (adapter memory filled to its budget)",
              f"  host cache       {human_bytes(m.host_cache_bytes):>12}  (host_cache_bytes{host_cap})"]
    return lines


def format_report(result: ModelCheck) -> str:
    """A readable report of :func:`check_model`'s result (several lines, no trailing newline)."""
    fam = result.family
    lines = [f"model: {result.model}" + (f" ({result.path})" if result.path != result.model else "")]
    if fam.served:
        extra = f"; {', '.join(fam.features)}" if fam.features else ""
        lines += [f"family: served: {fam.model_type} ({fam.architecture}{extra})", f"attention: {_layers_text(fam)}"]
    else:
        lines.append(f"family: NOT SERVED: {fam.error}")
    for a in result.adapters:
        if a.accepted:
            mods = ", ".join(f"{leaf} x{n} layers" for leaf, n in a.modules.items())
            lines.append(f"adapter {a.location}: accepted (r={a.rank}, alpha={a.alpha:g}, largest rank "
                         f"{a.max_module_rank}); adapts {mods}; {human_bytes(a.nbytes or 0)}")
        else:
            lines.append(f"adapter {a.location}: REFUSED: {a.reason}")
            if a.outside_decoder:
                lines.append(f"  its target_modules {a.outside_decoder} are not linear layers inside the decoder "
                             "layers: LoRA there is not served (retrain without them)")
    if result.memory is not None:
        lines += _memory_lines(result.memory, sum(a.accepted for a in result.adapters))
    lines += [f"note: {n}" for n in result.notes]
    lines.append("OK: served" if result.ok else "NOT OK: see above")
    return "\n".join(lines)
