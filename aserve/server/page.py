"""GET /: the browser chat page (static files shipped in the package, no build step, no CDN)."""

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).parent / "static"


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def add_page_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    # The same page where a router in front passes it through: vllm-router forwards GET /chat
    # to a replica, not GET /, and the page's own calls then go through the router too.
    app.router.add_get("/chat", index)
    app.router.add_static("/static/", STATIC_DIR)
