"""The project's typed errors. Each message quotes the offending value.

Every error subclasses :class:`HiLoRAError` and the builtin that best describes it, so callers
may catch either. Two families:

- the caller's mistakes (``ValueError`` / ``KeyError``: :class:`InvalidInputError`,
  :class:`UnknownAdapterError`, :class:`AdapterLoadError`, ...): HTTP 4xx;
- the service's state (``RuntimeError``: :class:`CapacityError` here,
  ``registry.errors.RegistryUnavailableError``): HTTP 503, worth retrying.

``deployments/errors.py`` is the one place that maps them to status codes.
"""

from __future__ import annotations


class HiLoRAError(Exception):
    """Base class of every typed error of HiLoRA Serve (see the module docstring for the families)."""


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


class PlanTooLargeError(CapacityError):
    """A plan's adapters can never be resident together (more of them than ``max_slots``, or more bytes than
    ``adapter_memory_bytes``): waiting or retrying cannot help (HTTP 422)."""


class AdapterNotReadyError(HiLoRAError, RuntimeError):
    """An adapter is still being read into host memory (the generation loop waits for it, never reads)."""


class QueueFullError(CapacityError):
    """The model replica's queue is full; the request changed nothing and may be retried (HTTP 503)."""


class RequestTimeoutError(HiLoRAError, TimeoutError):
    """A request ran past the server's time limit and was stopped (HTTP 504)."""


class RequestCancelledError(HiLoRAError, RuntimeError):
    """A request was cancelled (its client went away, or the loop shut down)."""
