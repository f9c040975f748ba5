"""An independent TLS client, ``openssl s_client``, against a server-role TlsSession over loopback.

The test is the driver: it accepts the connection, peeks at the first bytes the way the inbound proxy will
(``inbound_decision``), then moves bytes between the socket and the session. s_client checks our chain and
name against the trust anchor at the certificates' time (``-attime``), and presents a client certificate or
not; the session must complete TLS 1.3 with it in the first case and refuse it in the second.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core" / "identity"))  # the shared test PKI
from tls_certs import EPOCH_S, Issued, Pki  # noqa: E402

from tether.core.identity.tls import (  # noqa: E402
    HandshakeCompleted,
    InboundDecision,
    PlaintextReceived,
    TlsContexts,
    TlsError,
    TlsFailure,
    TlsSession,
    inbound_decision,
)

pytestmark = pytest.mark.realsocket

WEB = "web.shop.serviceaccount.identity.tether.cluster.local"
API = "api.shop.serviceaccount.identity.tether.cluster.local"
HANG_GUARD_S = 10  # a broken test fails after this instead of hanging; no assertion depends on it


@dataclass
class Served:
    """What the server side saw."""

    decision: InboundDecision | None = None
    completed: HandshakeCompleted | None = None
    plaintext: bytearray = field(default_factory=bytearray)
    error: TlsError | None = None
    answered: bool = False


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create("root.openssl-tests.test")


def write_pem(folder: Path, name: str, data: bytes) -> str:
    path = folder / name
    path.write_bytes(data)
    return str(path)


def start_s_client(port: int, folder: Path, root: Issued, client: Issued | None) -> subprocess.Popen[bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed (Debian's openssl package provides s_client)")
    command = [
        openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", WEB, "-tls1_3",
        "-CAfile", write_pem(folder, "root.pem", root.pem), "-verify_return_error", "-verify_hostname", WEB,
        "-attime", str(EPOCH_S), "-ign_eof", "-nocommands",
    ]  # fmt: skip
    if client is not None:
        command += ["-cert", write_pem(folder, "client.pem", client.pem)]
        command += ["-cert_chain", write_pem(folder, "chain.pem", client.chain_pem[len(client.pem) :])]
        command += ["-key", write_pem(folder, "client.key", client.key_pem)]
    stdin = folder / "stdin"
    stdin.write_bytes(b"ping\n")  # s_client sends it once the handshake is done (-ign_eof: EOF does not stop it)
    with stdin.open("rb") as lines:
        return subprocess.Popen(command, stdin=lines, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def serve_one(listener: socket.socket, contexts: TlsContexts) -> Served:
    """Accept one connection and speak TLS on it: answer "ping" with a line, then close_notify."""
    served = Served()
    connection, _address = listener.accept()
    with connection:
        connection.settimeout(HANG_GUARD_S)
        first = b""
        while (decision := inbound_decision(first, WEB)) is InboundDecision.NEED_MORE_BYTES:
            first += connection.recv(65_536)
        served.decision = decision
        session = TlsSession.server(contexts, EPOCH_S)
        data = first
        while data:
            try:
                events = session.receive(data)
            except TlsError as error:
                served.error = error
                connection.sendall(session.data_to_send())  # the alert
                return served
            for event in events:
                if isinstance(event, HandshakeCompleted):
                    served.completed = event
                elif isinstance(event, PlaintextReceived):
                    served.plaintext += event.data
            if b"ping\n" in served.plaintext and not served.answered:
                session.send(b"hello from tether\n")
                session.close()
                served.answered = True
            connection.sendall(session.data_to_send())
            data = connection.recv(65_536)
    return served


def run(pki: Pki, tmp_path: Path, client: Issued | None) -> tuple[Served, str]:
    web = pki.leaf(WEB)
    contexts = TlsContexts.build(
        identity=WEB, leaf_der=web.der, intermediates_der=web.chain_der, key=web.key, trust_anchors_pem=pki.root.pem
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(HANG_GUARD_S)
        process = start_s_client(listener.getsockname()[1], tmp_path, pki.root, client)
        try:
            served = serve_one(listener, contexts)
        finally:
            output, errors = process.communicate(timeout=HANG_GUARD_S)
    return served, (output + errors).decode(errors="replace")


def test_openssl_s_client_completes_tls13_with_a_client_certificate(pki: Pki, tmp_path: Path):
    served, output = run(pki, tmp_path, pki.leaf(API))
    assert served.error is None, served.error
    assert served.decision is InboundDecision.TERMINATE
    assert served.completed is not None
    assert served.completed.peer_identity == API and served.completed.tls_version == "TLSv1.3"
    assert served.plaintext == b"ping\n" and served.answered
    assert "hello from tether" in output
    assert "TLSv1.3" in output
    assert "Verify return code: 0 (ok)" in output  # s_client verified our chain and our name


def test_openssl_s_client_without_a_client_certificate_is_refused(pki: Pki, tmp_path: Path):
    served, output = run(pki, tmp_path, None)
    assert served.decision is InboundDecision.TERMINATE
    assert served.completed is None
    assert served.error is not None and served.error.failure is TlsFailure.NO_CLIENT_CERTIFICATE
    assert "certificate required" in output  # our alert reached s_client
    assert "hello from tether" not in output
