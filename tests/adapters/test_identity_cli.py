"""`tether identity`: init writes a mesh, token mints for it, serve runs Certify; bad directories and busy
ports exit 2 and 3 with a message naming the file or the address."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from tether.adapters.identity_cli import identity
from tether.adapters.identity_service import CERTIFY_METHOD
from tether.core.identity.wire import CertifyRequest, decode_certify_response, encode_certify_request

TETHER = [sys.executable, "-m", "tether.adapters.cli"]
WEB = "web.emojivoto.serviceaccount.identity.linkerd.cluster.local"
FILES = ["trust-anchor.crt", "trust-anchor.key", "issuer.crt", "issuer.key", "token.key"]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(identity, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "mesh"
    code, out, err = run("init", "--out", str(directory), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["issuer"]["subject"] == "CN=identity.linkerd.cluster.local"
    assert report["trust_anchor"]["subject"] == "CN=root.linkerd.cluster.local"
    assert sorted(report["files"]) == sorted(FILES)
    return directory


def test_identity_help_on_every_command() -> None:
    done = subprocess.run([*TETHER, "identity", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and all(f"  {name} " in done.stdout for name in ("init", "serve", "token"))
    for name in ("init", "serve", "token"):
        code, out, _ = run(name, "--help")
        assert code == 0 and "Usage:" in out


def test_identity_init_writes_keys_private_and_certificates_readable(mesh: Path) -> None:
    for name in FILES:
        mode = stat.S_IMODE((mesh / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))


def test_identity_init_uses_the_trust_domain_and_namespace_given(tmp_path: Path) -> None:
    code, out, _ = run(
        "init",
        "--out",
        str(tmp_path / "m"),
        "--trust-domain",
        "mesh.example",
        "--control-plane-namespace",
        "cp",
        "--json",
    )
    assert code == 0 and json.loads(out)["issuer"]["subject"] == "CN=identity.cp.mesh.example"


def test_identity_init_never_overwrites(mesh: Path) -> None:
    before = (mesh / "issuer.key").read_bytes()
    code, _, err = run("init", "--out", str(mesh))
    assert code == 2 and "already exist" in err and "nothing was written" in err
    assert (mesh / "issuer.key").read_bytes() == before


def test_identity_init_refuses_a_bad_trust_domain(tmp_path: Path) -> None:
    code, _, err = run("init", "--out", str(tmp_path / "m"), "--trust-domain", "Not_A_Domain")
    assert code == 2 and "trust domain" in err
    assert not (tmp_path / "m").exists()


def test_identity_token_names_the_identity_it_proves(mesh: Path) -> None:
    code, out, _ = run("token", "--dir", str(mesh), "--namespace", "emojivoto", "--serviceaccount", "web", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["identity"] == WEB and report["token"].startswith("tether1.")


def test_identity_token_refuses_a_bad_name(mesh: Path) -> None:
    code, _, err = run("token", "--dir", str(mesh), "--namespace", "Emojivoto", "--serviceaccount", "web")
    assert code == 2 and "namespace 'Emojivoto' is not a DNS label" in err


def test_identity_serve_names_a_missing_directory_file(tmp_path: Path) -> None:
    code, _, err = run("serve", "--dir", str(tmp_path), "--listen", "127.0.0.1:0")
    assert code == 2 and "trust-anchor.crt (trust anchor) is missing" in err and "tether identity init" in err


def test_identity_serve_names_a_key_of_the_wrong_type(mesh: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in FILES:
        (broken / name).write_bytes((mesh / name).read_bytes())
    wrong = ed25519.Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (broken / "issuer.key").write_bytes(wrong)
    code, _, err = run("serve", "--dir", str(broken), "--listen", "127.0.0.1:0")
    assert code == 2 and "issuer.key (issuer key)" in err and "Ed25519" in err and "P-256" in err


def test_identity_serve_on_a_busy_port_exits_3(mesh: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run("serve", "--dir", str(mesh), "--listen", f"127.0.0.1:{port}")
    assert code == 3 and f"cannot listen on 127.0.0.1:{port}" in err


@pytest.mark.realsocket
@pytest.mark.parametrize("processes", [1, 2])
def test_identity_serve_certifies_with_a_minted_token_and_stops_on_sigterm(mesh: Path, processes: int) -> None:
    _, out, _ = run("token", "--dir", str(mesh), "--namespace", "emojivoto", "--serviceaccount", "web")
    token = out.strip().encode()
    process = subprocess.Popen(
        [*TETHER, "identity", "serve", "--dir", str(mesh), "--listen", "127.0.0.1:0", "--processes", str(processes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on 127.0.0.1:" in line, line + (process.stderr.read() if process.poll() is not None else "")
        port = int(line.split("listening on 127.0.0.1:")[1].split()[0])
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(WEB)]), critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(Encoding.DER)
        )
        children = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert len(children) == processes - 1
        for _ in range(4):  # separate connections, which the kernel spreads over the processes
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                certify = channel.unary_unary(
                    CERTIFY_METHOD,
                    request_serializer=encode_certify_request,
                    response_deserializer=decode_certify_response,
                )
                request = CertifyRequest(identity=WEB, token=token, certificate_signing_request=csr)
                leaf = x509.load_der_x509_certificate(certify(request, timeout=10).leaf_certificate)
            assert leaf.public_key() == key.public_key()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        for child in children:  # reaped by the parent, not left running
            with pytest.raises(ProcessLookupError):
                os.kill(child, 0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
