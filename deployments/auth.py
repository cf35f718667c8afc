"""Bearer-token check of the admin API. No token configured means admin is disabled, not open."""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from fastapi.security import HTTPBearer

# The admin routes' security scheme in the OpenAPI schema; the check itself is check_admin's.
ADMIN_BEARER = HTTPBearer(auto_error=False, scheme_name="admin", description="the admin token (HILORA_ADMIN_TOKEN)")


def check_admin(configured_token: str | None, given: str | None, token_env: str) -> None:
    """Raise 403 when admin is disabled, 401 when the bearer token ``given`` is missing or wrong."""
    if not configured_token:
        raise HTTPException(403, f"the admin API is disabled: set {token_env} to enable it")
    if not given:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), configured_token.encode()):
        raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
