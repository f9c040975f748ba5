"""Test certificates made with cryptography: a trust anchor (root), an issuer (intermediate) and leaves.

The shapes follow Linkerd's: a self-signed root is the trust anchor, an intermediate CA (the identity issuer)
signs workload leaves, and a leaf carries exactly one DNS SAN, its identity, as its common name too. Tests use
these instead of the project's certificate authority so they do not depend on it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# A fixed wall clock for certificates: tests that check expiry pass their own times.
EPOCH_S = 1_700_000_000
DAY_S = 86_400


def _time(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key (and, for a leaf, the intermediates that chain it to a root)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = field(default=())

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(cert.public_bytes(serialization.Encoding.DER) for cert in self.chain)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def chain_pem(self) -> bytes:
        """The certificate followed by its intermediates, as a TLS server sends them."""
        return self.pem + b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_root(name: str = "root.tether.test", *, not_before_s: float = EPOCH_S - DAY_S) -> Issued:
    key = new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(not_before_s))
        .not_valid_after(_time(not_before_s + 3650 * DAY_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def make_issuer(root: Issued, name: str = "identity.tether.test", *, not_before_s: float = EPOCH_S - DAY_S) -> Issued:
    key = new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(not_before_s))
        .not_valid_after(_time(not_before_s + 365 * DAY_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(root), critical=False)
    )
    return Issued(builder.sign(root.key, hashes.SHA256()), key)


def make_leaf(
    issuer: Issued,
    identity: str,
    *,
    key: ec.EllipticCurvePrivateKey | None = None,
    not_before_s: float = EPOCH_S - DAY_S,
    lifetime_s: float = 2 * DAY_S,
    dns_names: list[str] | None = None,
) -> Issued:
    """A workload leaf for ``identity`` (its only DNS SAN unless ``dns_names`` says otherwise)."""
    key = key if key is not None else new_key()
    names = [identity] if dns_names is None else dns_names
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_time(not_before_s))
        .not_valid_after(_time(not_before_s + lifetime_s))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_authority_key_id(issuer), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key, chain=(issuer.certificate,))


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: Issued) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())


@dataclass(frozen=True)
class Pki:
    """One trust domain: a root, its issuer, and a way to mint leaves."""

    root: Issued
    issuer: Issued

    @classmethod
    def create(cls, name: str = "root.tether.test") -> Pki:
        root = make_root(name)
        return cls(root, make_issuer(root, "issuer." + name))

    def leaf(self, identity: str, **options: object) -> Issued:
        return make_leaf(self.issuer, identity, **options)  # type: ignore[arg-type]
