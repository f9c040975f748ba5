"""The identity service over real loopback sockets: a grpcio client calls Certify and gets a certificate or
each documented status code; the Kubernetes verifier talks to a small local API server through the real
kubernetes client; the mesh directory's errors name the file."""

from __future__ import annotations

import asyncio
import datetime
import json
import queue
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import kubernetes.client
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store

from tether.adapters.identity_cli import identity
from tether.adapters.identity_k8s import KubernetesTokenVerifier
from tether.adapters.identity_service import (
    CERTIFY_METHOD,
    IdentityService,
    MeshDirectoryError,
    MeshFiles,
    load_mesh,
    serve_async_until,
    start_server,
)
from tether.core.address import Address
from tether.core.identity.tokens import (
    EmbeddedTokenVerifier,
    TokenAccepted,
    TokenRejected,
    VerifierUnavailable,
    mint_token,
)
from tether.core.identity.wire import CertifyRequest, decode_certify_response, encode_certify_request

pytestmark = pytest.mark.realsocket
WEB = "web.emojivoto.serviceaccount.identity.linkerd.cluster.local"
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mesh") / "mesh"
    result = CliRunner().invoke(identity, ["init", "--out", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


@dataclass
class Running:
    channel: grpc.Channel
    files: MeshFiles
    clock: list[float]

    def certify(self, request: CertifyRequest) -> x509.Certificate:
        call = self.channel.unary_unary(
            CERTIFY_METHOD, request_serializer=encode_certify_request, response_deserializer=decode_certify_response
        )
        response = call(request, timeout=10)
        leaf = x509.load_der_x509_certificate(response.leaf_certificate)
        issuer = x509.load_pem_x509_certificate(self.files.issuer_certificate.read_bytes())
        assert response.intermediate_certificates == (issuer.public_bytes(Encoding.DER),)
        assert response.valid_until.seconds == int(leaf.not_valid_after_utc.timestamp())
        return leaf

    def refusal(self, request: CertifyRequest | bytes) -> grpc.RpcError:
        raw = self.channel.unary_unary(CERTIFY_METHOD)
        data = request if isinstance(request, bytes) else encode_certify_request(request)
        with pytest.raises(grpc.RpcError) as caught:
            raw(data, timeout=10)
        return caught.value


# The threaded server (start_server), and grpc.aio (serve_async_until) answering on its loop or, for a verifier
# that blocks, in its thread pool.
SERVERS = ["threaded", "aio-inline", "aio-executor"]


def start(files: MeshFiles, verifier: object, server: str = "threaded") -> tuple[Callable[[], None], Running]:
    """Serve on a free port; returns a function that stops the server, and the client's handle."""
    now = [1.0]
    loaded, _ = load_mesh(files, datetime.datetime.now(datetime.UTC).timestamp())
    now[0] = loaded.issuer.not_before_s + 3600.0
    service = IdentityService(
        loaded.issuer,
        verifier,  # type: ignore[arg-type]
        wall_clock=lambda: now[0],
        verifier_blocks=server != "aio-inline",
    )
    if server == "threaded":
        grpc_server, port = start_server(service, Address("127.0.0.1", 0), workers=2)
        stop: Callable[[], None] = lambda: grpc_server.stop(None)  # noqa: E731
    else:
        stop, port = start_aio(service)
    return stop, Running(grpc.insecure_channel(f"127.0.0.1:{port}"), files, now)


def start_aio(service: IdentityService) -> tuple[Callable[[], None], int]:
    """serve_async_until on an event loop in a thread of its own (signals only reach the main thread)."""
    bound: queue.Queue[int] = queue.Queue()
    loop = asyncio.new_event_loop()
    stopping = asyncio.Event()

    async def serve() -> None:
        await serve_async_until(
            stopping, service, Address("127.0.0.1", 0), workers=2, reuse_port=False, on_ready=bound.put
        )

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the aio server stopped"
        loop.close()

    return stop, bound.get(timeout=10)


@pytest.fixture(params=SERVERS[:2])
def running(mesh_dir: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    files = MeshFiles(mesh_dir)
    _, token_key = load_mesh(files, datetime.datetime.now(datetime.UTC).timestamp())
    stop, handle = start(files, EmbeddedTokenVerifier(token_key), request.param)
    yield handle
    handle.channel.close()
    stop()


def csr(name: str = WEB, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def token_for(running: Running, namespace: str = "emojivoto", serviceaccount: str = "web", days: int = 1) -> bytes:
    _, key = load_mesh(running.files, running.clock[0])
    now_s = running.clock[0]
    return mint_token(
        key, namespace=namespace, serviceaccount=serviceaccount, wall_time_s=now_s, valid_for_s=days * 86400
    ).encode()


def test_identity_service_certifies_a_der_or_pem_csr_and_the_leaf_chains_to_the_anchor(running: Running) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = csr(key=key)
    pem = x509.load_der_x509_csr(der).public_bytes(Encoding.PEM)
    for form in (der, pem):
        leaf = running.certify(CertifyRequest(identity=WEB, token=token_for(running), certificate_signing_request=form))
        assert leaf.public_key() == key.public_key()
        anchor = x509.load_pem_x509_certificate(running.files.trust_anchor.read_bytes())
        issuer = x509.load_pem_x509_certificate(running.files.issuer_certificate.read_bytes())
        at = datetime.datetime.fromtimestamp(running.clock[0], tz=datetime.UTC)
        verifier = PolicyBuilder().store(Store([anchor])).time(at).build_server_verifier(x509.DNSName(WEB))
        assert verifier.verify(leaf, [issuer])[-1] == anchor
        assert leaf.not_valid_after_utc.timestamp() == int(running.clock[0]) + 24 * 3600


def test_identity_service_malformed_message_is_invalid_argument(running: Running) -> None:
    error = running.refusal(b"\x0a\x20truncated")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "CertifyRequest message is malformed" in error.details()


def test_identity_service_bad_csr_is_invalid_argument(running: Running) -> None:
    error = running.refusal(
        CertifyRequest(identity=WEB, token=token_for(running), certificate_signing_request=csr("x.y"))
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "differs from the requested identity" in error.details()


def test_identity_service_invalid_token_is_unauthenticated(running: Running) -> None:
    error = running.refusal(CertifyRequest(identity=WEB, token=b"tether1.0.0.0", certificate_signing_request=csr()))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "token was rejected" in error.details()


def test_identity_service_token_for_another_identity_is_failed_precondition(running: Running) -> None:
    other = token_for(running, serviceaccount="voting")
    error = running.refusal(CertifyRequest(identity=WEB, token=other, certificate_signing_request=csr()))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "'voting'" in error.details()


def test_identity_service_expired_issuer_is_unavailable(running: Running) -> None:
    request = CertifyRequest(identity=WEB, token=token_for(running, days=366), certificate_signing_request=csr())
    running.clock[0] += 365 * 86400  # past the issuer's one year, and the token is still good
    error = running.refusal(request)
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error.details()
    assert "issuer certificate is valid from" in error.details()


# Kubernetes TokenReview, answered by a local stand-in for the API server.


class ApiServer(BaseHTTPRequestHandler):
    reviews: dict[str, tuple[int, dict[str, object]]] = {
        "web-token": (200, {"authenticated": True, "user": {"username": "system:serviceaccount:emojivoto:web"}}),
        "person-token": (200, {"authenticated": True, "user": {"username": "alice"}}),
        "bad-token": (200, {"authenticated": False, "error": "invalid bearer token"}),
        "forbidden": (403, {}),
    }
    seen: list[dict[str, object]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        ApiServer.seen.append(body)
        status, review_status = self.reviews[body["spec"]["token"]] if self.path == TOKENREVIEW_PATH else (404, {})
        if status == 200:
            review_status = {**review_status, "audiences": body["spec"]["audiences"]}
            answer: dict[str, object] = {**body, "status": review_status}
        else:
            answer = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status}
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def k8s_verifier(host: str) -> KubernetesTokenVerifier:
    configuration = kubernetes.client.Configuration()
    configuration.host = host
    api = kubernetes.client.AuthenticationV1Api(kubernetes.client.ApiClient(configuration))
    return KubernetesTokenVerifier(api, timeout_s=3)


def test_kubernetes_verifier_maps_token_reviews_to_verdicts(api_server: str) -> None:
    verifier = k8s_verifier(api_server)
    assert verifier.verify(b"web-token", 0) == TokenAccepted(namespace="emojivoto", serviceaccount="web")
    assert ApiServer.seen[-1]["spec"] == {"token": "web-token", "audiences": ["identity.l5d.io"]}
    assert isinstance(verifier.verify(b"person-token", 0), TokenRejected)
    rejected = verifier.verify(b"bad-token", 0)
    assert isinstance(rejected, TokenRejected) and "invalid bearer token" in rejected.reason
    forbidden = verifier.verify(b"forbidden", 0)
    assert isinstance(forbidden, VerifierUnavailable) and "tokenreviews" in forbidden.reason


def test_kubernetes_verifier_unreachable_api_is_unavailable() -> None:
    verdict = k8s_verifier("http://127.0.0.1:1").verify(b"web-token", 0)
    assert isinstance(verdict, VerifierUnavailable) and "could not be reached" in verdict.reason


@pytest.mark.parametrize("server", ["threaded", "aio-executor"])
def test_identity_service_with_token_review_end_to_end(mesh_dir: Path, api_server: str, server: str) -> None:
    stop, running = start(MeshFiles(mesh_dir), k8s_verifier(api_server), server)
    try:
        leaf = running.certify(CertifyRequest(identity=WEB, token=b"web-token", certificate_signing_request=csr()))
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        ) == [WEB]
        error = running.refusal(CertifyRequest(identity=WEB, token=b"forbidden", certificate_signing_request=csr()))
        assert error.code() is grpc.StatusCode.UNAVAILABLE and "tokenreviews" in error.details()
    finally:
        running.channel.close()
        stop()


# The mesh directory


def test_load_mesh_names_the_missing_file(mesh_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(mesh_dir, copy)
    (copy / "issuer.key").unlink()
    with pytest.raises(MeshDirectoryError, match=r"issuer\.key \(issuer key\) is missing; create a mesh directory"):
        load_mesh(MeshFiles(copy), datetime.datetime.now(datetime.UTC).timestamp())


def test_load_mesh_names_an_issuer_from_another_mesh(mesh_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert CliRunner().invoke(identity, ["init", "--out", str(other)]).exit_code == 0
    shutil.copy(mesh_dir / "trust-anchor.crt", other / "trust-anchor.crt")
    with pytest.raises(
        MeshDirectoryError, match=r"issuer\.crt \(issuer certificate\): .*not signed by any trust anchor"
    ):
        load_mesh(MeshFiles(other), datetime.datetime.now(datetime.UTC).timestamp())


def test_start_server_on_a_busy_port_raises_oserror(mesh_dir: Path) -> None:
    loaded, key = load_mesh(MeshFiles(mesh_dir), datetime.datetime.now(datetime.UTC).timestamp())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = Address("127.0.0.1", busy.getsockname()[1])
        with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
            start_server(IdentityService(loaded.issuer, EmbeddedTokenVerifier(key)), address)
