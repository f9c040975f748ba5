"""HTTP/2 over real sockets: curl and h2load through `tether proxy`, nginx as the h2c endpoint, an
HTTP/1.1 client across a meshed pair, and hostile HTTP/2 clients."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from net_helpers import free_port
from test_hostile import rss_kib, still_serves

pytestmark = pytest.mark.realsocket
TEN_MB = 10 * 1024 * 1024


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)


def still_serves_h2(proxy, nginx) -> None:
    (nginx.root / "alive.txt").write_text("alive")
    done = curl("--http2-prior-knowledge", f"{proxy.url}/alive.txt")
    assert done.stdout == "alive", done.stderr


def protocols_seen(nginx) -> list[str]:
    return [line.split()[5] for line in nginx.access_log.read_text().splitlines()]


def test_curl_http2_prior_knowledge_reaches_an_h2c_endpoint_as_http2(nginx, tether_proxy_to) -> None:
    (nginx.root / "hello.txt").write_text("hello\n")
    proxy = tether_proxy_to(nginx.h2_port)
    # One URL per curl: curl 7.88 fails its second request on a reused prior-knowledge connection
    # ("Error in the HTTP2 framing layer") even against nginx alone.
    for _ in range(2):
        done = curl("-v", "--http2-prior-knowledge", f"{proxy.url}/hello.txt")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello\n"
        assert "< HTTP/2 200" in done.stderr
    assert protocols_seen(nginx) == ["HTTP/2.0", "HTTP/2.0"], "the client's protocol is kept upstream"


def test_curl_http2_uploads_and_downloads_10mb_intact(nginx, tether_proxy_to) -> None:
    payload = os.urandom(TEN_MB)
    (nginx.root / "big.bin").write_bytes(payload)
    proxy = tether_proxy_to(nginx.h2_port)
    download = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", f"{proxy.url}/big.bin"], capture_output=True, timeout=60
    )
    assert download.returncode == 0, download.stderr
    assert hashlib.sha256(download.stdout).digest() == hashlib.sha256(payload).digest()
    source = nginx.root / "source.bin"
    source.write_bytes(payload[::-1])
    upload = curl("--http2-prior-knowledge", "-T", str(source), f"{proxy.url}/upload/copy.bin")
    assert upload.returncode == 0, upload.stderr
    assert (nginx.root / "upload" / "copy.bin").read_bytes() == payload[::-1]


def test_h2load_10000_requests_with_zero_failures(nginx, tether_proxy_to) -> None:
    if shutil.which("h2load") is None:
        pytest.fail("h2load is not installed; .ci/run installs it (apt-get install nghttp2-client)")
    (nginx.root / "index.html").write_text("x" * 100)
    proxy = tether_proxy_to(nginx.h2_port)
    done = subprocess.run(
        ["h2load", "-n", "10000", "-c", "10", "-m", "10", f"{proxy.url}/index.html"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", done.stdout)
    assert summary is not None, done.stdout
    assert summary.groups() == ("10000", "10000", "10000", "10000", "0"), done.stdout
    assert "status codes: 10000 2xx" in done.stdout, done.stdout


MESHED_HTTP = """
admin: 127.0.0.1:{admin}
outbound:
  listen: 127.0.0.1:{outbound}
  routes: {{"web.test": ["127.0.0.1:{nginx}"]}}
  meshed: {{"web.test": {inbound}}}
inbound:
  listen: 127.0.0.1:{inbound}
  to: 127.0.0.1:{nginx}
"""


def test_http1_between_meshed_proxies_rides_one_http2_connection(nginx, tether_config) -> None:
    """curl (HTTP/1.1) -> outbound -> HTTP/2 + l5d-orig-proto -> inbound -> nginx (HTTP/1.1 again)."""
    (nginx.root / "hello.txt").write_text("hello\n")
    admin, outbound, inbound = free_port(), free_port(), free_port()
    tether_config(MESHED_HTTP.format(admin=admin, outbound=outbound, inbound=inbound, nginx=nginx.port), outbound)
    clients = [
        subprocess.Popen(
            ["curl", "-sS", "-H", "Host: web.test", *[f"http://127.0.0.1:{outbound}/hello.txt"] * 5],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [client.communicate(timeout=60)[0] for client in clients]
    assert outputs == ["hello\n" * 5] * 4
    assert protocols_seen(nginx) == ["HTTP/1.1"] * 20, "the inbound proxy restores HTTP/1.1"
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    to_inbound = re.search(
        rf'tcp_open_total{{direction="outbound",peer="dst",target_addr="127.0.0.1:{inbound}"[^}}]*}} (\d+)', metrics
    )
    assert to_inbound is not None and to_inbound.group(1) == "1", "twenty requests, one multiplexed connection"
    assert f'request_total{{direction="inbound",authority="web.test",target_addr="127.0.0.1:{nginx.port}"' in metrics


# ---------------------------------------------------------------- hostile HTTP/2 clients


def h2_client() -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    return connection


def read_until_closed(sock: socket.socket, connection: h2.connection.H2Connection) -> list[h2.events.Event]:
    events: list[h2.events.Event] = []
    sock.settimeout(10)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return events
        if not data:
            return events
        try:
            events.extend(connection.receive_data(data))
        except h2.exceptions.ProtocolError:
            return events


def test_garbage_after_the_preface_is_closed_and_others_are_served(nginx, tether_proxy_to) -> None:
    proxy = tether_proxy_to(nginx.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(256))
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert b"\x07" in received[:200] or received == b"", "GOAWAY (frame type 7) or a plain close"
    still_serves(proxy, nginx)


@pytest.mark.parametrize("flood", ["settings", "rst"])
def test_a_control_frame_flood_gets_goaway(nginx, tether_proxy_to, flood: str) -> None:
    proxy = tether_proxy_to(nginx.h2_port)
    connection = h2_client()
    for _ in range(3000):
        if flood == "settings":
            connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 70_000})
        else:  # rapid reset: open a stream and cancel it at once
            stream_id = connection.get_next_available_stream_id()
            connection.send_headers(
                stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/")]
            )
            connection.reset_stream(stream_id)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(connection.data_to_send())
        events = read_until_closed(sock, connection)
    goaways = [event for event in events if isinstance(event, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    still_serves_h2(proxy, nginx)


def test_an_h2_client_that_never_reads_keeps_memory_bounded(nginx, tether_proxy_to) -> None:
    (nginx.root / "big.bin").write_bytes(os.urandom(TEN_MB))
    proxy = tether_proxy_to(nginx.h2_port)
    before = rss_kib(proxy.process.pid)
    connection = h2_client()
    for _ in range(10):
        stream_id = connection.get_next_available_stream_id()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", "x"), (":path", "/big.bin")]
        connection.send_headers(stream_id, headers, end_stream=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(connection.data_to_send())  # and never read: 100 MB is asked for
        time.sleep(2)
        grown_kib = rss_kib(proxy.process.pid) - before
        still_serves_h2(proxy, nginx)
    # Windows bound what is held: 10 streams x 64 KiB plus the 1 MiB connection window, and buffers.
    assert grown_kib < 16 * 1024, f"the proxy grew by {grown_kib} KiB for a client that never reads"


def test_to_h2c_sends_http2_clients_to_the_workloads_h2c_port(nginx, tether_proxy_to) -> None:
    (nginx.root / "hello.txt").write_text("hello\n")
    proxy = tether_proxy_to(nginx.port, extra=["--to-h2c", f"127.0.0.1:{nginx.h2_port}"])
    assert curl(f"{proxy.url}/hello.txt").stdout == "hello\n"
    assert curl("--http2-prior-knowledge", f"{proxy.url}/hello.txt").stdout == "hello\n"
    assert protocols_seen(nginx) == ["HTTP/1.1", "HTTP/2.0"]
