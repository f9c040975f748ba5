"""Hostile clients get a clean error or close; the proxy keeps serving others, with bounded memory."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.realsocket


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def still_serves(proxy, nginx) -> None:
    (nginx.root / "alive.txt").write_text("alive")
    assert httpx.get(f"{proxy.url}/alive.txt", timeout=10).text == "alive"


def test_oversized_headers_get_431_and_close(nginx, tether_proxy_to) -> None:
    proxy = tether_proxy_to(nginx.port)
    reply = exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    still_serves(proxy, nginx)


def test_invalid_chunked_encoding_gets_400_and_close(nginx, tether_proxy_to) -> None:
    proxy = tether_proxy_to(nginx.port)
    reply = exchange(
        proxy.port, b"POST /upload/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 400 ") and b"l5d-proxy-error" in reply
    still_serves(proxy, nginx)


def test_slow_header_client_is_closed_after_idle_timeout(nginx, tether_proxy_to) -> None:
    proxy = tether_proxy_to(nginx.port, extra=["--idle-timeout-ms", "500"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and then nothing more
        assert sock.recv(100) == b"", "the proxy closes a head that never completes"
    still_serves(proxy, nginx)


def test_client_that_never_reads_keeps_memory_bounded(nginx, tether_proxy_to) -> None:
    (nginx.root / "huge.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    proxy = tether_proxy_to(nginx.port)
    still_serves(proxy, nginx)
    before = rss_kib(proxy.process.pid)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1024)  # the head arrived; from now on this client reads nothing
        time.sleep(2.0)  # bounded: time for the proxy to pull whatever it would buffer
        grown_kib = rss_kib(proxy.process.pid) - before
        still_serves(proxy, nginx)
    assert grown_kib < 16 * 1024, f"the proxy grew {grown_kib} KiB for a client that does not read"
