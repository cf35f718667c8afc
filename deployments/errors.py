"""Mapping errors to HTTP responses at the boundary: a client mistake is never a 500."""

from __future__ import annotations

from fastapi import HTTPException

from hilora_core.errors import (
    AdapterLoadError,
    CapacityError,
    HiLoRAError,
    InvalidInputError,
    RequestCancelledError,
    RequestTimeoutError,
    UnknownAdapterError,
    UnsupportedModelError,
)

RETRY_AFTER_S = 1  # seconds a client is told to wait after a 503 (queue full, registry or slots busy)


def _cause(err: BaseException) -> BaseException:
    """The original exception behind a Ray task error, if any."""
    for attr in ("cause", "__cause__"):
        inner = getattr(err, attr, None)
        if isinstance(inner, BaseException) and inner is not err:
            return _cause(inner)
    return err


def status_for(err: BaseException) -> int | None:
    """HTTP status for a known error type, or None for an unexpected one."""
    from ray.serve.exceptions import BackPressureError

    from registry.errors import ConflictError, RegistryUnavailableError

    for e in (err, _cause(err)):
        if isinstance(e, BackPressureError):
            return 503
        if isinstance(e, UnknownAdapterError):
            return 404
        if isinstance(e, ConflictError):
            return 409
        if isinstance(e, (RegistryUnavailableError, CapacityError, RequestCancelledError)):
            return 503
        if isinstance(e, RequestTimeoutError):
            return 504
        if isinstance(e, (AdapterLoadError, UnsupportedModelError, InvalidInputError, HiLoRAError)):
            return 422
    return None


def message_of(err: BaseException) -> str:
    e = _cause(err)
    text = str(e)
    # Ray prefixes remote errors with a traceback; keep the last line, which is the message
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def to_http(err: BaseException) -> HTTPException:
    status = status_for(err)
    if status is None:
        raise err
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return HTTPException(status_code=status, detail=message_of(err), headers=headers)
