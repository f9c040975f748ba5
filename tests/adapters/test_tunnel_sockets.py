"""Opaque TCP through a real `tether proxy`: half-close, server-speaks-first, and detection of HTTP."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.realsocket


def serve_once(handler) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run() -> None:
        connection, _ = listener.accept()
        with connection:
            handler(connection)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield port
    listener.close()


def echo_until_eof(connection: socket.socket) -> None:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    connection.sendall(b"echo:" + received)  # answer only after the client's FIN: needs a half-close
    connection.shutdown(socket.SHUT_WR)


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from serve_once(echo_until_eof)


@pytest.fixture
def banner_port() -> Iterator[int]:
    def banner(connection: socket.socket) -> None:
        connection.sendall(b"220 ready\r\n")  # the server speaks first
        connection.recv(100)

    yield from serve_once(banner)


def read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize("mode", ["opaque", "detect"])
def test_tcp_echo_through_tunnel_with_half_close(tether_proxy_to, echo_port: int, mode: str) -> None:
    proxy = tether_proxy_to(echo_port, extra=["--protocol", mode])
    payload = bytes(range(256)) * 400  # binary, so detection calls it opaque
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b"echo:" + payload


def test_server_speaks_first_is_not_stalled_in_opaque_mode(tether_proxy_to, banner_port: int) -> None:
    proxy = tether_proxy_to(banner_port, extra=["--protocol", "opaque"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert sock.recv(100) == b"220 ready\r\n"


def test_server_speaks_first_reaches_client_after_detect_timeout(tether_proxy_to, banner_port: int) -> None:
    proxy = tether_proxy_to(banner_port, extra=["--protocol", "detect", "--detect-timeout-ms", "300"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert sock.recv(100) == b"220 ready\r\n"


def test_detect_mode_still_proxies_http(nginx, tether_proxy_to) -> None:
    (nginx.root / "d.txt").write_text("detected\n")
    proxy = tether_proxy_to(nginx.port, extra=["--protocol", "detect"])
    done = subprocess.run(["curl", "-s", f"{proxy.url}/d.txt"], capture_output=True, text=True, timeout=10)
    assert done.stdout == "detected\n"
    metrics = subprocess.run(["curl", "-s", f"{proxy.admin_url}/metrics"], capture_output=True, text=True, timeout=10)
    assert 'request_total{direction="outbound"' in metrics.stdout
