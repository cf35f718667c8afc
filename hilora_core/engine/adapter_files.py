"""Reading PEFT LoRA adapters from disk or the HuggingFace hub, safely.

An adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
Two steps, so that registering an adapter is cheap but still fails early:

1. :func:`inspect_adapter` (at registration): resolve the folder (downloading just those
   two files from the hub, revision pinned), parse and check the config, read the
   safetensors *header* only, and check every tensor's name and shape against the base
   model. Returns an :class:`InspectedAdapter`.
2. :func:`load_adapter` (on first use): read the tensors (never pickle), compute each
   layer's scaling. Returns a :class:`HostAdapter` on the CPU.

Everything a user can get wrong raises :class:`AdapterLoadError` quoting the bad value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hilora_core.adapter_config import CONFIG_FILE, AdapterConfig, read_adapter_config
from hilora_core.errors import AdapterLoadError

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


@dataclass(frozen=True)
class InspectedAdapter:
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

    def nbytes(self, element_size: int) -> int:
        """Bytes of its A and B factors at ``element_size`` bytes per value: sum of r * (d_in + d_out)."""
        return sum(r * (d_in + d_out) for r, d_in, d_out in self.modules.values()) * element_size

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in self.modules}))


@dataclass
class LayerLoRA:
    """One adapted layer: A (r, d_in), B (d_out, r) and the PEFT scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class HostAdapter:
    """An adapter's tensors in host memory, ready to be copied into a device slot."""

    source: InspectedAdapter
    layers: dict[str, LayerLoRA]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ly in self.layers.values() for t in (ly.a, ly.b))

    def pinned(self) -> HostAdapter:
        """A copy in page-locked memory (for a CUDA device: host-to-device copies then run without the
        copying thread waiting for them)."""
        return HostAdapter(self.source, {name: LayerLoRA(ly.a.pin_memory(), ly.b.T.pin_memory().T, ly.scaling)
                                         for name, ly in self.layers.items()})


def _hub_weights_size(location: str, revision: str | None) -> int | None:
    """The size in bytes of a hub adapter's weights file, from the hub's metadata (None: not known)."""
    try:
        from huggingface_hub import HfApi

        infos = HfApi().get_paths_info(location, [WEIGHTS_FILE], revision=revision)
    except Exception:  # noqa: BLE001 - no metadata: the download itself reports what is wrong
        return None
    sizes = [getattr(i, "size", None) for i in infos]  # RepoFolder entries have none
    return next((int(s) for s in sizes if s is not None), None)


def check_fits_budget(src: InspectedAdapter, element_size: int, budget_bytes: int) -> int:
    """The adapter's bytes in device adapter memory (:meth:`InspectedAdapter.nbytes`); :class:`AdapterLoadError`
    when they exceed the budget (``EngineSettings.adapter_memory_bytes``): it could never be resident."""
    need = src.nbytes(element_size)
    if need > budget_bytes:
        raise AdapterLoadError(f"adapter {src.name!r} takes {need / 2**20:.1f} MiB of adapter memory, above the "
                               f"budget of {budget_bytes / 2**20:.1f} MiB (adapter_memory_bytes)")
    return need


def check_size(nbytes: int | None, max_bytes: int | None, where: str) -> None:
    if nbytes is not None and max_bytes is not None and nbytes > max_bytes:
        raise AdapterLoadError(f"{where} is {nbytes / 2**20:.1f} MiB, above the limit of {max_bytes / 2**20:.1f} MiB "
                               "(EngineSettings.max_adapter_bytes)")


def resolve_adapter_dir(location: str, revision: str | None = None, max_bytes: int | None = None) -> Path:
    """Local folder for ``location``: the folder itself, or a hub snapshot of just the two adapter files
    (refused before downloading when the hub says the weights are larger than ``max_bytes``)."""
    path = Path(location).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterLoadError(f"adapter location {location!r} is a file; give the adapter's folder")
    if not _HUB_ID.match(location):
        raise AdapterLoadError(f"adapter folder not found and not a hub id (owner/name): {location!r}")
    check_size(_hub_weights_size(location, revision), max_bytes, f"the weights of hub adapter {location!r}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(location, revision=revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as exc:  # network, auth, missing repo or revision: all the caller's to fix
        raise AdapterLoadError(
            f"could not download adapter {location!r} (revision {revision!r}) from the hub: {exc}"
        ) from exc
    return Path(folder)


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
    max_bytes: int | None = None,
) -> InspectedAdapter:
    """Check an adapter against the base model without reading its tensors.

    Args:
        name: the engine's name for the adapter.
        location: local folder or hub id.
        base_linears: module path -> (d_in, d_out) of every linear layer adapters may target (the
            ``nn.Linear`` modules inside the decoder layers).
        max_rank: the largest rank a device slot holds.
        revision: hub revision (branch, tag or commit) to pin.
        max_bytes: the largest weights file accepted (None: no limit).

    Returns:
        The :class:`InspectedAdapter`, with each adapted module's (rank, d_in, d_out).
    """
    directory = resolve_adapter_dir(location, revision, max_bytes)
    config = read_adapter_config(directory)
    weights = _weights_file(directory)
    check_size(weights.stat().st_size, max_bytes, str(weights))
    shapes = _header_shapes(weights)
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if "lora_magnitude_vector" in key:
            raise AdapterLoadError(f"DoRA tensors are not supported: {key!r} in {weights}")
        if "lora_embedding" in key:
            raise AdapterLoadError(f"LoRA on the token embeddings (embed_tokens) is not served: {key!r} in {weights}; "
                                   "retrain without it in target_modules")
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterLoadError(f"unexpected tensor {key!r} in {weights} (only lora_A / lora_B weights allowed)")
        parts.setdefault(m["module"], {})[m["ab"]] = shape
    if not parts:
        raise AdapterLoadError(f"{weights} holds no LoRA tensors")
    unknown = sorted(mod for mod in parts if mod not in base_linears)
    if unknown:
        raise AdapterLoadError(
            f"adapter {name!r} targets modules that are not linear layers inside the base model's decoder layers "
            f"(LoRA on lm_head or embed_tokens is not served; the base may also be a different model): "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
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
    return InspectedAdapter(name, location, revision, directory, config, modules)


def load_adapter(source: InspectedAdapter, dtype: torch.dtype = torch.float32) -> HostAdapter:
    """Read an inspected adapter's tensors into host memory (safetensors only) and prepare each layer.

    Returns:
        A :class:`HostAdapter` with, per module, A (r, d_in), B (d_out, r) in ``dtype``, or in the file's
        dtype when that is narrower (placing them converts), the PEFT scaling.
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
        # kept at the file's precision when it is narrower than the model's (float16 files under a float32
        # model): the host tier then holds twice the adapters, and placing them widens exactly
        narrow = a.dtype == b.dtype and a.dtype.is_floating_point and a.dtype.itemsize < dtype.itemsize
        keep = a.dtype if narrow else dtype
        # b is kept as the transposed view of a contiguous (r, d_out) tensor: placing copies b.T into the rank rows,
        # one contiguous copy per layer on the loop's thread (a strided one took 8x longer); transposed here, on
        # the reading thread
        a, b = a.to(keep).contiguous(), b.to(keep).T.contiguous().T
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterLoadError(f"adapter {source.name!r} has non-finite weights at {mod!r}")
        layers[mod] = LayerLoRA(a=a, b=b, scaling=source.config.scaling(mod, r))
    return HostAdapter(source, layers)
