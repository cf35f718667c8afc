"""Typed errors of the registry (all subclass :class:`hilora_core.errors.HiLoRAError`).

Unknown ids raise :class:`hilora_core.errors.UnknownAdapterError`; malformed input
raises :class:`hilora_core.errors.InvalidInputError`; unreadable adapter configs raise
:class:`hilora_core.errors.AdapterLoadError`.
"""

from __future__ import annotations

from hilora_core.errors import AdapterLoadError, HiLoRAError, InvalidInputError


class ConflictError(HiLoRAError, ValueError):
    """An adapter id is already registered and ``replace`` was not asked for."""


class ForbiddenSourceError(HiLoRAError, PermissionError):
    """A local adapter folder outside the folders the registry may load from (``allowed_local_dirs``)."""


class RegistryUnavailableError(HiLoRAError, RuntimeError):
    """Redis cannot be reached: writes are refused; scorers serve their last copy (degraded)."""


class EmbedderMismatchError(InvalidInputError):
    """Embeddings made with one embedder were about to be compared with another's."""


class IncompatibleAdapterError(AdapterLoadError):
    """An adapter's config contradicts the registration (base model, rank, alpha, targets)."""
