"""Traffic management on real sockets: `tether proxy` in front of three small HTTP servers of this test.

The slow server visibly receives fewer requests (P2C over peak-EWMA); a 503 is retried and curl sees the
200; a route's request timeout and the failfast answer reach curl as status codes with l5d-proxy-error.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from net_helpers import free_port

pytestmark = pytest.mark.realsocket

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: sockets
  annotations: {retry.linkerd.io/http: 5xx, retry.linkerd.io/limit: "2"}
spec:
  rules:
    - name: timed
      matches: [{path: {type: PathPrefix, value: /timed}}]
      timeouts: {request: 300ms}
    - name: everything
"""


@dataclass
class Shared:
    """What the test's servers do, changed by the test while they run."""

    fail_next: int = 0  # the next this-many requests, on any server, get 503
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take_failure(self) -> bool:
        with self.lock:
            if self.fail_next:
                self.fail_next -= 1
                return True
            return False


@dataclass
class Server:
    port: int
    delay_s: float
    shared: Shared
    requests: int = 0
    httpd: ThreadingHTTPServer | None = None


def handler_for(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            server.requests += 1
            if self.path.startswith("/timed"):
                time.sleep(1.0)  # longer than the route's request timeout
            time.sleep(server.delay_s)
            status = 503 if server.shared.take_failure() else 200
            body = f"{server.port}\n".encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    shared = Shared()
    started = [Server(free_port(), delay, shared) for delay in (0.0, 0.0, 0.25)]
    for server in started:
        server.httpd = ThreadingHTTPServer(("127.0.0.1", server.port), handler_for(server))
        server.httpd.daemon_threads = True
        threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    yield started
    for server in started:
        assert server.httpd is not None
        server.httpd.shutdown()
        server.httpd.server_close()


def curl(url: str) -> tuple[int, dict[str, str]]:
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-D", "-", "--max-time", "10", url],
        capture_output=True,
        text=True,
        timeout=20,
    )
    lines = done.stdout.splitlines()
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return status, {name.lower(): value.strip() for name, value in headers.items()}


def test_the_slow_backend_receives_fewer_requests(tether_proxy_to, servers: list[Server], tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    proxy = tether_proxy_to(*(server.port for server in servers), extra=["--routes", str(routes)])

    def client(count: int) -> list[int]:
        with httpx.Client(base_url=proxy.url, timeout=10) as http:
            return [http.get("/").status_code for _ in range(count)]

    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = [status for chunk in pool.map(client, [25] * 6) for status in chunk]
    assert statuses == [200] * 150
    fast_a, fast_b, slow = (server.requests for server in servers)
    print(f"requests per server: fast {fast_a}, fast {fast_b}, slow {slow}")
    assert slow < min(fast_a, fast_b) / 3, (fast_a, fast_b, slow)
    metrics = httpx.get(f"{proxy.admin_url}/metrics", timeout=10).text
    assert (
        'outbound_http_balancer_endpoints{backend_name="proxy",backend_protocol="http",endpoint_state="ready"} 3'
        in (metrics)
    )


def test_curl_sees_a_retried_503_as_200_and_a_route_timeout_as_504(
    tether_proxy_to, servers: list[Server], tmp_path: Path
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    proxy = tether_proxy_to(*(server.port for server in servers), extra=["--routes", str(routes)])
    servers[0].shared.fail_next = 1
    status, _headers = curl(f"{proxy.url}/")
    assert status == 200
    assert sum(server.requests for server in servers) == 2  # the 503 and its retry
    status, headers = curl(f"{proxy.url}/timed")
    assert status == 504 and headers["l5d-proxy-error"] == "request timeout after 300ms"
    metrics = httpx.get(f"{proxy.admin_url}/metrics", timeout=10).text
    retried = [line for line in metrics.splitlines() if line.startswith("outbound_http_route_retry_requests_total")]
    assert any(line.endswith(" 1") and 'route_rule="everything"' in line for line in retried), retried


def test_curl_sees_503_failfast_once_the_only_endpoint_is_ejected(tether_proxy_to, monkeypatch) -> None:
    monkeypatch.setenv("TETHER_PROXY_FAILFAST_TIMEOUT_MS", "300")
    closed = free_port()  # nothing listens: every connect is refused
    proxy = tether_proxy_to(closed)
    refused = [curl(f"{proxy.url}/")[0] for _ in range(7)]
    assert refused == [502] * 7  # seven failures in a row eject it (Linkerd's default)
    started = time.monotonic()
    status, headers = curl(f"{proxy.url}/")
    assert status == 503 and "fail-fast" in headers["l5d-proxy-error"]
    assert 0.25 < time.monotonic() - started < 1.0  # it waited the failfast timeout first
    status, headers = curl(f"{proxy.url}/")
    assert status == 503 and "fail-fast" in headers["l5d-proxy-error"]  # in failfast: at once
