"""A mesh on loopback for the identity tests: its directory, tokens, a certificate on demand, the service.

``Mesh.create`` writes what ``tether identity init`` writes (with the same code); ``token`` mints an embedded
token into a file as ``tether identity token > FILE`` would; ``issue`` signs a workload certificate with the
mesh's issuer directly (for clients such as openssl s_client that do not speak Certify); ``serve`` starts
``tether identity serve`` as a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.adapters.identity_cli import write_mesh
from tether.adapters.identity_service import MeshFiles, draw_serial, load_mesh
from tether.core.identity.ca import certify, check_request
from tether.core.identity.client import build_csr
from tether.core.identity.names import Mesh as MeshNames
from tether.core.identity.tokens import TokenAccepted, mint_token

NAMES = MeshNames(control_plane_namespace="linkerd", trust_domain="cluster.local")
HANG_GUARD_S = 20  # a broken test fails after this instead of hanging; no assertion depends on it


def identity_of(namespace: str, serviceaccount: str) -> str:
    return f"{serviceaccount}.{namespace}{NAMES.identity_suffix}"


@dataclass(frozen=True)
class Issued:
    leaf_pem: bytes
    chain_pem: bytes  # the intermediates
    key_pem: bytes


@dataclass(frozen=True)
class Mesh:
    files: MeshFiles

    @classmethod
    def create(cls, directory: Path) -> Mesh:
        files = MeshFiles(directory)
        write_mesh(files, NAMES, wall_time_s=time.time())
        return cls(files)

    @property
    def trust_anchors(self) -> Path:
        return self.files.trust_anchor

    def token(self, namespace: str, serviceaccount: str) -> Path:
        """A token file for the workload, with the newline `tether identity token > FILE` leaves."""
        _loaded, key = load_mesh(self.files, time.time())
        path = self.files.directory / f"{serviceaccount}.{namespace}.token"
        token = mint_token(key, namespace=namespace, serviceaccount=serviceaccount, wall_time_s=time.time())
        path.write_text(token + "\n")
        return path

    def issue(self, namespace: str, serviceaccount: str) -> Issued:
        """A workload certificate and key, signed by the mesh's issuer as Certify would sign it."""
        loaded, _key = load_mesh(self.files, time.time())
        key = ec.generate_private_key(ec.SECP256R1())
        name = identity_of(namespace, serviceaccount)
        request = check_request(identity=name, csr=build_csr(key, name), mesh=NAMES)
        verdict = TokenAccepted(namespace=namespace, serviceaccount=serviceaccount)
        issued = certify(request, verdict, loaded.issuer, wall_time_s=time.time(), serial=draw_serial())
        pem = serialization.Encoding.PEM
        chain = [x509.load_der_x509_certificate(der).public_bytes(pem) for der in issued.intermediates_der]
        return Issued(
            leaf_pem=x509.load_der_x509_certificate(issued.leaf_der).public_bytes(pem),
            chain_pem=b"".join(chain),
            key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )


@dataclass
class IdentityServe:
    process: subprocess.Popen[str]
    port: int

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=HANG_GUARD_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(mesh: Mesh, listen: str = "127.0.0.1:0") -> IdentityServe:
    """`tether identity serve` in a subprocess; returns once it printed its listening line."""
    command = [sys.executable, "-m", "tether.adapters.cli", "identity", "serve", "--dir", str(mesh.files.directory)]
    process = subprocess.Popen(
        [*command, "--listen", listen, "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise AssertionError(line + (process.stderr.read() if process.stderr else ""))
    port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
    return IdentityServe(process, port)


def wait_ready(admin_port: int, timeout_s: float = HANG_GUARD_S) -> None:
    """Until the proxy's /ready answers 200 (it has its certificate)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"http://127.0.0.1:{admin_port}/ready", timeout=2)
            if answer.status_code == 200:
                return
            last = answer.text
        except httpx.HTTPError as error:
            last = str(error)
        time.sleep(0.05)
    raise AssertionError(f"the proxy on admin port {admin_port} never became ready: {last}")
