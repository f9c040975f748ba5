"""The certificate authority: a trust anchor (root), an issuer (intermediate), and leaf certificates.

Theory of operation
-------------------
A mesh trusts one or more trust anchors: long-lived, self-signed ECDSA P-256 certificates that every
proxy holds. The identity service holds an issuer: a CA certificate signed by an anchor, whose common
name ``identity.<control-plane-namespace>.<trust-domain>`` fixes the mesh its leaves belong to. A Certify
call passes three gates, in this order, and the first that fails decides the error:

1. ``check_request``: the identity name is in this mesh and the CSR passes csr.py (INVALID_REQUEST);
   this runs before any token is verified, so garbage never costs a TokenReview round trip;
2. the token verdict (tokens.py) accepts a service account, and it is the one the identity names
   (INVALID_TOKEN, IDENTITY_MISMATCH, or NOT_READY when the verifier could not decide);
3. the issuer is valid at ``wall_time_s`` (NOT_READY otherwise).

``certify`` then signs a leaf for the CSR's key: the identity as its one DNS SAN (and CN), serverAuth and
clientAuth, valid from ``wall_time_s - 20 s`` (a peer whose clock is a little behind still accepts it) for
24 h by default, but never past the issuer's own expiry.

Purity: the CA draws no entropy and reads no clock. Keys, serial numbers and ``wall_time_s`` are
arguments; the only randomness is the ECDSA nonce OpenSSL draws while signing, which changes signature
bytes and nothing else.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tether.core.identity.csr import validate_csr
from tether.core.identity.errors import CertifyError, Problem
from tether.core.identity.leaf import KEY_USAGE_FLAGS, LeafFields, LeafTemplate
from tether.core.identity.names import IdentityNameError, Mesh, WorkloadIdentity, parse_identity
from tether.core.identity.tokens import TokenAccepted, TokenRejected, TokenVerdict, VerifierUnavailable

HOUR_S = 3600
DAY_S = 24 * HOUR_S
LEAF_VALIDITY_S_DEFAULT = DAY_S
CLOCK_SKEW_ALLOWANCE_S = 20
# Rotating a trust anchor means handing every proxy a new bundle, so it is rare and planned: 10 years.
# Rotating the issuer only restarts the identity service with a new key signed by the same anchor, so it
# can be yearly, which bounds how long a stolen issuer key stays useful.
TRUST_ANCHOR_VALIDITY_S_DEFAULT = 3650 * DAY_S
ISSUER_VALIDITY_S_DEFAULT = 365 * DAY_S
SERIAL_MAX = 2**159  # RFC 5280: at most 20 octets, positive
IDENTITY_BYTES_MAX = 253


@dataclass(frozen=True, slots=True, kw_only=True)
class Issuer:
    """The signing half of the CA, loaded and checked (see issuer_config.py): its certificate and key,
    the mesh its name fixes, and the DER chain sent with every leaf."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    mesh: Mesh
    not_before_s: int
    not_after_s: int
    intermediates_der: tuple[bytes, ...]
    # Everything a leaf shares with every other leaf of this issuer, encoded once (leaf.py).
    _leaf_template: LeafTemplate = field(repr=False)

    @classmethod
    def of(cls, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, mesh: Mesh) -> Issuer:
        assert isinstance(key.curve, ec.SECP256R1), "the issuer key is P-256"
        assert key.public_key() == certificate.public_key(), "the issuer key matches its certificate"
        return cls(
            certificate=certificate,
            key=key,
            mesh=mesh,
            not_before_s=int(certificate.not_valid_before_utc.timestamp()),
            not_after_s=int(certificate.not_valid_after_utc.timestamp()),
            intermediates_der=(certificate.public_bytes(Encoding.DER),),
            _leaf_template=LeafTemplate.of(certificate, key),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedRequest:
    """A Certify request whose identity and CSR passed every check; only its public key reaches the leaf."""

    identity: WorkloadIdentity
    public_key: ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCertificate:
    """What Certify answers: the leaf (DER), the issuer chain (DER), and when the leaf expires."""

    identity: str
    leaf_der: bytes
    intermediates_der: tuple[bytes, ...]
    not_after_s: int
    serial: int

    def __repr__(self) -> str:
        return f"IssuedCertificate(identity={self.identity!r}, serial={self.serial}, not_after_s={self.not_after_s})"


def check_request(*, identity: str, csr: bytes, mesh: Mesh) -> CheckedRequest:
    """Gate 1: the identity is in ``mesh`` and the CSR is acceptable for it. Raises CertifyError."""
    if not identity:
        raise CertifyError(Problem.INVALID_IDENTITY, f"identity is empty; send the name to certify, {_example(mesh)}")
    if len(identity) > IDENTITY_BYTES_MAX:
        raise CertifyError(Problem.INVALID_IDENTITY, f"identity is {len(identity)} characters, more than 253")
    try:
        workload = parse_identity(identity, mesh)
    except IdentityNameError as error:
        raise CertifyError(Problem.INVALID_IDENTITY, str(error)) from None
    return CheckedRequest(identity=workload, public_key=validate_csr(csr, identity))


def authorize(request: CheckedRequest, verdict: TokenVerdict) -> None:
    """Gate 2: the verdict proves the service account the identity names. Raises CertifyError."""
    if isinstance(verdict, VerifierUnavailable):
        raise CertifyError(Problem.VERIFIER_UNAVAILABLE, f"cannot verify the token now: {verdict.reason}; retry")
    if isinstance(verdict, TokenRejected):
        raise CertifyError(Problem.TOKEN_REJECTED, f"the token was rejected: {verdict.reason}")
    assert isinstance(verdict, TokenAccepted), verdict
    wanted = request.identity
    if (verdict.namespace, verdict.serviceaccount) != (wanted.namespace, wanted.serviceaccount):
        raise CertifyError(
            Problem.TOKEN_FOR_OTHER_IDENTITY,
            f"the token proves service account {verdict.serviceaccount!r} in namespace {verdict.namespace!r}, "
            f"but the request is for {wanted.serviceaccount!r} in {wanted.namespace!r}; request "
            f"{verdict.serviceaccount}.{verdict.namespace}{wanted.mesh.identity_suffix} or send that workload's token",
        )


def certify(
    request: CheckedRequest,
    verdict: TokenVerdict,
    issuer: Issuer,
    *,
    wall_time_s: float,
    serial: int,
    leaf_validity_s: int = LEAF_VALIDITY_S_DEFAULT,
) -> IssuedCertificate:
    """Gates 2 and 3, then a leaf signed by ``issuer``. ``serial`` is drawn by the caller (1 .. 2**159-1)."""
    assert 0 < serial < SERIAL_MAX, "serial numbers are positive and at most 20 octets"
    assert leaf_validity_s > 0, leaf_validity_s
    assert request.identity.mesh == issuer.mesh, "check_request ran against this issuer's mesh"
    authorize(request, verdict)
    now_s = int(wall_time_s)
    if not issuer.not_before_s <= now_s < issuer.not_after_s:
        raise CertifyError(
            Problem.ISSUER_NOT_VALID_NOW,
            f"the issuer certificate is valid from {utc_text(issuer.not_before_s)} to "
            f"{utc_text(issuer.not_after_s)}, not at {utc_text(now_s)}; the operator must install a current issuer "
            "(or fix the clock)",
        )
    not_after_s = min(now_s + leaf_validity_s, issuer.not_after_s)
    name = request.identity.name
    leaf_der = issuer._leaf_template.sign(
        LeafFields(
            identity=name,
            public_key=request.public_key,
            serial=serial,
            not_before_s=max(now_s - CLOCK_SKEW_ALLOWANCE_S, issuer.not_before_s),
            not_after_s=not_after_s,
        )
    )
    return IssuedCertificate(
        identity=name,
        leaf_der=leaf_der,
        intermediates_der=issuer.intermediates_der,
        not_after_s=not_after_s,
        serial=serial,
    )


def build_trust_anchor(
    key: ec.EllipticCurvePrivateKey,
    mesh: Mesh,
    *,
    wall_time_s: float,
    serial: int,
    validity_s: int = TRUST_ANCHOR_VALIDITY_S_DEFAULT,
) -> x509.Certificate:
    """A self-signed root for ``mesh``, CN ``root.<control-plane-namespace>.<trust-domain>``."""
    assert isinstance(key.curve, ec.SECP256R1), "trust anchors are P-256"
    root_name = f"root.{mesh.control_plane_namespace}.{mesh.trust_domain}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, root_name)])
    return _ca_certificate(
        subject=name,
        public_key=key.public_key(),
        signer=key,
        signer_name=name,
        path_length=1,
        wall_time_s=wall_time_s,
        serial=serial,
        validity_s=validity_s,
    )


def build_issuer(
    key: ec.EllipticCurvePrivateKey,
    mesh: Mesh,
    *,
    anchor: x509.Certificate,
    anchor_key: ec.EllipticCurvePrivateKey,
    wall_time_s: float,
    serial: int,
    validity_s: int = ISSUER_VALIDITY_S_DEFAULT,
) -> x509.Certificate:
    """An intermediate for ``mesh`` signed by ``anchor``; its validity is clamped to the anchor's."""
    assert isinstance(key.curve, ec.SECP256R1), "issuers are P-256"
    anchor_not_after_s = int(anchor.not_valid_after_utc.timestamp())
    return _ca_certificate(
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, mesh.issuer_name)]),
        public_key=key.public_key(),
        signer=anchor_key,
        signer_name=anchor.subject,
        path_length=0,
        wall_time_s=wall_time_s,
        serial=serial,
        validity_s=min(validity_s, anchor_not_after_s - int(wall_time_s)),
    )


def _ca_certificate(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    signer_name: x509.Name,
    path_length: int,
    wall_time_s: float,
    serial: int,
    validity_s: int,
) -> x509.Certificate:
    assert 0 < serial < SERIAL_MAX and validity_s > 0, (serial, validity_s)
    now_s = int(wall_time_s)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(_datetime(now_s - CLOCK_SKEW_ALLOWANCE_S))
        .not_valid_after(_datetime(now_s + validity_s))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )


def _example(mesh: Mesh) -> str:
    return f"for example default.emojivoto{mesh.identity_suffix}"


def _datetime(seconds: int) -> datetime.datetime:
    # A conversion of a given instant, not a clock read.
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def utc_text(seconds: float) -> str:
    """An instant as RFC 3339 UTC to the second, as every identity message and log line writes it."""
    return _datetime(int(seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


_CA_KEY_USAGE = x509.KeyUsage(**{**KEY_USAGE_FLAGS, "key_cert_sign": True, "crl_sign": True})
