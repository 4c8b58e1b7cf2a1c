"""SGLang's error answers, read one way: FastAPI's {"detail": ...}, its own {"error": ...}, or plain text."""

import httpx


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)[:500]
    return str(body)[:500]
