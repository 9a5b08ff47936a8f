"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} for every failure."""

import logging

import orjson
from aiohttp import web

log = logging.getLogger("aserve.server")

# OpenAI itself answers an unknown model with 404 and type invalid_request_error.
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error"}


def json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        # The spec requires all four keys, with code a string or null (never an integer).
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return json_response(self.body(), self.status)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as exc:
        return exc.response()
    except web.HTTPRequestEntityTooLarge:
        # aiohttp's exception does not keep the sizes (its max_size/actual_size are only
        # used for its text), so name the limit from the request.
        return APIError(f"request body too large: the limit is {request.client_max_size} bytes",
                        status=413, code="request_too_large").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status)
        message = f"{request.method} {request.path}: {exc.reason}"
        response = APIError(message, status=exc.status, code=code).response()
        if "Allow" in exc.headers:  # a 405 must say which methods the resource allows (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return APIError("internal server error", status=500).response()
