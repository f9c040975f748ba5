"""The two small services of ``tether demo``: a backend that serves books and a web API that calls it.

They are ordinary applications, not part of the mesh: each speaks plain HTTP/1.1 (h11 over anyio) and
knows nothing of Tether except the address of the proxy in front of whatever it calls.
"""

from __future__ import annotations

import json
import random

import anyio
import h11
import httpx

JSON = "application/json"


class BackendApp:
    """``GET /books/N``: a small JSON document after a short, random delay."""

    def __init__(
        self, rng: random.Random, *, latency_ms: tuple[float, float] = (1.0, 8.0), failure_rate: float = 0.0
    ) -> None:
        self.rng = rng
        self.latency_ms = latency_ms
        self.failure_rate = failure_rate

    async def __call__(self, request: h11.Request, body: bytes) -> tuple[int, bytes, str]:
        await anyio.sleep(self.rng.uniform(*self.latency_ms) / 1000)
        if self.rng.random() < self.failure_rate:
            return 500, b'{"error": "backend failure (injected)"}', JSON
        book = request.target.decode().rsplit("/", 1)[-1]
        return 200, json.dumps({"id": book, "title": f"Book {book}", "pages": 100 + len(book) * 7}).encode(), JSON


class WebApp:
    """``GET /api/books/N``: asks the backend, through the backend's proxy, and wraps the answer."""

    def __init__(self, backend_via_proxy: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=backend_via_proxy, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=32)
        )

    async def __call__(self, request: h11.Request, body: bytes) -> tuple[int, bytes, str]:
        book = request.target.decode().rsplit("/", 1)[-1]
        try:
            answer = await self.client.get(f"/books/{book}", headers={"host": "backend"})
        except httpx.HTTPError as error:
            return 502, json.dumps({"error": f"backend unreachable: {error}"}).encode(), JSON
        if answer.status_code != 200:
            return 502, json.dumps({"error": f"backend answered {answer.status_code}"}).encode(), JSON
        return 200, json.dumps({"book": answer.json(), "served_by": "web"}).encode(), JSON

    async def aclose(self) -> None:
        await self.client.aclose()
