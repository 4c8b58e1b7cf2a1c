"""SGLang's answers, bounded (a child that misbehaves cannot fill the server's memory), and its errors: what a
caller is told (what SGLang refused, and its status) and what the log gets (SGLang's own words, which may hold
its paths, ours and its tracebacks)."""

import logging

import httpx

from server.errors import APIError

log = logging.getLogger("server.engines.sglang")

MAX_ANSWER = 2**20  # bytes of an answer that carries no images: a job, a list, an error


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


def read_bounded(response: httpx.Response, limit: int = MAX_ANSWER) -> httpx.Response:
    """A streamed answer read to its end, as a response of its body (undecoded: SGLang compresses nothing), or
    a 500 past `limit` bytes (the rest is never read)."""
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > limit:
            log.error("SGLang answered more than %d bytes to %s", limit, response.request.url.path)
            raise APIError(500, "SGLang answered more than the call can need.", code="engine_error")
    headers = {"content-type": response.headers.get("content-type", "")}
    return httpx.Response(response.status_code, headers=headers, content=bytes(body), request=response.request)
