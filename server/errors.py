"""OpenAI-shaped errors: every non-2xx body is {"error": {"message", "type", "param", "code"}}.

One model, `ErrorResponse`, is that body wherever an error is written: JSON answers (`APIError.response`),
uvicorn's 400 for a request it cannot parse (server/http.py), a stream's `error` event (`ErrorEvent`) and the
error responses of /openapi.json. The OpenAI SDKs pick their exception class from the status code and retry
408/409/429/5xx, so the status codes matter as much as the body.
"""

from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ErrorEvent(BaseModel):
    """An error after a stream began: the `error` event, which the OpenAI SDK raises."""

    type: Literal["error"] = "error"
    error: ErrorBody


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def error(self) -> ErrorBody:
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.error())

    def event(self) -> ErrorEvent:
        return ErrorEvent(error=self.error())

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 5) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def too_many(message: str, code: str, retry_after: int) -> APIError:
    """429: the server is at a bound (the queue, input memory or disk) or the caller at its share of it; the OpenAI SDK
    retries after Retry-After."""
    return APIError(429, message, code=code, headers={"Retry-After": str(retry_after)})


def timed_out(seconds: float) -> APIError:
    return APIError(
        504, f"The request did not finish within {seconds:g} seconds.", type="timeout_error", code="timeout"
    )


def shutting_down() -> APIError:
    return unavailable("The server is shutting down; retry on another instance.", "shutting_down", 1)


def param_of(loc: tuple) -> str | None:
    """('body', 'images', 0, 'image_url') -> 'images[0].image_url'."""
    parts = [p for p in loc if p not in ("body", "query", "path", "form")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _is_union_tag(p):
            out += ("." if out else "") + p
    return out or None


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member in `loc` ('int', 'list[int]', 'function-after[...]'); fields never look so."""
    return part in ("int", "str", "float", "bool", "dict", "list", "none") or "[" in part or "-" in part


def from_validation(exc: ValidationError | RequestValidationError) -> APIError:
    first = exc.errors()[0]
    param = param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return bad_request(f"We could not parse the JSON body of your request: {message}", None, "invalid_json")
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    prefix = f"Invalid value for '{param}': " if param else ""
    return bad_request(prefix + message.removeprefix("Value error, "), param)


def internal_error() -> APIError:
    """What the client sees of a bug: an OpenAI-shaped 500, never a stack trace (the log has it)."""
    return APIError(500, "The server had an error while processing your request.", code="internal_error")


def install(app: FastAPI) -> None:
    """Errors raised in routes; anything else becomes `internal_error` in the RequestLog middleware."""

    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc).response()

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
        error = APIError(exc.status_code, message, code=codes.get(exc.status_code), headers=exc.headers)
        return error.response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
