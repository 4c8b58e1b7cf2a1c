"""Bearer-token auth for /v1/*: on when API_KEY names one or more keys. And who a request is queued as, its tenant:
the name a trusted gateway gives the caller (TENANT_HEADER), else its key, else everyone is one tenant."""

import hashlib
import hmac

from fastapi import Request

from server.config import TENANT_NAME, Settings
from server.errors import APIError, bad_request

DEFAULT_TENANT = "default"  # no keys and no gateway header: every request is this one tenant


def presented_key(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    # compare against every key, so the time taken does not tell which one nearly matched
    matches = [hmac.compare_digest(token.encode(), key.encode()) for key in keys]
    return any(matches)


def check_key(request: Request, keys: tuple[str, ...]) -> None:
    token = presented_key(request)
    if not token:
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
        )
    if not key_matches(token, keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def key_digest(key: str) -> str:
    """A key's SHA-256, in hex: what names it in logs, TENANT_WEIGHTS and video ownership, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_label(key: str) -> str:
    """A key's name as a tenant, in logs and TENANT_WEIGHTS."""
    return "key-" + key_digest(key)[:12]


def tenant_of(request: Request, settings: Settings) -> str:
    """The tenant of a request whose key (if keys are on) was checked. A key presented to a server without keys
    names nobody: otherwise a caller could make up a new tenant, and a new share, with every request."""
    if settings.tenant_header and (named := request.headers.get(settings.tenant_header)) is not None:
        if not TENANT_NAME.fullmatch(named):
            raise bad_request(
                f"The {settings.tenant_header} header must be a name of letters, digits, '.', '_' and '-' "
                "(at most 64 characters).",
                settings.tenant_header,
            )
        return named
    token = presented_key(request)
    return key_label(token) if settings.api_keys and token else DEFAULT_TENANT


async def require_api_key(request: Request) -> str:
    """Checks the key; returns the request's tenant, also kept for the request's log line."""
    settings = request.app.state.settings
    if settings.api_keys:
        check_key(request, settings.api_keys + settings.admin_keys)
    request.state.tenant = tenant_of(request, settings)
    return request.state.tenant


def owner(request: Request) -> str:
    """Who owns what a request creates (video jobs): a digest of its API key; "" when the server has no keys."""
    if not request.app.state.settings.api_keys:
        return ""
    return key_digest(presented_key(request))[:32]
