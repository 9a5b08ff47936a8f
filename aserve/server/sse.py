"""Server-Sent Events framed as OpenAI's chat and completions do (`data: <json>\\n\\n` ...
`data: [DONE]\\n\\n`) or as typed events (`event: <type>\\ndata: <json>\\n\\n`, Anthropic's Messages)."""

import asyncio
from collections.abc import Awaitable

import orjson
from aiohttp import web

HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer a stream
}


class ClientGone(Exception):
    """The client closed the connection, or (`stalled`) stopped reading for longer than the write timeout."""

    def __init__(self, message: str, stalled: bool = False) -> None:
        super().__init__(message)
        self.stalled = stalled


class SSEWriter:
    def __init__(self, request: web.Request, write_timeout: float | None = None) -> None:
        """`write_timeout`: seconds one write may wait for the client to take data (None: forever)."""
        self._request = request
        self._write_timeout = write_timeout or None
        self.response = web.StreamResponse(status=200, headers=HEADERS)

    @property
    def started(self) -> bool:
        """Whether the 200 headers have been sent."""
        return self.response.prepared

    async def start(self) -> None:
        await self.response.prepare(self._request)

    async def send(self, obj: dict, event: str | None = None) -> None:
        head = b"event: " + event.encode() + b"\n" if event else b""
        await self._write(head + b"data: " + orjson.dumps(obj) + b"\n\n")

    async def comment(self, text: str) -> None:
        """An SSE comment line: clients ignore it, proxies and browsers see the connection live."""
        await self._write(b": " + text.encode() + b"\n\n")

    async def done(self, marker: bool = True) -> None:
        """Ends the stream, after OpenAI's `data: [DONE]` unless `marker` is False."""
        if marker:
            await self._write(b"data: [DONE]\n\n")
        await self._guarded(self.response.write_eof())  # always waits for the client to take the rest

    def abort(self) -> None:
        """Cuts the connection: for a client that stopped reading, whose buffers hold unsent data."""
        if (transport := self._request.transport) is not None:
            transport.abort()

    async def _write(self, data: bytes) -> None:
        await self._guarded(self.response.write(data))

    async def _guarded(self, write: Awaitable[None]) -> None:
        # A write waits only when the socket's buffers are full: the client stopped reading.
        try:
            async with asyncio.timeout(self._write_timeout):
                await write
        except TimeoutError:
            raise ClientGone(f"the client read nothing for {self._write_timeout} s", stalled=True) from None
        except ConnectionError as exc:  # reset, or aiohttp's "Connection lost" for a paused write
            raise ClientGone(f"the client closed the connection ({exc})") from None
