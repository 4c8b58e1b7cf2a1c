"""SGLang's answers, read one way and bounded: FastAPI's {"detail": ...}, its own {"error": ...}, or plain
text; and never more bytes than the call can need (a child that misbehaves cannot fill the server's memory)."""

import httpx

from server.errors import APIError

MAX_ANSWER = 2**20  # bytes of an answer that carries no images: a job, a list, an error


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)[:500]
    return str(body)[:500]


def _too_large(limit: int) -> APIError:
    return APIError(500, f"SGLang answered more than {limit} bytes; the server log has the call.", code="engine_error")


def _whole(response: httpx.Response, body: bytes) -> httpx.Response:
    """The answer as a response of its body, read (undecoded: SGLang compresses nothing)."""
    headers = {"content-type": response.headers.get("content-type", "")}
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)


def read_bounded(response: httpx.Response, limit: int = MAX_ANSWER) -> httpx.Response:
    """A streamed answer read to its end, or a 500 past `limit` bytes (the rest is never read)."""
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return _whole(response, bytes(body))


async def aread_bounded(response: httpx.Response, limit: int = MAX_ANSWER) -> httpx.Response:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return _whole(response, bytes(body))
