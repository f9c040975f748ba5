"""The two small services of ``tether demo``: a backend that serves books and a web API that calls it.

They are ordinary applications, not part of the mesh: each speaks plain HTTP/1.1 (h11 over anyio) and
knows nothing of Tether except the address of the proxy in front of whatever it calls.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import h11
import httpx

Handler = Callable[[h11.Request], Awaitable[tuple[int, bytes]]]
MAX_REQUEST_BODY = 1024 * 1024


async def serve_http(listener: anyio.abc.SocketListener, handler: Handler) -> None:
    """Serve ``handler`` on every connection of ``listener`` until cancelled."""
    await listener.serve(lambda stream: _connection(stream, handler))


async def _connection(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    parser = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request, ok = await _read_request(stream, parser)
            if request is None:
                return
            status, body = await handler(request) if ok else (400, b"bad request\n")
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            try:
                await stream.send(
                    parser.send(h11.Response(status_code=status, headers=headers))
                    + parser.send(h11.Data(data=body))
                    + parser.send(h11.EndOfMessage())
                )
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                return
            parser.start_next_cycle()


async def _read_request(stream: anyio.abc.SocketStream, parser: h11.Connection) -> tuple[h11.Request | None, bool]:
    request: h11.Request | None = None
    body_bytes = 0
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            return None, False
        if event is h11.NEED_DATA:
            try:
                parser.receive_data(await stream.receive(65536))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                parser.receive_data(b"")
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body_bytes += len(event.data)
            if body_bytes > MAX_REQUEST_BODY:
                return request, False
        elif isinstance(event, h11.EndOfMessage):
            return request, True
        else:
            return None, False


class BackendApp:
    """``GET /books/N``: a small JSON document after a short, random delay."""

    def __init__(
        self, rng: random.Random, *, latency_ms: tuple[float, float] = (1.0, 8.0), failure_rate: float = 0.0
    ) -> None:
        self.rng = rng
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate

    async def __call__(self, request: h11.Request) -> tuple[int, bytes]:
        await anyio.sleep(self.rng.uniform(*self.latency_ms) / 1000)
        if self.rng.random() < self.failure_rate:
            return 500, b'{"error": "backend failure (injected)"}'
        book = request.target.decode().rsplit("/", 1)[-1]
        return 200, json.dumps({"id": book, "title": f"Book {book}", "pages": 100 + len(book) * 7}).encode()


class WebApp:
    """``GET /api/books/N``: asks the backend, through the backend's proxy, and wraps the answer."""

    def __init__(self, backend_via_proxy: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=backend_via_proxy, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=32)
        )

    async def __call__(self, request: h11.Request) -> tuple[int, bytes]:
        book = request.target.decode().rsplit("/", 1)[-1]
        try:
            answer = await self.client.get(f"/books/{book}", headers={"host": "backend"})
        except httpx.HTTPError as error:
            return 502, json.dumps({"error": f"backend unreachable: {error}"}).encode()
        if answer.status_code != 200:
            return 502, json.dumps({"error": f"backend answered {answer.status_code}"}).encode()
        return 200, json.dumps({"book": answer.json(), "served_by": "web"}).encode()

    async def aclose(self) -> None:
        await self.client.aclose()
