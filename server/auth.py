"""Bearer-token auth for /v1/*: on when API_KEY names one or more keys."""

import hashlib
import hmac

from fastapi import Request

from server.errors import APIError


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


async def require_api_key(request: Request) -> None:
    settings = request.app.state.settings
    if settings.api_keys:
        check_key(request, settings.api_keys + settings.admin_keys)


def owner(request: Request) -> str:
    """Who owns what a request creates (video jobs): a digest of its API key; "" when the server has no keys."""
    if not request.app.state.settings.api_keys:
        return ""
    return hashlib.sha256(presented_key(request).encode()).hexdigest()[:32]
