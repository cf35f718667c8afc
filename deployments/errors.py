"""Errors at the HTTP boundary: typed exceptions to statuses (a client mistake is never a 500), and the one
error body every error response carries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from hilora_core.errors import (
    AdapterLoadError,
    CapacityError,
    HiLoRAError,
    InvalidInputError,
    PlanTooLargeError,
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
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError

    from registry.errors import ConflictError, ForbiddenSourceError, RegistryUnavailableError

    for e in (err, _cause(err)):
        if isinstance(e, (BackPressureError, RayActorError, ActorUnavailableError)):
            return 503  # busy, or the replica (or its node) died mid-request: retry elsewhere
        if isinstance(e, UnknownAdapterError):
            return 404
        if isinstance(e, ConflictError):
            return 409
        if isinstance(e, ForbiddenSourceError):
            return 403
        if isinstance(e, PlanTooLargeError):
            return 422  # the plan's adapters exceed the replica's adapter memory: retrying cannot help
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
    return text.strip().splitlines()[-1].strip() if text.strip() else type(e).__name__


@contextmanager
def http_errors() -> Iterator[None]:
    """The one place where errors of the request path become HTTP: a typed error raised inside (here or in
    a deployment the call awaited) becomes its 4xx / 503 / 504 :class:`HTTPException`; anything else
    propagates (a 500)."""
    try:
        yield
    except HTTPException:
        raise
    except Exception as err:  # noqa: BLE001 - to_http re-raises anything unexpected
        raise to_http(err) from None


def to_http(err: BaseException) -> HTTPException:
    status = status_for(err)
    if status is None:
        raise err
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return HTTPException(status_code=status, detail=message_of(err), headers=headers)


# ---- the error body: one shape for every error the API returns (OpenAI's) -------------------------

class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, for a person")
    type: str = Field(description="a category, e.g. invalid_request_error, service_unavailable")
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: int = Field(description="the HTTP status")


class ErrorBody(BaseModel):
    """Every error response, as OpenAI's API shapes it: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


_KINDS = {400: ("invalid_request_error", "malformed request"),
          401: ("authentication_error", "missing or wrong admin bearer token"),
          403: ("permission_error", "the admin API is disabled, or a local adapter folder is not allowed"),
          404: ("not_found_error", "unknown model or adapter"),
          405: ("invalid_request_error", "method not allowed"),
          409: ("conflict_error", "the adapter id is taken (send replace: true)"),
          413: ("invalid_request_error", "prompt over the configured size limit"),
          422: ("invalid_request_error", "a field is invalid, unsupported, or over a limit"),
          503: ("service_unavailable", "busy (queue full, see Retry-After) or the registry is unreachable"),
          504: ("timeout", "the request ran past its deadline")}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", ""))[0]
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def declared(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for a route's error statuses, each with the one error body."""
    return {s: {"model": ErrorBody, "description": _KINDS[s][1]} for s in statuses}


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """'field.path: problem; ...' and the first field's path, from FastAPI's validation error."""
    parts, first = [], None
    for e in err.errors():
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header")]
        path = ".".join(loc) or None
        first = first or path
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{path}: {msg}" if path else msg)
    return "; ".join(parts) or "invalid request", first


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every HTTP error, FastAPI's validation errors and Starlette's 404/405 included, gets :class:`ErrorBody`."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(422, message, param), status_code=422)
