"""A WebSocket echo through a real `tether proxy` (the `websockets` package on both ends)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect
from websockets.sync.server import Server, ServerConnection, serve

pytestmark = pytest.mark.realsocket


@pytest.fixture
def echo_server() -> Iterator[Server]:
    def echo(connection: ServerConnection) -> None:
        for message in connection:
            connection.send(message)

    server = serve(echo, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_websocket_echo_through_proxy(echo_server: Server, tether_proxy_to) -> None:
    port = echo_server.socket.getsockname()[1]
    proxy = tether_proxy_to(port)
    with connect(f"ws://127.0.0.1:{proxy.port}/echo", open_timeout=10, close_timeout=5) as websocket:
        for message in ["hello", "x" * 100_000, "bye"]:
            websocket.send(message)
            assert websocket.recv(timeout=10) == message
        websocket.send(b"\x00\x01binary")
        assert websocket.recv(timeout=10) == b"\x00\x01binary"
