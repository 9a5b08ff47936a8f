"""Errors in the shape of the API asked: OpenAI's {"error": {"message", "type", "param", "code"}}
everywhere, Anthropic's {"type": "error", "error": {"type", "message"}} under /v1/messages."""

import logging
from collections.abc import Callable

import orjson
from aiohttp import web

log = logging.getLogger("aserve.server")

# OpenAI itself answers an unknown model with 404 and type invalid_request_error.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error"}


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        # The spec requires all four keys, with code a string or null (never an integer).
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict:
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(self.status, "api_error"),
                                           "message": self.message}}

    def response(self, anthropic: bool = False) -> web.Response:
        response = json_response(self.anthropic_body() if anthropic else self.body(), self.status)
        response.headers.update(self.headers)
        return response


# Anthropic's error types by status (its API reference, "Errors")
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_path(path: str) -> bool:
    """Routes whose errors take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Called with (error type, status, code) for every error response, for metrics.
ERROR_HOOK: web.AppKey[Callable[[str, int, str | None], None]] = web.AppKey("error_hook", Callable)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(request, exc)
    except APIError as exc:
        error = exc
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        error = APIError("internal server error", status=500)
    if (hook := request.app.get(ERROR_HOOK)) is not None:
        hook(error.type, error.status, error.code)
    return error.response(anthropic=anthropic_path(request.path))


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        # aiohttp's exception does not keep the sizes (its max_size/actual_size are only
        # used for its text), so name the limit from the request.
        return APIError(f"request body too large: the limit is {request.client_max_size} bytes",
                        status=413, code="request_too_large")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
    # A 405 must say which methods the resource allows (RFC 9110).
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return APIError(f"{request.method} {request.path}: {exc.reason}", status=exc.status, code=code, headers=headers)
