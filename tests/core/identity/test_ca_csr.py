"""Hostile and arbitrary CSRs against the CA: a certificate only when a naive model of the rules says so,
otherwise the one specific problem the model predicts (checks run in a documented order: key, hash,
signature, SANs, CN)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.core.identity.ca import build_issuer, build_trust_anchor, certify, check_request
from tether.core.identity.csr import CSR_BYTES_MAX
from tether.core.identity.errors import CertifyError, CertifyErrorKind, Problem
from tether.core.identity.issuer_config import load_ca
from tether.core.identity.names import Mesh
from tether.core.identity.tokens import TokenAccepted

T0 = 1_750_000_000
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
IDENTITY = "web.emojivoto.serviceaccount.identity.linkerd.cluster.local"
OTHER_IDENTITY = "admin.kube-system.serviceaccount.identity.linkerd.cluster.local"
VERDICTS = {
    IDENTITY: TokenAccepted(namespace="emojivoto", serviceaccount="web"),
    OTHER_IDENTITY: TokenAccepted(namespace="kube-system", serviceaccount="admin"),
}


def _make_issuer() -> tuple[x509.Certificate, x509.Certificate, object]:
    anchor_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    anchor = build_trust_anchor(anchor_key, MESH, wall_time_s=T0 - 100, serial=1)
    issuer_cert = build_issuer(issuer_key, MESH, anchor=anchor, anchor_key=anchor_key, wall_time_s=T0 - 100, serial=2)
    pem = Encoding.PEM
    loaded = load_ca(
        trust_anchor_pem=anchor.public_bytes(pem),
        issuer_certificate_pem=issuer_cert.public_bytes(pem),
        issuer_key_pem=_key_pem(issuer_key),
        wall_time_s=T0,
    )
    return anchor, issuer_cert, loaded.issuer


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


ANCHOR, ISSUER_CERT, ISSUER = _make_issuer()
# Key generation is the slow part of a CSR; a small pool per kind keeps examples cheap.
KEYS = {
    "p256": [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)],
    "p384": [ec.generate_private_key(ec.SECP384R1())],
    "k256": [ec.generate_private_key(ec.SECP256K1())],
    "ed25519": [ed25519.Ed25519PrivateKey.generate()],
    "rsa": [rsa.generate_private_key(public_exponent=65537, key_size=1024)],
}
HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha224": hashes.SHA224}
SANS = {
    "dns_identity": x509.DNSName(IDENTITY),
    "dns_other_identity": x509.DNSName(OTHER_IDENTITY),
    "dns_upper_identity": x509.DNSName(IDENTITY.upper()),
    "dns_example": x509.DNSName("example.com"),
    "ip": x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
    "email": x509.RFC822Name("web@emojivoto.example"),
    "uri": x509.UniformResourceIdentifier("spiffe://cluster.local/ns/emojivoto/sa/web"),
}


@dataclass(frozen=True)
class CsrSpec:
    key_kind: str
    key_index: int
    hash_name: str
    sans: tuple[str, ...]
    common_name: str | None
    tamper_signature: bool
    pem: bool
    requested: str


@st.composite
def csr_specs(draw: st.DrawFn) -> CsrSpec:
    key_kind = draw(st.sampled_from(sorted(KEYS)))
    return CsrSpec(
        key_kind=key_kind,
        key_index=draw(st.integers(0, len(KEYS[key_kind]) - 1)),
        hash_name=draw(st.sampled_from(sorted(HASHES))),
        sans=tuple(draw(st.lists(st.sampled_from(sorted(SANS)), max_size=3))),
        common_name=draw(st.sampled_from([None, IDENTITY, OTHER_IDENTITY, "web"])),
        tamper_signature=draw(st.booleans()),
        pem=draw(st.booleans()),
        requested=draw(st.sampled_from([IDENTITY, OTHER_IDENTITY])),
    )


def build_csr(spec: CsrSpec) -> bytes:
    key = KEYS[spec.key_kind][spec.key_index]
    subject = [] if spec.common_name is None else [x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if spec.sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([SANS[name] for name in spec.sans]), critical=False)
    algorithm = None if spec.key_kind == "ed25519" else HASHES[spec.hash_name]()
    der = bytearray(builder.sign(key, algorithm).public_bytes(Encoding.DER))
    if spec.tamper_signature:
        der[-1] ^= 0x5A  # the last byte of the signature value; the DER structure stays intact
    return pem_wrap(bytes(der)) if spec.pem else bytes(der)


def pem_wrap(der: bytes) -> bytes:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()


def expected_problem(spec: CsrSpec) -> Problem | None:
    """The naive model: the rules in the order the CA documents them."""
    if spec.key_kind in ("ed25519", "rsa"):
        return Problem.CSR_KEY_NOT_ECDSA
    if spec.key_kind != "p256":
        return Problem.CSR_CURVE_NOT_P256
    if spec.hash_name not in ("sha256", "sha384", "sha512"):
        return Problem.CSR_UNSUPPORTED_HASH
    if spec.tamper_signature:
        return Problem.CSR_BAD_SIGNATURE
    if any(not name.startswith("dns_") for name in spec.sans):
        return Problem.CSR_NOT_DNS_SAN
    dns_values = [SANS[name].value for name in spec.sans]
    if not dns_values:
        return Problem.CSR_NO_DNS_SAN
    if len(dns_values) > 1:
        return Problem.CSR_EXTRA_DNS_SAN
    if dns_values[0] != spec.requested:
        return Problem.CSR_SAN_MISMATCH
    if spec.common_name not in (None, spec.requested):
        return Problem.CSR_CN_MISMATCH
    return None


def issue(csr: bytes, requested: str = IDENTITY) -> x509.Certificate:
    request = check_request(identity=requested, csr=csr, mesh=MESH)
    issued = certify(request, VERDICTS[requested], ISSUER, wall_time_s=T0, serial=77)
    return x509.load_der_x509_certificate(issued.leaf_der)


def assert_good_leaf(leaf: x509.Certificate, identity: str, public_key: object) -> None:
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(names) == [x509.DNSName(identity)]
    assert leaf.public_key() == public_key
    at = datetime.datetime.fromtimestamp(T0 + 60, tz=datetime.UTC)
    verifier = PolicyBuilder().store(Store([ANCHOR])).time(at).build_server_verifier(x509.DNSName(identity))
    chain = verifier.verify(leaf, [ISSUER_CERT])
    assert chain[-1] == ANCHOR


@settings(max_examples=300, deadline=None)
@given(spec=csr_specs())
@example(spec=CsrSpec("p256", 0, "sha256", ("dns_identity",), None, False, False, IDENTITY))
@example(spec=CsrSpec("p256", 0, "sha256", ("dns_identity",), IDENTITY, False, True, IDENTITY))
@example(spec=CsrSpec("p256", 1, "sha256", ("dns_identity", "ip"), None, False, False, IDENTITY))
@example(spec=CsrSpec("p256", 1, "sha256", ("dns_identity", "dns_example"), None, False, False, IDENTITY))
@example(spec=CsrSpec("p256", 2, "sha384", ("dns_upper_identity",), None, False, False, IDENTITY))
def test_csr_model_decides_certificate_or_the_one_problem(spec: CsrSpec) -> None:
    expected = expected_problem(spec)
    try:
        leaf = issue(build_csr(spec), spec.requested)
    except CertifyError as error:
        assert error.problem is expected, f"{error!r}, model expected {expected}"
        assert error.kind is CertifyErrorKind.INVALID_REQUEST and error.message
        return
    assert expected is None, f"issued a certificate, model expected {expected}"
    assert_good_leaf(leaf, spec.requested, KEYS[spec.key_kind][spec.key_index].public_key())


GOOD_CSR = build_csr(CsrSpec("p256", 0, "sha256", ("dns_identity",), IDENTITY, False, False, IDENTITY))


def assert_refused_unless_same_request(hostile: bytes, where: str) -> None:
    """A changed CSR gets a certificate only if it is another encoding of the very same signed request.

    That happens: the signature BIT STRING's unused-bits octet may go from 0 to 1 when the signature's last
    bit is 0, and cryptography (like Go's x509) reads the same signature from it. Same key, same names,
    same signature: nothing a caller could not have had with the original bytes.
    """
    try:
        issue(hostile)
    except CertifyError as error:
        assert error.kind is CertifyErrorKind.INVALID_REQUEST
        return
    original, changed = x509.load_der_x509_csr(GOOD_CSR), x509.load_der_x509_csr(hostile)
    assert changed.tbs_certrequest_bytes == original.tbs_certrequest_bytes, (
        f"a certificate for another request ({where})"
    )
    assert changed.signature == original.signature, f"a certificate with another signature ({where})"


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, len(GOOD_CSR) - 1), mask=st.integers(1, 255))
@example(position=10, mask=1)  # the version byte: cryptography raises InvalidVersion, not ValueError
def test_csr_with_any_byte_changed_never_gets_a_certificate_for_another_request(position: int, mask: int) -> None:
    hostile = bytearray(GOOD_CSR)
    hostile[position] ^= mask
    assert_refused_unless_same_request(bytes(hostile), f"byte {position} xor {mask:#x}")


def test_csr_every_position_flipped_three_ways_never_gets_a_certificate_for_another_request() -> None:
    # Exhaustive over positions (Hypothesis above samples positions and masks): about 1,000 CSRs.
    for position in range(len(GOOD_CSR)):
        for mask in (0x01, 0x80, 0xFF):
            hostile = bytearray(GOOD_CSR)
            hostile[position] ^= mask
            assert_refused_unless_same_request(bytes(hostile), f"byte {position} xor {mask:#x}")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600) | st.integers(0, len(GOOD_CSR) - 1).map(lambda n: GOOD_CSR[:n]))
def test_csr_garbage_or_truncated_is_unparseable(data: bytes) -> None:
    try:
        issue(data)
    except CertifyError as error:
        assert error.problem is Problem.CSR_UNPARSEABLE, error
        assert "DER or PEM" in error.message
    else:
        raise AssertionError("a certificate for garbage")


def test_csr_too_large_is_refused_before_parsing() -> None:
    try:
        issue(GOOD_CSR + b"\0" * CSR_BYTES_MAX)
    except CertifyError as error:
        assert error.problem is Problem.CSR_TOO_LARGE and str(CSR_BYTES_MAX) in error.message
    else:
        raise AssertionError("a certificate for an oversized CSR")


def test_csr_pem_block_with_garbage_inside_is_unparseable() -> None:
    try:
        issue(b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64!\n-----END CERTIFICATE REQUEST-----\n")
    except CertifyError as error:
        assert error.problem is Problem.CSR_UNPARSEABLE
    else:
        raise AssertionError("a certificate for a broken PEM block")


def test_csr_error_messages_name_the_fix() -> None:
    cases = {
        CsrSpec("rsa", 0, "sha256", ("dns_identity",), None, False, False, IDENTITY): "ECDSA P-256",
        CsrSpec("p384", 0, "sha256", ("dns_identity",), None, False, False, IDENTITY): "P-256",
        CsrSpec(
            "p256", 0, "sha256", ("dns_identity", "uri"), None, False, False, IDENTITY
        ): "request only the DNS name",
        CsrSpec("p256", 0, "sha256", (), None, False, False, IDENTITY): f"add exactly one: {IDENTITY}",
        CsrSpec("p256", 0, "sha256", ("dns_other_identity",), None, False, False, IDENTITY): "must be equal",
        CsrSpec("p256", 0, "sha256", ("dns_identity",), "web", False, False, IDENTITY): "leave it empty",
    }
    for spec, fix in cases.items():
        try:
            issue(build_csr(spec))
        except CertifyError as error:
            assert fix in error.message, (spec, error.message)
        else:
            raise AssertionError(spec)
