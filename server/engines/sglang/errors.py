"""SGLang's error answers: what a caller is told (what SGLang refused, and its status) and what the log gets
(SGLang's own words, which may hold its paths, ours and its tracebacks)."""

import logging

import httpx

log = logging.getLogger("server.engines.sglang")


def error_text(response: httpx.Response) -> str:
    """SGLang's reason, read one way: FastAPI's {"detail": ...}, its own {"error": ...}, or plain text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)[:500]
    return str(body)[:500]


def refused(what: str, response: httpx.Response) -> str:
    """The message for a caller; SGLang's reason goes to the log."""
    log.warning("SGLang refused %s (HTTP %d): %s", what, response.status_code, error_text(response))
    return f"SGLang refused {what} (HTTP {response.status_code}; the server log has its reason)."
