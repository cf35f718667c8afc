"""Typed errors a caller can cause. Each message quotes the offending value.

Every error here subclasses both :class:`HiLoRAError` and the builtin that best
describes it (``ValueError``, ``KeyError``...), so callers may catch either.
The HTTP layer maps them to 4xx responses.
"""

from __future__ import annotations


class HiLoRAError(Exception):
    """Base class of every error raised on behalf of bad caller input."""


class InvalidInputError(HiLoRAError, ValueError):
    """A value is out of range, has the wrong shape, or is not finite."""


class DimensionMismatchError(InvalidInputError):
    """Two arrays that must share a dimension do not."""


class EmptyPoolError(InvalidInputError):
    """An operation needs at least one adapter and got none."""


class UnknownAdapterError(HiLoRAError, KeyError):
    """An adapter name is not known to the engine or registry."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else "unknown adapter"


class AdapterLoadError(HiLoRAError, ValueError):
    """An adapter's files are missing, unsafe (pickle), corrupt, or do not fit the base model."""


class UnsupportedModelError(HiLoRAError, ValueError):
    """The base model's architecture is not supported."""


class CapacityError(HiLoRAError, RuntimeError):
    """A batch needs more adapter slots than the engine has."""
