"""Transparent proxying with real iptables, inside a network namespace this test creates and removes.

Inside the namespace: nginx on 127.0.0.1:8080 plays a service's endpoint, 10.99.0.1:80 plays its
virtual (cluster) address, and an iptables REDIRECT sends every connection for 10.99.0.1:80 to the
outbound proxy, which reads the original destination (SO_ORIGINAL_DST) and routes by it. No traffic
leaves the namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.realsocket

NGINX_CONF = """
user root; worker_processes 1; daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off; client_body_temp_path {prefix}/b; proxy_temp_path {prefix}/p; fastcgi_temp_path {prefix}/f;
    uwsgi_temp_path {prefix}/u; scgi_temp_path {prefix}/s;
    server {{ listen 127.0.0.1:8080; location / {{ return 200 "endpoint behind 10.99.0.1\\n"; }} }}
}}
"""
PROXY_CONF = """
admin: 127.0.0.1:4191
outbound:
  listen: 127.0.0.1:4140
  routes: {"10.99.0.1": ["127.0.0.1:8080"]}
"""


def run(namespace: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, *command], capture_output=True, text=True, timeout=30, check=check
    )


def start_proxy_in(namespace: str, config: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tether.adapters.cli", "proxy", "--config", str(config)]
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def redirect(namespace: str, destination: str, port: int, to_port: int) -> None:
    """iptables: connections made inside the namespace to destination:port go to the proxy's to_port."""
    run(
        namespace,
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        destination,
        "--dport",
        str(port),
        "-j",
        "REDIRECT",
        "--to-ports",
        str(to_port),
    )


def wait_until_serving(namespace: str, port: int) -> None:
    for _ in range(100):
        if run(namespace, "curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/", check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing serves on 127.0.0.1:{port} in {namespace}")


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("iptables") or not shutil.which("ip"):
        pytest.fail("needs root, iproute2 and iptables (.ci/run installs them)")
    name = f"tether-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        run(name, "ip", "link", "set", "lo", "up")
        run(name, "ip", "addr", "add", "10.99.0.1/32", "dev", "lo")
        yield name
    finally:
        subprocess.run(["ip", "netns", "pids", name], capture_output=True, timeout=30)
        for pid in subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30
        ).stdout.split():
            subprocess.run(["kill", "-9", pid], timeout=30)
        subprocess.run(["ip", "netns", "del", name], timeout=30)


def test_outbound_routes_redirected_connections_by_original_destination(namespace: str, tmp_path: Path) -> None:
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(NGINX_CONF.format(prefix=prefix))
    (tmp_path / "proxy.yaml").write_text(PROXY_CONF)
    nginx = subprocess.Popen(
        ["ip", "netns", "exec", namespace, "nginx", "-c", str(prefix / "nginx.conf"), "-p", str(prefix)],
        stderr=subprocess.DEVNULL,
    )
    proxy = start_proxy_in(namespace, tmp_path / "proxy.yaml")
    try:
        wait_until_serving(namespace, 8080)
        wait_until_serving(namespace, 4191)
        redirect(namespace, "10.99.0.1", 80, 4140)
        # The Host header names somewhere else: only the original destination can route this request.
        reply = run(namespace, "curl", "-s", "-m", "10", "-H", "Host: elsewhere.invalid", "http://10.99.0.1/")
        assert reply.stdout == "endpoint behind 10.99.0.1\n"
        metrics = run(namespace, "curl", "-s", "http://127.0.0.1:4191/metrics").stdout
        assert 'authority="10.99.0.1:80",target_addr="127.0.0.1:8080"' in metrics
        direct = run(namespace, "curl", "-s", "-H", "Host: 10.99.0.1", "http://127.0.0.1:4140/")
        assert direct.stdout == "endpoint behind 10.99.0.1\n", "a connection made to the proxy itself routes by Host"
    finally:
        proxy.terminate()
        nginx.terminate()
        proxy.wait(timeout=15)
        nginx.wait(timeout=15)


ECHO = """
import socket
server = socket.create_server(("127.0.0.1", 7000))
while True:
    connection, _ = server.accept()
    with connection:
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        connection.sendall(b"echo:" + received)
"""
CLIENT = """
import socket, sys
with socket.create_connection(("10.99.0.2", 5432), timeout=10) as sock:
    sock.sendall(bytes(range(256)) * 40)
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
sys.stdout.write("ok" if received == b"echo:" + bytes(range(256)) * 40 else f"bad {len(received)}")
"""
MESHED_CONF = """
admin: 127.0.0.1:4191
outbound:
  listen: 127.0.0.1:4140
  routes: {"10.99.0.2": ["127.0.0.1:7000"]}
  meshed: {"10.99.0.2": 4143}
inbound:
  listen: 127.0.0.1:4143
  to: 127.0.0.1:1
"""


def test_opaque_tcp_between_meshed_proxies_carries_a_transport_header(namespace: str, tmp_path: Path) -> None:
    """client -> iptables -> outbound (4140) -> transport header -> inbound (4143) -> echo on port 7000.

    The inbound's configured workload port (1) is wrong on purpose: only the header can name port 7000.
    """
    (tmp_path / "proxy.yaml").write_text(MESHED_CONF)
    run(namespace, "ip", "addr", "add", "10.99.0.2/32", "dev", "lo")
    echo = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c", ECHO])
    proxy = start_proxy_in(namespace, tmp_path / "proxy.yaml")
    try:
        wait_until_serving(namespace, 4191)
        redirect(namespace, "10.99.0.2", 5432, 4140)
        for _ in range(50):  # the echo server may still be starting
            result = run(namespace, sys.executable, "-c", CLIENT, check=False)
            if result.stdout == "ok":
                break
            time.sleep(0.1)
        assert result.stdout == "ok", result.stdout + result.stderr
        metrics = run(namespace, "curl", "-s", "http://127.0.0.1:4191/metrics").stdout
        assert 'tcp_open_total{direction="outbound",peer="dst",target_addr="127.0.0.1:4143"' in metrics
        assert 'tcp_open_total{direction="inbound",peer="dst",target_addr="127.0.0.1:7000"' in metrics
    finally:
        proxy.terminate()
        echo.terminate()
        proxy.wait(timeout=15)
        echo.wait(timeout=15)
