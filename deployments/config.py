"""The application's settings: one validated model, read from ``serve_config.yaml``'s ``args``.

Every field has a default that runs on a 2-core CPU machine with the embedded
models, the embedded Redis and the demo pool. Environment overrides:
``REDIS_URL`` (registry), ``HILORA_ADMIN_TOKEN`` (admin API; unset = admin disabled).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hilora_core.engine.settings import EngineSettings, LoopSettings
from hilora_core.policies import POLICIES, PolicyConfig
from registry.config import EmbedderSettings as RegistryEmbedderSettings
from registry.config import RegistryConfig, RegistrySettings, nest_flat_keys

# The algorithm's own defaults, read here instead of written again.
_POLICY = PolicyConfig()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_POOL_MANIFEST = PROJECT_ROOT / "examples" / "demo_pool" / "manifest.json"
TRANSFER_POOL_MANIFEST = PROJECT_ROOT / "examples" / "transfer_pool" / "manifest.json"

# Keys of earlier configs that no longer exist: the static scheduler was removed with its settings.
_REMOVED_MODEL_KEYS = ("max_batch_size", "batch_wait_timeout_s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    """The model replica: where the base model comes from, the engine's adapter memory and the generation loop.
    Earlier configs' flat keys (``max_slots``, ``max_rows``, ...) are moved into ``engine`` and ``loop``."""

    base: str | None = Field(None, description="HF folder / hub id / .gguf; None = embedded SmolLM2-135M-Instruct")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:N]'")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="'auto': float32 on CPU, bfloat16 on CUDA")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per replica (None: torch default)")
    engine: EngineSettings = Field(EngineSettings(), description="adapter memory and token-rule settings")
    loop: LoopSettings = Field(LoopSettings(), description="bounds of the generation loop")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            scheduler = data.pop("scheduler", "continuous")
            if scheduler != "continuous":
                raise ValueError(f"model.scheduler {scheduler!r}: the static scheduler was removed; every request "
                                 "runs in the one generation loop (drop the key)")
            for key in _REMOVED_MODEL_KEYS:
                if key in data:
                    raise ValueError(f"model.{key} was a setting of the static scheduler, which was removed; "
                                     "drop the key (the loop's bounds are model.loop.max_rows and max_waiting)")
        return nest_flat_keys(data, {"engine": EngineSettings, "loop": LoopSettings}, "model")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EmbedderSettings(RegistryEmbedderSettings):
    """The embedder (model, instruction, revision: the registry's embedder settings) and its request batching."""

    max_batch_size: int = Field(default=32, ge=1, description="requests embedded in one batch")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="how long a batch waits to fill")
    bulk_threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads for a call of more than max_batch_size texts (adapter "
        "registration), run one call at a time on a thread of its own; None: every CPU the replica's process may "
        "use. Request batches keep the replica's own count (Ray's share: 1 thread at num_cpus < 2)")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ServiceRegistrySettings(RegistrySettings):
    """The registry's settings groups (store, fit, scorer, admission, prefilter) and the service's own two."""

    adapter_dirs: tuple[str, ...] = Field(
        default=(), description="local folders the admin API may register adapters from (relative paths: from the "
        "project root), besides the seed pool's own folder; any other local path gets HTTP 403")
    seed_manifest: str | None = Field(
        default="demo", description="pool manifest registered when the pool is empty at start ('demo' = the demo "
        "pool, 'transfer' = the transfer pool, or a manifest path)")


class RoutingSettings(_Strict):
    model_alias: str = Field("hilora", description="the `model` value that selects automatic routing")
    policy: str = Field(_POLICY.policy.value, description="default policy of the alias")
    gamma: float = Field(_POLICY.gamma, gt=0, le=1)
    max_candidates: int | None = Field(_POLICY.max_candidates, ge=1)
    seed: int | None = Field(_POLICY.seed, ge=0, description="None: deterministic ROC allocation")
    fallback: bool = Field(_POLICY.fallback, description="serve requests that no adapter covers with the base model "
                                                         "alone (false: always route to adapters, as the paper does)")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of {list(POLICIES)}")
        return v


class LimitSettings(_Strict):
    max_prompt_chars: int = Field(16_000, ge=1, description="longer prompts get HTTP 413")
    max_tokens: int = Field(512, ge=1, description="max_tokens above this gets HTTP 422")
    max_messages: int = Field(64, ge=1)
    max_choices: int = Field(64, ge=1, description="prompts x n choices of one request")


class AppConfig(_Strict):
    """Everything the application reads. ``serve_config.yaml`` passes it as the app's ``args``."""

    model: ModelSettings = ModelSettings()
    embedder: EmbedderSettings = EmbedderSettings()
    registry: ServiceRegistrySettings = ServiceRegistrySettings()
    routing: RoutingSettings = RoutingSettings()
    limits: LimitSettings = LimitSettings()
    admin_token_env: str = Field("HILORA_ADMIN_TOKEN", description="env var holding the admin bearer token")
    base_model_name: str = Field("base", description="the `model` value that selects the base model alone")

    def admin_token(self) -> str | None:
        token = os.environ.get(self.admin_token_env, "")
        return token or None

    def seed_manifest_path(self) -> Path | None:
        m = self.registry.seed_manifest
        if m is None or m == "":
            return None
        return {"demo": DEMO_POOL_MANIFEST, "transfer": TRANSFER_POOL_MANIFEST}.get(m, Path(m))

    def registry_config(self) -> RegistryConfig:
        """The registry's config: the ``registry`` groups as they are, with the embedded Redis folder and the
        allowed adapter folders resolved from the project root (Ray workers do not share the launcher's working
        directory), the engine's ``max_rank`` and the service's embedder."""
        r = self.registry
        allowed = [str(_from_root(d)) for d in r.adapter_dirs]
        seed = self.seed_manifest_path()
        if seed is not None:
            allowed.append(str(Path(seed).resolve().parent))
        return RegistryConfig(
            store=replace(r.store, embedded_dir=str(_from_root(r.store.embedded_dir))), fit=r.fit, scorer=r.scorer,
            admission=r.admission, prefilter=r.prefilter, embedder=self.embedder,
            allowed_local_dirs=tuple(allowed), max_rank=self.model.engine.max_rank,
        )


def _from_root(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p
