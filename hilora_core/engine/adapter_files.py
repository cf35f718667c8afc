"""Reading PEFT LoRA adapters from disk or the HuggingFace hub, safely.

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
Two steps, so that registering an adapter is cheap but still fails early:

1. :func:`inspect_adapter` (at registration): resolve the folder (downloading just those
   two files from the hub, revision pinned), parse and check the config, read the
   safetensors *header* only, and check every tensor's name and shape against the base
   model. Returns an :class:`AdapterSource`.
2. :func:`load_adapter` (on first use): read the tensors (never pickle), compute each
   layer's scaling and Arrow prototype. Returns a :class:`HostAdapter` on the CPU.

Everything a user can get wrong raises :class:`AdapterLoadError` quoting the bad value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterLoadError
from ..token_routing import arrow_prototype

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
# Linear layers of Llama-family decoders an adapter may target.
SUPPORTED_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoraConfig fields that change the maths in a way this engine does not implement.
_REFUSED_FLAGS: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA (use_dora=true)"),
    ("lora_bias", "a trained LoRA bias (lora_bias=true)"),
    ("fan_in_fan_out", "fan_in_fan_out=true (Conv1D layers)"),
    ("use_qalora", "QA-LoRA (use_qalora=true)"),
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
    ("layer_replication", "layer_replication"),
    ("modules_to_save", "modules_to_save (fully trained extra modules)"),
    ("trainable_token_indices", "trainable_token_indices"),
    ("target_parameters", "target_parameters (LoRA on raw parameters)"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def _pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern keys: ``(.*\\.)?(pattern)$`` on the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that the engine uses."""

    rank: int
    alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    base_model: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def scaling(self, module: str, rank: int) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); alpha from ``alpha_pattern`` when it matches."""
        key = _pattern_key(self.alpha_pattern, module)
        alpha = float(self.alpha_pattern[key]) if key is not None else self.alpha
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


@dataclass(frozen=True)
class AdapterSource:
    """A registered adapter: where its files are and what they contain (no tensors yet).

    Attributes:
        name: the engine's name for it.
        location: the path or hub id given by the caller.
        revision: hub revision (None for local folders).
        directory: the local folder holding the two files.
        config: the parsed config.
        modules: module path -> (rank, d_in, d_out) for every adapted linear layer.
    """

    name: str
    location: str
    revision: str | None
    directory: Path
    config: AdapterConfig
    modules: dict[str, tuple[int, int, int]]

    @property
    def max_rank(self) -> int:
        return max(r for r, _, _ in self.modules.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in self.modules}))


@dataclass
class LayerLoRA:
    """One adapted layer: A (r, d_in), B (d_out, r), scaling, Arrow prototype (d_in,)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    prototype: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class HostAdapter:
    """An adapter's tensors in host memory, ready to be copied into a device slot."""

    source: AdapterSource
    layers: dict[str, LayerLoRA]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ly in self.layers.values() for t in (ly.a, ly.b, ly.prototype))


def resolve_adapter_dir(location: str, revision: str | None = None) -> Path:
    """Local folder for ``location``: the folder itself, or a hub snapshot of just the two adapter files."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterLoadError(f"adapter location {location!r} is a file; give the adapter's folder")
    if not _HUB_ID.match(location):
        raise AdapterLoadError(f"adapter folder not found and not a hub id (owner/name): {location!r}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(location, revision=revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as exc:  # network, auth, missing repo or revision: all the caller's to fix
        raise AdapterLoadError(
            f"could not download adapter {location!r} (revision {revision!r}) from the hub: {exc}"
        ) from exc
    return Path(folder)


def read_adapter_config(directory: Path) -> AdapterConfig:
    """Parse and check ``adapter_config.json`` (PEFT LoRA only)."""
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{cfg_path} is missing: not a PEFT adapter folder")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(f"only LoRA adapters are supported, {cfg_path} has peft_type={peft_type!r}")
    for key, what in _REFUSED_FLAGS:
        if raw.get(key):
            raise AdapterLoadError(f"{what} is not supported: {key}={raw[key]!r} in {cfg_path}")
    if raw.get("bias", "none") != "none":
        raise AdapterLoadError(f"bias-trained adapters are not supported: bias={raw['bias']!r} in {cfg_path}")
    try:
        rank = int(raw["r"])
        alpha = float(raw.get("lora_alpha", rank))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{cfg_path} needs an integer 'r' and numeric 'lora_alpha': {exc}") from exc
    if rank < 1 or not math.isfinite(alpha):
        raise AdapterLoadError(f"bad LoRA hyper-parameters in {cfg_path}: r={rank!r}, lora_alpha={alpha!r}")
    targets = raw.get("target_modules") or ()
    return AdapterConfig(
        rank=rank,
        alpha=alpha,
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
        base_model=raw.get("base_model_name_or_path"),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )


def _weights_file(directory: Path) -> Path:
    weights = directory / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickled = [p for p in PICKLE_FILES if (directory / p).exists()]
    if pickled:
        raise AdapterLoadError(
            f"{directory} has only pickled weights ({pickled[0]}); pickle is refused for untrusted files. "
            "Convert the adapter to safetensors (PEFT save_pretrained(safe_serialization=True))."
        )
    raise AdapterLoadError(f"{weights} is missing")


def _header_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterLoadError(f"{weights} is not a readable safetensors file: {exc}") from exc


def inspect_adapter(
    name: str,
    location: str,
    base_linears: Mapping[str, tuple[int, int]],
    max_rank: int,
    revision: str | None = None,
) -> AdapterSource:
    """Check an adapter against the base model without reading its tensors.

    Args:
        name: the engine's name for the adapter.
        location: local folder or hub id.
        base_linears: module path -> (d_in, d_out) of every linear layer adapters may target.
        max_rank: the largest rank a device slot holds.
        revision: hub revision (branch, tag or commit) to pin.

    Returns:
        The :class:`AdapterSource`, with each adapted module's (rank, d_in, d_out).
    """
    directory = resolve_adapter_dir(location, revision)
    config = read_adapter_config(directory)
    weights = _weights_file(directory)
    shapes = _header_shapes(weights)
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if "lora_magnitude_vector" in key:
            raise AdapterLoadError(f"DoRA tensors are not supported: {key!r} in {weights}")
        if "lora_embedding" in key:
            raise AdapterLoadError(f"LoRA on embeddings is not supported: {key!r} in {weights}")
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in {weights} (only lora_A / lora_B weights allowed)")
        parts.setdefault(m["module"], {})[m["ab"]] = shape
    if not parts:
        raise AdapterLoadError(f"{weights} holds no LoRA tensors")
    unknown = sorted(mod for mod in parts if mod not in base_linears)
    if unknown:
        raise AdapterLoadError(
            f"adapter {name!r} targets modules the base model does not have (or that are not "
            f"{'/'.join(SUPPORTED_TARGETS)}): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    modules: dict[str, tuple[int, int, int]] = {}
    for mod, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"module {mod!r} of adapter {name!r} has lora_{''.join(ab)} but not both A and B")
        d_in, d_out = base_linears[mod]
        a_shape, b_shape = ab["A"], ab["B"]
        r = a_shape[0] if len(a_shape) == 2 else -1
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != d_in or b_shape != (d_out, r) or r < 1:
            raise AdapterLoadError(
                f"adapter {name!r} does not fit the base model at {mod!r}: lora_A {a_shape}, lora_B {b_shape}, "
                f"expected ({'r'}, {d_in}) and ({d_out}, r)"
            )
        if r > max_rank:
            raise AdapterLoadError(f"adapter {name!r} has rank {r} at {mod!r}, above the engine's max_rank={max_rank}")
        modules[mod] = (r, d_in, d_out)
    return AdapterSource(name, location, revision, directory, config, modules)


def load_adapter(source: AdapterSource, dtype: torch.dtype = torch.float32) -> HostAdapter:
    """Read an inspected adapter's tensors into host memory (safetensors only) and prepare each layer.

    Returns:
        A :class:`HostAdapter` with, per module, A (r, d_in), B (d_out, r) in ``dtype``, the
        PEFT scaling, and the Arrow prototype (top right singular vector of B A).
    """
    from safetensors import safe_open

    weights = _weights_file(source.directory)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118
                m = _LORA_KEY.match(key)
                if m is None or m["module"] not in source.modules:
                    raise AdapterLoadError(f"{weights} changed since it was registered: unexpected tensor {key!r}")
                tensors.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except AdapterLoadError:
        raise
    except Exception as exc:
        raise AdapterLoadError(f"could not read {weights}: {exc}") from exc
    layers: dict[str, LayerLoRA] = {}
    for mod, (r, d_in, d_out) in source.modules.items():
        ab = tensors.get(mod, {})
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise AdapterLoadError(f"{weights} changed since it was registered: module {mod!r} does not match")
        a = a.to(torch.float32)
        b = b.to(torch.float32)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError(f"adapter {source.name!r} has non-finite weights at {mod!r}")
        layers[mod] = LayerLoRA(
            a=a.to(dtype).contiguous(),
            b=b.to(dtype).contiguous(),
            scaling=source.config.scaling(mod, r),
            prototype=arrow_prototype(a, b).to(dtype),
        )
    return HostAdapter(source, layers)
