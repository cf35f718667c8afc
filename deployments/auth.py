"""Bearer-token check of the admin API. No token configured means admin is disabled, not open."""

from __future__ import annotations

import hmac

from fastapi import HTTPException


def check_admin(configured_token: str | None, authorization: str | None, token_env: str) -> None:
    """Raise 403 when admin is disabled, 401 when the bearer token is missing or wrong."""
    if not configured_token:
        raise HTTPException(403, f"the admin API is disabled: set {token_env} to enable it")
    if authorization is None or not authorization.startswith("Bearer "):
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    given = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), configured_token.encode()):
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
