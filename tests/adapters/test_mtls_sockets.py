"""Identity and mTLS with real processes: `tether identity serve`, `tether proxy`, openssl s_client, curl, nginx.

- a proxy answers /ready 503 (with the reason) until the identity service, started after it, certifies it;
- openssl s_client (an independent TLS implementation) completes TLS 1.3 with an inbound proxy when it presents
  a certificate of the mesh, and gets an HTTP answer from nginx behind it; without one it is refused;
- curl -> outbound proxy -> mTLS -> inbound proxy -> nginx, and both proxies' /metrics say tls="true" with the
  other side's identity.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from identity_mesh import HANG_GUARD_S, Mesh, identity_of, serve, wait_ready
from net_helpers import free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.realsocket

WEB = identity_of("shop", "web")
CLIENT = identity_of("shop", "client")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    return Mesh.create(tmp_path_factory.mktemp("mesh"))


@pytest.fixture(scope="module")
def identity_service(mesh: Mesh) -> Iterator[int]:
    service = serve(mesh)
    yield service.port
    service.stop()


def identity_yaml(mesh: Mesh, name: str, service_port: int) -> str:
    namespace, serviceaccount = name.split(".")[1], name.split(".")[0]
    return (
        f"identity:\n  local_name: {name}\n  svc_addr: 127.0.0.1:{service_port}\n"
        f"  trust_anchors: {mesh.trust_anchors}\n  token_file: {mesh.token(namespace, serviceaccount)}\n"
    )


def inbound_proxy(tether_config, mesh: Mesh, service_port: int, workload_port: int) -> tuple[int, int]:
    """An inbound proxy with identity WEB in front of ``workload_port``; returns (inbound port, admin port)."""
    inbound, admin = free_port(), free_port()
    text = (
        f"admin: 127.0.0.1:{admin}\noutbound: {{listen: 127.0.0.1:{free_port()}}}\n"
        f"inbound: {{listen: 127.0.0.1:{inbound}, to: 127.0.0.1:{workload_port}}}\n"
        + identity_yaml(mesh, WEB, service_port)
    )
    tether_config(text, inbound, admin)
    wait_ready(admin)
    return inbound, admin


def metric_samples(admin_port: int, family: str) -> list:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).text
    families = {each.name: each for each in text_string_to_metric_families(text)}
    return families[family].samples if family in families else []


def s_client(port: int, folder: Path, mesh: Mesh, request: bytes, *, with_certificate: bool) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (Debian's openssl package provides s_client)")
    command = [
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", WEB, "-tls1_3",
        "-CAfile", str(mesh.trust_anchors), "-verify_return_error", "-verify_hostname", WEB,
        "-ign_eof", "-nocommands",
    ]  # fmt: skip
    if with_certificate:
        issued = mesh.issue("shop", "client")
        files = {"client.pem": issued.leaf_pem, "chain.pem": issued.chain_pem, "key.pem": issued.key_pem}
        for name, data in files.items():
            (folder / name).write_bytes(data)
        command += ["-cert", str(folder / "client.pem"), "-cert_chain", str(folder / "chain.pem")]
        command += ["-key", str(folder / "key.pem")]
    done = subprocess.run(command, input=request, capture_output=True, timeout=HANG_GUARD_S)
    return (done.stdout + done.stderr).decode(errors="replace")


def test_tether_proxy_is_ready_only_once_the_identity_service_certified_it(mesh: Mesh, tether_config) -> None:
    service_port, admin = free_port(), free_port()
    text = f"admin: 127.0.0.1:{admin}\noutbound: {{listen: 127.0.0.1:{free_port()}}}\n"
    tether_config(text + identity_yaml(mesh, WEB, service_port), admin)
    deadline = time.monotonic() + HANG_GUARD_S
    while "cannot connect" not in (answer := httpx.get(f"http://127.0.0.1:{admin}/ready")).text:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.05)
    assert answer.status_code == 503
    assert f"no certificate yet for {WEB}" in answer.text and f"127.0.0.1:{service_port}" in answer.text
    assert [s.value for s in metric_samples(admin, "identity_cert_refresh_count")] == [0]
    assert metric_samples(admin, "identity_cert_expiration_timestamp_seconds") == []

    service = serve(mesh, f"127.0.0.1:{service_port}")  # the service comes up late: the proxy retries
    try:
        wait_ready(admin)
        [expiry] = metric_samples(admin, "identity_cert_expiration_timestamp_seconds")
        assert 23 * 3600 < expiry.value - time.time() <= 24 * 3600
        assert [s.value for s in metric_samples(admin, "identity_cert_refresh_count")] == [1]
    finally:
        service.stop()


def test_openssl_s_client_with_a_mesh_certificate_gets_an_answer_through_the_inbound_proxy(
    mesh: Mesh, identity_service: int, nginx, tether_config, tmp_path: Path
) -> None:
    (nginx.root / "hello.txt").write_text("hello over mTLS\n")
    inbound, admin = inbound_proxy(tether_config, mesh, identity_service, nginx.port)
    request = b"GET /hello.txt HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    output = s_client(inbound, tmp_path, mesh, request, with_certificate=True)
    assert "TLSv1.3" in output and "Verify return code: 0 (ok)" in output, output
    assert "HTTP/1.1 200" in output and "hello over mTLS" in output, output
    [sample] = [s for s in metric_samples(admin, "request") if s.name == "request_total"]
    assert sample.labels["tls"] == "true" and sample.labels["client_id"] == CLIENT


def test_openssl_s_client_without_a_certificate_is_refused_by_the_inbound_proxy(
    mesh: Mesh, identity_service: int, nginx, tether_config, tmp_path: Path
) -> None:
    (nginx.root / "hello.txt").write_text("hello over mTLS\n")
    inbound, admin = inbound_proxy(tether_config, mesh, identity_service, nginx.port)
    request = b"GET /hello.txt HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    output = s_client(inbound, tmp_path, mesh, request, with_certificate=False)
    assert "certificate required" in output, output
    assert "HTTP/1.1" not in output and "hello over mTLS" not in output
    assert [s for s in metric_samples(admin, "request") if s.name == "request_total"] == []


def test_curl_through_two_tether_proxies_over_mtls_reaches_nginx(
    mesh: Mesh, identity_service: int, nginx, tether_config
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is not installed")
    (nginx.root / "hello.txt").write_text("hello over mTLS\n")
    inbound, inbound_admin = inbound_proxy(tether_config, mesh, identity_service, nginx.port)
    outbound, outbound_admin = free_port(), free_port()
    text = (
        f"admin: 127.0.0.1:{outbound_admin}\n"
        f"outbound:\n  listen: 127.0.0.1:{outbound}\n  routes: {{web: [127.0.0.1:{nginx.port}]}}\n"
        f"  meshed: {{web: {{port: {inbound}, identity: {WEB}}}}}\n" + identity_yaml(mesh, CLIENT, identity_service)
    )
    tether_config(text, outbound, outbound_admin)
    wait_ready(outbound_admin)

    for _ in range(3):
        done = subprocess.run(
            [curl, "-sS", "-i", "--max-time", "10", "-H", "Host: web", f"http://127.0.0.1:{outbound}/hello.txt"],
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
        )
        assert done.returncode == 0 and done.stdout.endswith("\n\nhello over mTLS\n"), done.stderr
        # HTTP/2 between the proxies carries no reason phrase; the outbound proxy writes the standard one
        # (http-parser clients such as h2load count a response without one as failed).
        assert done.stdout.startswith("HTTP/1.1 200 OK\n"), done.stdout  # text mode reads CRLF as one newline

    [out] = [s for s in metric_samples(outbound_admin, "request") if s.name == "request_total"]
    assert out.labels["direction"] == "outbound" and out.labels["authority"] == "web"
    assert (out.labels["tls"], out.labels["server_id"], out.value) == ("true", WEB, 3)
    [into] = [s for s in metric_samples(inbound_admin, "request") if s.name == "request_total"]
    assert into.labels["direction"] == "inbound"
    assert (into.labels["tls"], into.labels["client_id"], into.value) == ("true", CLIENT, 3)
    mtls = [s for s in metric_samples(inbound_admin, "tcp_open") if s.labels["tls"] == "true"]
    assert [(s.labels["peer"], s.labels["client_id"], s.value) for s in mtls] == [("src", CLIENT, 1)]
    # (a plaintext src connection is there too: the fixture's probe of the port before the test began)
