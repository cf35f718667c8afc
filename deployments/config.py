"""The application's settings: one validated model, read from ``serve_config.yaml``'s ``args``.

Every field has a default that runs on a 2-core CPU machine with the embedded
models, the embedded Redis and the demo pool. Environment overrides:
``REDIS_URL`` (registry), ``HILORA_ADMIN_TOKEN`` (admin API; unset = admin disabled).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hilora_core.engine.batching import BatchingSettings
from hilora_core.engine.settings import EngineSettings
from hilora_core.policies import POLICIES, PolicyConfig
from registry.config import DEFAULT_FIT_SETTINGS, RegistryConfig

# The algorithm's and the registry's own defaults, read here instead of written again.
_ENGINE, _BATCHING, _POLICY, _REGISTRY = EngineSettings(), BatchingSettings(), PolicyConfig(), RegistryConfig()

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_POOL_MANIFEST = PROJECT_ROOT / "examples" / "demo_pool" / "manifest.json"
TRANSFER_POOL_MANIFEST = PROJECT_ROOT / "examples" / "transfer_pool" / "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSettings(_Strict):
    base: str | None = Field(None, description="HF folder / hub id / .gguf; None = embedded SmolLM2-135M-Instruct")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu' or 'cuda[:N]'")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="'auto': float32 on CPU, bfloat16 on CUDA")
    max_slots: int = Field(_ENGINE.max_slots, ge=1, description="adapters resident on the device at once")
    host_cache_size: int = Field(_ENGINE.host_cache_size, ge=1, description="adapters kept in host memory (LRU)")
    max_rank: int = Field(_ENGINE.max_rank, ge=1, description="largest LoRA rank a device slot holds (higher-rank "
                                                              "adapters are refused at registration)")
    max_adapter_bytes: int = Field(_ENGINE.max_adapter_bytes, ge=1,
                                   description="largest adapter weights file loaded or downloaded (bytes)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per replica (None: torch default)")
    scheduler: Literal["continuous", "static"] = Field(
        "continuous", description="'continuous': one generation loop, requests join and leave between decode "
        "steps; 'static': the earlier path (serve.batch batches, one stream at a time), kept for comparison")
    max_rows: int = Field(_BATCHING.max_rows, ge=1, description="rows decoding at once (continuous)")
    max_waiting: int = Field(_BATCHING.max_waiting, ge=0,
                             description="requests queued for a row; beyond it HTTP 503 (continuous)")
    max_tokens_per_sequence: int = Field(_BATCHING.max_tokens_per_sequence, ge=1,
                                         description="prompt + generated tokens of one request (KV memory)")
    prefill_tokens_per_step: int = Field(_BATCHING.prefill_tokens_per_step, ge=1,
                                         description="prompt tokens prefilled between two decode steps")
    request_timeout_s: float | None = Field(_BATCHING.request_timeout_s, gt=0,
                                            description="requests running longer end with HTTP 504")
    max_batch_size: int = Field(8, ge=1, description="requests merged into one batch (static scheduler)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill (static)")

    def batching(self) -> BatchingSettings:
        return BatchingSettings(self.max_rows, self.max_waiting, self.max_tokens_per_sequence,
                                self.prefill_tokens_per_step, self.request_timeout_s)


class EmbedderSettings(_Strict):
    model: str | None = Field(None, description="sentence-transformers model; None = offline all-MiniLM-L6-v2")
    instruction: str | None = Field(None, description="embedding instruction; None = hilora_core's default")
    revision: str | None = None
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)


class RegistrySettings(_Strict):
    redis_url: str | None = Field(
        None, description="redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/<primary> or "
                          "redis+cluster://host:port[,host:port] URL; None = $REDIS_URL, else embedded Redis")
    embedded_dir: str = Field(_REGISTRY.embedded_dir, description="data folder of the embedded Redis (persistent)")
    key_prefix: str = _REGISTRY.key_prefix
    eps: float | None = Field(DEFAULT_FIT_SETTINGS.eps, gt=0,
                              description="fixed eps; None = calibrated by leave-one-out")
    target_rate: float = Field(DEFAULT_FIT_SETTINGS.target_rate, gt=0, le=1, description="calibration target rate")
    prefilter_min_pool: int = Field(_REGISTRY.prefilter_min_pool, ge=1,
                                    description="FAISS prefilter from this pool size on")
    hub_lookup: bool = Field(_REGISTRY.hub_lookup, description="read adapter_config.json of hub adapters from the Hub")
    adapter_dirs: list[str] = Field(
        [], description="local folders the admin API may register adapters from (relative paths: from the project "
                        "root), besides the seed pool's own folder; any other local path gets HTTP 403")
    min_replica_acks: int = Field(
        _REGISTRY.min_replica_acks, ge=0,
        description="a registration is acknowledged only once this many Redis replicas hold it (WAIT); "
                    "1 with a Sentinel-managed primary and replica: no acknowledged registration is lost on failover")
    replica_ack_timeout_ms: int = Field(_REGISTRY.replica_ack_timeout_ms, ge=0)
    store_fit_every: int = Field(
        _REGISTRY.store_fit_every, ge=0,
        description="large pools keep their fitted Gaussians in Redis for new replicas to start from; rewritten "
                    "after this many changes (0 = never)")
    max_target_modules: int = Field(_REGISTRY.max_target_modules, ge=1,
                                    description="adapters adapting more module names are refused (HTTP 422)")
    seed_manifest: str | None = Field(
        "demo", description="pool manifest registered when the pool is empty at start ('demo' = the demo pool, "
                "'transfer' = the transfer pool, or a manifest path)")


class RoutingSettings(_Strict):
    model_alias: str = Field("hilora", description="the `model` value that selects automatic routing")
    policy: str = Field(_POLICY.name.value, description="default policy of the alias")
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
    registry: RegistrySettings = RegistrySettings()
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

    def registry_config(self):
        """The registry package's own config built from these settings."""
        from dataclasses import replace

        fit = replace(DEFAULT_FIT_SETTINGS, eps=self.registry.eps, target_rate=self.registry.target_rate)
        embedded = Path(self.registry.embedded_dir)
        if not embedded.is_absolute():  # Ray workers do not share the launcher's working directory
            embedded = PROJECT_ROOT / embedded
        allowed = [str(d if Path(d).is_absolute() else PROJECT_ROOT / d) for d in self.registry.adapter_dirs]
        seed = self.seed_manifest_path()
        if seed is not None:
            allowed.append(str(Path(seed).resolve().parent))
        return RegistryConfig(
            allowed_local_dirs=tuple(allowed), max_rank=self.model.max_rank,
            max_target_modules=self.registry.max_target_modules,
            redis_url=self.registry.redis_url, embedded_dir=str(embedded),
            key_prefix=self.registry.key_prefix, fit=fit, prefilter_min_pool=self.registry.prefilter_min_pool,
            hub_lookup=self.registry.hub_lookup, embedder_model=self.embedder.model,
            embedder_instruction=self.embedder.instruction, min_replica_acks=self.registry.min_replica_acks,
            replica_ack_timeout_ms=self.registry.replica_ack_timeout_ms, store_fit_every=self.registry.store_fit_every,
        )
