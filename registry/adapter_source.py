"""Where an adapter's weights live, and what its ``adapter_config.json`` says.

A source is a local folder (stored as an absolute path) or a Hugging Face Hub repo id
(``owner/name`` plus an optional revision). Only ``adapter_config.json`` is read here;
the weights are fetched later, on demand, by the model replicas.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hilora_core.adapter_config import MAX_CONFIG_BYTES, parse_adapter_config
from hilora_core.errors import AdapterLoadError, InvalidInputError

from .errors import ForbiddenSourceError, IncompatibleAdapterError

HUB_REPO_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REVISION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class AdapterSource:
    """``kind`` is "local" (``location`` = absolute folder) or "hub" (``location`` = repo id)."""

    kind: str
    location: str
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "revision": self.revision}

    @classmethod
    def from_dict(cls, d: dict) -> AdapterSource:
        return cls(kind=d["kind"], location=d["location"], revision=d.get("revision"))

    @classmethod
    def parse(cls, source: object, revision: str | None = None) -> AdapterSource:
        """An existing folder is local; ``owner/name`` is a hub repo; anything else is refused."""
        if not isinstance(source, str) or not source.strip():
            raise InvalidInputError(f"source must be a local folder or a hub repo id, got {source!r}")
        if revision is not None and (not isinstance(revision, str) or not REVISION_PATTERN.fullmatch(revision)):
            raise InvalidInputError(f"invalid revision {revision!r}")
        if os.path.isdir(source):
            if revision is not None:
                raise InvalidInputError(f"a revision ({revision!r}) only applies to hub sources, not {source!r}")
            return cls("local", os.path.abspath(source), None)
        if HUB_REPO_PATTERN.fullmatch(source) and ".." not in source:
            return cls("hub", source, revision)
        raise InvalidInputError(f"source {source!r} is neither an existing folder nor a hub repo id 'owner/name'")


def check_local_allowed(src: AdapterSource, allowed_dirs: tuple[str, ...] | None) -> None:
    """Refuse a local folder outside ``allowed_dirs`` (None: any folder). Symlinks are resolved first, so a
    link inside an allowed folder cannot point outside it."""
    if src.kind != "local" or allowed_dirs is None:
        return
    real = os.path.realpath(src.location)
    for root in allowed_dirs:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return
    raise ForbiddenSourceError(
        f"local adapter folder {src.location!r} is outside the allowed folders {list(allowed_dirs)}; "
        "add its parent to registry.adapter_dirs in the service config, or use a hub repo id")


def check_spec_limits(spec: AdapterSpec, max_rank: int, max_targets: int, where: str) -> None:
    """Refuse an adapter whose rank or number of target modules is above the registry's limits."""
    if spec.rank > max_rank:
        raise InvalidInputError(f"{where}: rank {spec.rank} is above the limit {max_rank}")
    if len(spec.targets) > max_targets:
        raise InvalidInputError(f"{where}: {len(spec.targets)} target modules; the limit is {max_targets}")


@dataclass(frozen=True)
class AdapterSpec:
    """What the router needs about an adapter's weights.

    Attributes:
        rank: LoRA rank r (>= 1).
        alpha: lora_alpha.
        targets: target module names, sorted.
        base_model: ``base_model_name_or_path`` of the config, if any.
        config_source: "local", "hub" (read from adapter_config.json) or "explicit" (given by the caller).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_model: str | None
    config_source: str


def _spec_from_config(raw: bytes, where: str, config_source: str) -> AdapterSpec:
    """The router's view of an ``adapter_config.json`` (parsed and checked by the engine's one parser)."""
    cfg = parse_adapter_config(raw, where)
    targets = (cfg.target_modules,) if isinstance(cfg.target_modules, str) else cfg.target_modules
    if not targets:
        raise AdapterLoadError(f"{where}: target_modules must be a non-empty list of names, got {targets!r}")
    return AdapterSpec(cfg.rank, cfg.alpha, tuple(targets), cfg.base_model, config_source)


def read_local_config(folder: str) -> AdapterSpec:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterLoadError(f"no {CONFIG_NAME} in adapter folder {folder!r}")
    with open(path, "rb") as fh:
        return _spec_from_config(fh.read(MAX_CONFIG_BYTES + 1), path, "local")


def read_hub_config(repo: str, revision: str | None) -> AdapterSpec | None:
    """The hub config, or None when the hub cannot be reached (offline, network error).

    A config that is reached but malformed raises :class:`AdapterLoadError`.
    """
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, CONFIG_NAME, revision=revision)
    except Exception:  # offline mode, DNS, HTTP errors: treated as "not reachable"
        return None
    with open(path, "rb") as fh:
        where = f"{repo}@{revision or 'main'}/{CONFIG_NAME}"
        return _spec_from_config(fh.read(MAX_CONFIG_BYTES + 1), where, "hub")


def resolve_spec(
    source: AdapterSource,
    *,
    rank: int | None,
    alpha: float | None,
    targets: Sequence[str] | None,
    base_model: str | None,
    hub_lookup: bool,
) -> AdapterSpec:
    """Combine the adapter's config (when reachable) with the caller's explicit values.

    Explicit values must agree with a config that was read; with no config, rank, alpha
    and targets must all be given. ``base_model`` (explicit) fills in a config without one.
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise InvalidInputError(f"rank must be an integer >= 1, got {rank!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise InvalidInputError(f"alpha must be a number > 0, got {alpha!r}")
    if targets is not None:
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise InvalidInputError(f"targets must be a non-empty list of module names, got {targets!r}")
        targets = tuple(sorted(set(targets)))
    if base_model is not None and (not isinstance(base_model, str) or not base_model):
        raise InvalidInputError(f"base_model must be a non-empty string, got {base_model!r}")

    spec: AdapterSpec | None
    if source.kind == "local":
        spec = read_local_config(source.location)
    else:
        spec = read_hub_config(source.location, source.revision) if hub_lookup else None
    if spec is None:
        if rank is None or alpha is None or targets is None:
            missing = [n for n, v in (("rank", rank), ("alpha", alpha), ("targets", targets)) if v is None]
            raise AdapterLoadError(
                f"adapter_config.json of {source.location!r} could not be reached; give {', '.join(missing)} "
                "explicitly"
            )
        return AdapterSpec(rank, float(alpha), targets, base_model, "explicit")
    for name, given, read in (("rank", rank, spec.rank), ("alpha", alpha, spec.alpha),
                              ("targets", targets, spec.targets), ("base_model", base_model, spec.base_model)):
        if given is None or read is None:
            continue
        if float(given) != read if isinstance(given, (int, float)) and name == "alpha" else given != read:
            raise IncompatibleAdapterError(
                f"{name} given as {given!r} but adapter_config.json of {source.location!r} says {read!r}"
            )
    if spec.base_model is None and base_model is not None:
        spec = AdapterSpec(spec.rank, spec.alpha, spec.targets, base_model, spec.config_source)
    return spec


def check_base_model(spec: AdapterSpec, required: str | None, adapter_id: str) -> None:
    """Refuse an adapter trained on another base model than the configured one."""
    if required is None or spec.base_model is None:
        return
    if spec.base_model.rstrip("/") != required.rstrip("/"):
        raise IncompatibleAdapterError(
            f"adapter {adapter_id!r} was trained on base model {spec.base_model!r}, "
            f"but this registry serves {required!r}"
        )
