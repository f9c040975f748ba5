"""The CA's leaves (validity, extensions, chain, clamping), its gates (token verdicts, issuer validity),
its purity, and the identity names it signs for."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.identity.ca import (
    CLOCK_SKEW_ALLOWANCE_S,
    DAY_S,
    Issuer,
    build_issuer,
    build_trust_anchor,
    certify,
    check_request,
)
from tether.core.identity.errors import CertifyError, CertifyErrorKind, Problem
from tether.core.identity.names import IdentityNameError, Mesh, WorkloadIdentity, parse_identity, parse_username
from tether.core.identity.tokens import TokenAccepted, TokenRejected, VerifierUnavailable

T0 = 1_750_000_000
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
WEB = WorkloadIdentity(namespace="emojivoto", serviceaccount="web", mesh=MESH)
WEB_TOKEN = TokenAccepted(namespace="emojivoto", serviceaccount="web")
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def make_ca(*, issuer_validity_s: int = 365 * DAY_S, mesh: Mesh = MESH) -> tuple[x509.Certificate, Issuer]:
    anchor_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    anchor = build_trust_anchor(anchor_key, mesh, wall_time_s=T0, serial=1)
    certificate = build_issuer(
        issuer_key, mesh, anchor=anchor, anchor_key=anchor_key, wall_time_s=T0, serial=2, validity_s=issuer_validity_s
    )
    return anchor, Issuer.of(certificate, issuer_key, mesh)


ANCHOR, ISSUER = make_ca()


def csr_for(name: str, key: ec.EllipticCurvePrivateKey = LEAF_KEY) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def leaf_of(
    wall_time_s: float = T0 + 100, *, issuer: Issuer = ISSUER, serial: int = 5, **kwargs: int
) -> x509.Certificate:
    request = check_request(identity=WEB.name, csr=csr_for(WEB.name), mesh=issuer.mesh)
    issued = certify(request, WEB_TOKEN, issuer, wall_time_s=wall_time_s, serial=serial, **kwargs)
    leaf = x509.load_der_x509_certificate(issued.leaf_der)
    assert issued.not_after_s == int(leaf.not_valid_after_utc.timestamp())
    assert issued.intermediates_der == (issuer.certificate.public_bytes(Encoding.DER),)
    return leaf


def refusal(wall_time_s: float = T0 + 100, *, identity: str = WEB.name, verdict: object = WEB_TOKEN) -> CertifyError:
    with pytest.raises(CertifyError) as caught:
        request = check_request(identity=identity, csr=csr_for(identity), mesh=MESH)
        certify(request, verdict, ISSUER, wall_time_s=wall_time_s, serial=5)  # type: ignore[arg-type]
    return caught.value


def test_certify_leaf_is_back_dated_20_s_and_valid_24_h() -> None:
    leaf = leaf_of(T0 + 1000.7)
    assert leaf.not_valid_before_utc.timestamp() == T0 + 1000 - CLOCK_SKEW_ALLOWANCE_S
    assert leaf.not_valid_after_utc.timestamp() == T0 + 1000 + DAY_S


def test_certify_leaf_validity_is_an_argument() -> None:
    assert leaf_of(T0 + 1000, leaf_validity_s=3600).not_valid_after_utc.timestamp() == T0 + 1000 + 3600


def test_certify_leaf_never_outlives_its_issuer() -> None:
    _, short_issuer = make_ca(issuer_validity_s=DAY_S // 2)
    leaf = leaf_of(T0 + 100, issuer=short_issuer)
    assert leaf.not_valid_after_utc.timestamp() == short_issuer.not_after_s == T0 + DAY_S // 2


def test_certify_leaf_has_server_and_client_auth_and_chains_to_the_anchor() -> None:
    leaf = leaf_of(serial=123456789)
    assert leaf.serial_number == 123456789
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == WEB.name
    at = datetime.datetime.fromtimestamp(T0 + 200, tz=datetime.UTC)
    store = Store([ANCHOR])
    server = PolicyBuilder().store(store).time(at).build_server_verifier(x509.DNSName(WEB.name))
    assert server.verify(leaf, [ISSUER.certificate])[-1] == ANCHOR
    client = PolicyBuilder().store(store).time(at).build_client_verifier().verify(leaf, [ISSUER.certificate])
    assert client.subjects == [x509.DNSName(WEB.name)]


def test_certify_is_pure_apart_from_the_signature() -> None:
    first, second = leaf_of(T0 + 100), leaf_of(T0 + 100)
    assert first.tbs_certificate_bytes == second.tbs_certificate_bytes


def test_certify_refuses_a_rejected_token_as_invalid_token() -> None:
    error = refusal(verdict=TokenRejected(reason="the token expired 5 s ago"))
    assert (error.kind, error.problem) == (CertifyErrorKind.INVALID_TOKEN, Problem.TOKEN_REJECTED)
    assert "expired 5 s ago" in error.message


def test_certify_refuses_a_token_for_another_service_account_as_identity_mismatch() -> None:
    error = refusal(verdict=TokenAccepted(namespace="emojivoto", serviceaccount="voting"))
    assert error.kind is CertifyErrorKind.IDENTITY_MISMATCH
    assert "voting.emojivoto.serviceaccount.identity.linkerd.cluster.local" in error.message


def test_certify_refuses_a_token_for_another_namespace_as_identity_mismatch() -> None:
    assert refusal(verdict=TokenAccepted(namespace="other", serviceaccount="web")).problem is (
        Problem.TOKEN_FOR_OTHER_IDENTITY
    )


def test_certify_is_not_ready_while_the_verifier_is_unavailable() -> None:
    error = refusal(verdict=VerifierUnavailable(reason="HTTP 503"))
    assert (error.kind, error.problem) == (CertifyErrorKind.NOT_READY, Problem.VERIFIER_UNAVAILABLE)


@pytest.mark.parametrize("wall_time_s", [T0 + 365 * DAY_S, T0 + 400 * DAY_S, T0 - CLOCK_SKEW_ALLOWANCE_S - 1])
def test_certify_is_not_ready_outside_the_issuer_validity(wall_time_s: int) -> None:
    error = refusal(wall_time_s)
    assert (error.kind, error.problem) == (CertifyErrorKind.NOT_READY, Problem.ISSUER_NOT_VALID_NOW)
    assert "install a current issuer" in error.message


@pytest.mark.parametrize(
    "identity",
    [
        "",
        "web.emojivoto.serviceaccount.identity.linkerd.other.domain",
        "web.emojivoto.serviceaccount.identity.istio.cluster.local",
        "emojivoto.serviceaccount.identity.linkerd.cluster.local",
        "Web.emojivoto.serviceaccount.identity.linkerd.cluster.local",
        "web.emo_jivoto.serviceaccount.identity.linkerd.cluster.local",
        "x" * 300,
    ],
)
def test_check_request_refuses_names_outside_the_mesh(identity: str) -> None:
    with pytest.raises(CertifyError) as caught:
        check_request(identity=identity, csr=csr_for("example.com"), mesh=MESH)
    assert caught.value.problem is Problem.INVALID_IDENTITY


def test_check_request_runs_before_the_token_is_looked_at() -> None:
    # A malformed request is INVALID_REQUEST even with a rejected token: no TokenReview is spent on it.
    with pytest.raises(CertifyError) as caught:
        check_request(identity=WEB.name, csr=b"garbage", mesh=MESH)
    assert caught.value.kind is CertifyErrorKind.INVALID_REQUEST


LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    namespace=LABELS,
    serviceaccount=st.lists(LABELS, min_size=1, max_size=3).map(".".join),
    control_plane_namespace=LABELS,
    trust_domain=st.lists(LABELS, min_size=1, max_size=3).map(".".join),
)
def test_identity_names_parse_back_to_their_parts(
    namespace: str, serviceaccount: str, control_plane_namespace: str, trust_domain: str
) -> None:
    mesh = Mesh(control_plane_namespace=control_plane_namespace, trust_domain=trust_domain)
    workload = WorkloadIdentity(namespace=namespace, serviceaccount=serviceaccount, mesh=mesh)
    assert workload.name == (
        f"{serviceaccount}.{namespace}.serviceaccount.identity.{control_plane_namespace}.{trust_domain}"
    )
    assert parse_identity(workload.name, mesh) == workload
    assert Mesh.from_issuer_name(mesh.issuer_name) == mesh
    assert parse_username(workload.username) == (namespace, serviceaccount)


@pytest.mark.parametrize(
    "username",
    ["system:serviceaccount:ns", "system:serviceaccount::sa", "system:node:n1", "alice", "system:serviceaccount:a:b:c"],
)
def test_parse_username_accepts_only_service_accounts(username: str) -> None:
    assert parse_username(username) is None


@pytest.mark.parametrize("name", ["identity.linkerd", "root.linkerd.cluster.local", "identity.Linkerd.cluster.local"])
def test_mesh_from_issuer_name_refuses_other_names(name: str) -> None:
    with pytest.raises(IdentityNameError):
        Mesh.from_issuer_name(name)
