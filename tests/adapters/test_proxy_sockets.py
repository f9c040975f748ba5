"""`tether proxy` on real sockets, between clients and a server that no one here wrote (curl, httpx, nginx)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.realsocket
TEN_MB = 10 * 1024 * 1024


def test_curl_keep_alive_reuses_both_connections(nginx, tether_proxy_to) -> None:
    (nginx.root / "hello.txt").write_text("hello\n")
    proxy = tether_proxy_to(nginx.port)
    done = subprocess.run(
        ["curl", "-sv", f"{proxy.url}/hello.txt", f"{proxy.url}/hello.txt", f"{proxy.url}/hello.txt"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello\n" * 3
    assert done.stderr.count("< HTTP/1.1 200") == 3
    assert "Re-using existing connection" in done.stderr or "Reusing existing" in done.stderr
    lines = [line.split() for line in nginx.access_log.read_text().splitlines()]
    assert [line[4] for line in lines] == ["1", "2", "3"], "the proxy should reuse one upstream connection"


def test_httpx_downloads_10mb_intact(nginx, tether_proxy_to) -> None:
    payload = os.urandom(TEN_MB)
    (nginx.root / "big.bin").write_bytes(payload)
    proxy = tether_proxy_to(nginx.port)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        digest = hashlib.sha256()
        with client.stream("GET", "/big.bin") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_httpx_chunked_download_10mb_intact(nginx, tether_proxy_to) -> None:
    payload = os.urandom(TEN_MB)
    (nginx.root / "big.bin").write_bytes(payload)
    proxy = tether_proxy_to(nginx.port)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        digest = hashlib.sha256()
        with client.stream("GET", "/chunked/big.bin", headers={"accept-encoding": "gzip"}) as response:
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            for chunk in response.iter_bytes():  # decoded from gzip
                digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(payload).hexdigest()


def test_httpx_chunked_upload_10mb_intact(nginx, tether_proxy_to) -> None:
    payload = os.urandom(TEN_MB)
    proxy = tether_proxy_to(nginx.port)

    def chunks():
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        put = client.put("/upload/big.bin", content=chunks())  # a generator body goes out chunked
        assert put.status_code in (201, 204), put.text
        back = client.get("/upload/big.bin")
    assert hashlib.sha256(back.content).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert (nginx.root / "upload" / "big.bin").read_bytes() == payload


def test_curl_chunked_upload_through_proxy(nginx, tether_proxy_to, tmp_path: Path) -> None:
    source = tmp_path / "up.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024))
    proxy = tether_proxy_to(nginx.port)
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Transfer-Encoding: chunked",
            "-T",
            str(source),
            f"{proxy.url}/upload/curl.bin",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout in ("201", "204"), done.stderr
    assert (nginx.root / "upload" / "curl.bin").read_bytes() == source.read_bytes()


def test_upstream_down_is_502_with_proxy_error(tether_proxy_to, unused_port: int) -> None:
    closed_port = unused_port  # nothing listens there
    proxy = tether_proxy_to(closed_port)
    response = httpx.get(f"{proxy.url}/", timeout=10)
    assert response.status_code == 502
    assert response.headers["l5d-proxy-error"].startswith(f"connect to 127.0.0.1:{closed_port} failed")
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{proxy.url}/"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.stdout == "502"


def test_malformed_request_is_400_then_clean_close(nginx, tether_proxy_to) -> None:
    proxy = tether_proxy_to(nginx.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):  # a clean close ends in EOF, a reset would raise
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"l5d-proxy-error: malformed HTTP/1.1 request" in received
    # and the proxy still serves others
    (nginx.root / "ok.txt").write_text("ok")
    assert httpx.get(f"{proxy.url}/ok.txt", timeout=5).text == "ok"


def test_sigterm_drains_request_in_flight(tether_proxy_to, unused_port: int) -> None:
    slow_port = unused_port
    listener = socket.create_server(("127.0.0.1", slow_port))

    request_arrived = threading.Event()

    def slow_server() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            request_arrived.set()
            time.sleep(1.0)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")

    threading.Thread(target=slow_server, daemon=True).start()
    proxy = tether_proxy_to(slow_port)
    result: dict[str, object] = {}

    def call() -> None:
        result["response"] = httpx.get(f"{proxy.url}/", timeout=10)

    caller = threading.Thread(target=call)
    caller.start()
    # Signal only once the request is in flight at the endpoint; a fixed sleep raced a slow start.
    assert request_arrived.wait(timeout=10)
    proxy.process.send_signal(signal.SIGTERM)
    caller.join(timeout=10)
    response = result["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200 and response.text == "slow"
    assert proxy.process.wait(timeout=10) == 0
    listener.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_idle_timeout_counts_from_the_last_response_on_a_busy_connection(nginx, tether_proxy_to) -> None:
    """The driver keeps one loop timer armed at the first idle deadline while requests push it back: that
    timer firing early must re-arm, never close a connection that was used since."""
    (nginx.root / "hello.txt").write_text("hello\n")
    proxy = tether_proxy_to(nginx.port, extra=["--idle-timeout-ms", "600"])
    request = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for _ in range(4):  # the connection's first idle deadline passes while it is in use
            time.sleep(0.3)
            sock.sendall(request)
            assert sock.recv(4096).endswith(b"hello\n")
        answered = time.monotonic()
        assert sock.recv(100) == b"", "an idle connection is closed in the end"
        assert time.monotonic() - answered >= 0.5, "closed before its idle timeout since the last response"
