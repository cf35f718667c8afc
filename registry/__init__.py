"""registry: which adapters exist, where they live, and how a request is scored against them.

Redis-backed store of adapters (metadata + sample embeddings), atomic writes with a pool
epoch and pub/sub change notifications, process-local scorers that follow the store,
a FAISS prefilter for large pools, manifest import and the ``hilora registry`` CLI.
"""

from .adapter_source import AdapterSource, AdapterSpec
from .config import (
    DEFAULT_FIT_SETTINGS,
    AdmissionSettings,
    EmbedderSettings,
    PrefilterSettings,
    RegistryConfig,
    RegistrySettings,
    ScorerSettings,
    StoreSettings,
)
from .connection import EmbeddedRedis, connect
from .decision import AdapterLocation, Decision, OffPoolTest, RoutingSummary
from .errors import (
    ConflictError,
    EmbedderMismatchError,
    ForbiddenSourceError,
    IncompatibleAdapterError,
    RegistryUnavailableError,
)
from .manifest import ImportReport, import_manifest, load_manifest
from .prefilter import MeanIndex, prefilter_scores
from .records import AdapterPage, AdapterRecord, StoredAdapter
from .registry import Registry
from .routing import PoolSnapshot
from .scorer import PoolScorer
from .store import AdapterStore

__all__ = [
    "DEFAULT_FIT_SETTINGS",
    "AdapterPage",
    "AdmissionSettings",
    "AdapterRecord",
    "AdapterSource",
    "AdapterSpec",
    "AdapterStore",
    "ConflictError",
    "EmbeddedRedis",
    "EmbedderSettings",
    "EmbedderMismatchError",
    "ForbiddenSourceError",
    "ImportReport",
    "IncompatibleAdapterError",
    "MeanIndex",
    "PoolScorer",
    "PoolSnapshot",
    "PrefilterSettings",
    "Registry",
    "RegistryConfig",
    "RegistrySettings",
    "RegistryUnavailableError",
    "Decision", "AdapterLocation", "OffPoolTest", "RoutingSummary",
    "ScorerSettings",
    "StoreSettings",
    "StoredAdapter",
    "connect",
    "import_manifest",
    "load_manifest",
    "prefilter_scores",
]
