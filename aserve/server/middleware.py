"""Request ids, Host and API-key checks: what every route shares before its handler runs."""

import hmac
import ipaddress
import re
import uuid

from aiohttp import web

from aserve.server.errors import APIError

REQUEST_ID = "X-Request-Id"
_CLIENT_ID = re.compile(r"[\w\-.:/=+]{1,128}")  # an id we echo into headers and logs: no spaces, no control chars
# Load balancers and Kubernetes probe /health and /health/live, routers poll /load and /get_load
# (a count /health shows anyway) without the clients' key; / and /chat are the chat page, which
# asks for the key.
OPEN_PATHS = frozenset({"/health", "/health/live", "/load", "/get_load", "/", "/chat"})
_ID_KEY = web.RequestKey("request_id", str)


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one; fixed per request."""
    if _ID_KEY not in request:
        given = request.headers.get(REQUEST_ID, "")
        request[_ID_KEY] = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
    return request[_ID_KEY]


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs before the headers of any response go out, streams included."""
    response.headers[REQUEST_ID] = request_id(request)


def api_key_middleware(api_key: str, protect_metrics: bool):
    expected = api_key.encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        open_path = (request.path in OPEN_PATHS or request.path.startswith("/static/")
                     or (request.path == "/metrics" and not protect_metrics))
        # Preflight requests carry no credentials by design (the CORS layer answers them).
        if not open_path and request.method != "OPTIONS":
            # "Authorization: Bearer KEY" (OpenAI's SDK), or "x-api-key: KEY" (Anthropic's).
            scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 9110)
                given = request.headers.get("x-api-key", "")
            # Compared in constant time, so no one can guess the key by timing.
            if not hmac.compare_digest(given.strip().encode(), expected):
                raise APIError("invalid or missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                               status=401, code="invalid_api_key")
        return await handler(request)

    return check


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host name is this machine's loopback."""
    name = host.strip().lower().strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_check_middleware(allowed_hosts: str | None):
    """On a server bound to loopback: requests whose Host is not a loopback name or address, nor
    one of `allowed_hosts`, get 403. A web page that rebinds its own domain to 127.0.0.1 (DNS
    rebinding) sends its domain as the Host, so it cannot read a local server's answers."""
    allowed = {h.strip().lower() for h in (allowed_hosts or "").split(",") if h.strip()}

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        try:
            name = (request.url.host or "").lower()  # the Host header without its port
        except ValueError:  # a Host aiohttp cannot parse
            name = ""
        if not (is_loopback(name) or name in allowed):
            raise APIError(f"Host {request.host!r} is not allowed: this server is bound to a loopback address; "
                           "start it with --allowed-hosts to accept that name", status=403, code="host_not_allowed")
        return await handler(request)

    return check
