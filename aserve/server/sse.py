"""Server-Sent Events framed exactly as OpenAI does: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`."""

import orjson
from aiohttp import web

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer a stream
}


class SSEWriter:
    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(status=200, headers=HEADERS)

    async def start(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, obj: dict) -> None:
        await self.response.write(b"data: " + orjson.dumps(obj) + b"\n\n")

    async def comment(self, text: str) -> None:
        """An SSE comment line: clients ignore it, proxies and browsers see the connection live."""
        await self.response.write(b": " + text.encode() + b"\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
