"""Real processes on loopback: nginx as the upstream, `tether proxy` as a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from net_helpers import free_port, wait_for_port


@dataclass
class Nginx:
    port: int
    root: Path
    access_log: Path
    h2_port: int  # the same site over h2c (HTTP/2 with prior knowledge, no TLS)


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format conn '$request_method $uri $status $connection $connection_requests $server_protocol';
    access_log {prefix}/access.log conn;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        client_max_body_size 64m;
        location /upload/ {{ dav_methods PUT DELETE; create_full_put_path on; }}
        # gzip makes the length unknown up front, so nginx answers with chunked transfer encoding
        location /chunked/ {{ alias {prefix}/www/; gzip on; gzip_types *; gzip_min_length 0; gzip_comp_level 1; }}
    }}
    server {{
        listen 127.0.0.1:{h2_port} http2;
        root {prefix}/www;
        client_max_body_size 64m;
        http2_max_requests 100000;
        location /upload/ {{ dav_methods PUT DELETE; create_full_put_path on; }}
    }}
}}
"""


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed; .ci/run installs it (apt-get install nginx)")
    prefix = tmp_path / "nginx"
    (prefix / "www" / "upload").mkdir(parents=True)
    port, h2_port = free_port(), free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, h2_port=h2_port))
    process = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        wait_for_port(h2_port)
        yield Nginx(port, prefix / "www", prefix / "access.log", h2_port)
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class TetherProxy:
    port: int
    admin_port: int
    process: subprocess.Popen[str]

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_tether_proxy(*targets: int, extra: list[str] | None = None) -> TetherProxy:
    port, admin_port = free_port(), free_port()
    to = ",".join(f"127.0.0.1:{target}" for target in targets)
    command = [
        sys.executable,
        "-m",
        "tether.adapters.cli",
        "proxy",
        "--listen",
        f"127.0.0.1:{port}",
        "--to",
        to,
        "--admin",
        f"127.0.0.1:{admin_port}",
        *(extra or []),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on" in line, line + (process.stderr.read() if process.poll() is not None else "")
    return TetherProxy(port, admin_port, process)


@pytest.fixture
def tether_proxy_to():
    started: list[TetherProxy] = []

    def start(*targets: int, extra: list[str] | None = None) -> TetherProxy:
        proxy = start_tether_proxy(*targets, extra=extra)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.send_signal(signal.SIGINT)
            try:
                proxy.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proxy.process.kill()


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def tether_config(tmp_path: Path):
    """Start `tether proxy --config FILE` from YAML text; waits until each of ``ports`` accepts."""
    started: list[subprocess.Popen[str]] = []

    def start(text: str, *ports: int) -> subprocess.Popen[str]:
        path = tmp_path / f"proxy-{len(started)}.yaml"
        path.write_text(text)
        command = [sys.executable, "-m", "tether.adapters.cli", "proxy", "--config", str(path)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(process)
        for port in ports:
            wait_for_port(port)
        return process

    yield start
    for process in started:
        process.terminate()
        try:
            _out, errors = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            continue
        assert "Traceback" not in errors, errors
