"""Loading the CA's material from PEM, with errors that name the item, what is wrong, and the fix.

The identity service reads three PEM inputs (and the embedded token key, tokens.py): the trust anchor
bundle, the issuer certificate and the issuer key. Each check below guards a failure that would
otherwise show up much later and far away, as a handshake error in some proxy:

- every anchor is a self-signed ECDSA P-256 CA certificate, valid now;
- the issuer key is an unencrypted ECDSA P-256 key and matches the issuer certificate;
- the issuer is a CA, named ``identity.<control-plane-namespace>.<trust-domain>``, valid now, and signed
  by one of the anchors (so leaves chain to what proxies trust).

The adapter reads the files and maps ``CaConfigItem`` to a file name; this module never touches a file.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.identity.ca import Issuer
from tether.core.identity.names import IdentityNameError, Mesh

FIX_INIT = "create a mesh directory with `tether identity init --out DIR`"


class CaConfigItem(enum.Enum):
    """Which input a configuration error is about."""

    TRUST_ANCHOR = "trust anchor"
    ISSUER_CERTIFICATE = "issuer certificate"
    ISSUER_KEY = "issuer key"
    TOKEN_KEY = "token key"


class CaConfigError(ValueError):
    """The CA cannot start from this material: ``item`` says which input, the message says what and the fix."""

    def __init__(self, item: CaConfigItem, message: str) -> None:
        super().__init__(message)
        self.item = item
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedCa:
    """A checked issuer and the anchors it chains to."""

    issuer: Issuer
    trust_anchors: tuple[x509.Certificate, ...]


def load_ca(
    *, trust_anchor_pem: bytes, issuer_certificate_pem: bytes, issuer_key_pem: bytes, wall_time_s: float
) -> LoadedCa:
    """Parse and cross-check the three inputs at ``wall_time_s``; CaConfigError on the first problem."""
    anchors = _load_anchors(trust_anchor_pem, wall_time_s)
    certificate = _load_certificate(issuer_certificate_pem)
    key = _load_key(issuer_key_pem)
    issuer_item = CaConfigItem.ISSUER_CERTIFICATE
    if key.public_key() != certificate.public_key():
        raise CaConfigError(
            CaConfigItem.ISSUER_KEY, f"the issuer key does not belong to the issuer certificate; {_fix_issuer()}"
        )
    if not _is_ca(certificate):
        message = f"the issuer certificate is not a CA (basicConstraints CA:TRUE); {_fix_issuer()}"
        raise CaConfigError(issuer_item, message)
    _check_valid_at(certificate, issuer_item, wall_time_s)
    mesh = _mesh_of(certificate)
    if not any(_signed_by(certificate, anchor) for anchor in anchors):
        raise CaConfigError(
            issuer_item,
            f"the issuer certificate ({certificate.subject.rfc4514_string()}) is not signed by any trust anchor "
            f"({', '.join(anchor.subject.rfc4514_string() for anchor in anchors)}); {_fix_issuer()}",
        )
    return LoadedCa(issuer=Issuer.of(certificate, key, mesh), trust_anchors=anchors)


def _load_anchors(pem: bytes, wall_time_s: float) -> tuple[x509.Certificate, ...]:
    item = CaConfigItem.TRUST_ANCHOR
    try:
        anchors = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as error:
        raise CaConfigError(item, f"no PEM certificate could be read ({error}); {FIX_INIT}") from None
    for anchor in anchors:
        subject = anchor.subject.rfc4514_string()
        _check_p256(anchor.public_key(), item)
        if not _is_ca(anchor) or anchor.subject != anchor.issuer or not _signed_by(anchor, anchor):
            raise CaConfigError(item, f"{subject} is not a self-signed CA certificate; {FIX_INIT}")
        _check_valid_at(anchor, item, wall_time_s)
    return anchors


def _load_certificate(pem: bytes) -> x509.Certificate:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        raise CaConfigError(
            CaConfigItem.ISSUER_CERTIFICATE, f"no PEM certificate could be read ({error}); {FIX_INIT}"
        ) from None
    _check_p256(certificate.public_key(), CaConfigItem.ISSUER_CERTIFICATE)
    return certificate


def _load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    item = CaConfigItem.ISSUER_KEY
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise CaConfigError(item, "the issuer key is encrypted; store it unencrypted (PKCS#8 PEM), mode 0600") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CaConfigError(item, f"no PEM private key could be read ({error}); {FIX_INIT}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removeprefix("_")
        raise CaConfigError(item, f"the issuer key is {kind}, not ECDSA P-256; {FIX_INIT}")
    _check_p256(key.public_key(), item)
    return key


def _check_p256(key: object, item: CaConfigItem) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__.removeprefix("_")
        raise CaConfigError(item, f"the {item.value} has a {kind} key; the mesh uses ECDSA P-256; {FIX_INIT}")


def _check_valid_at(certificate: x509.Certificate, item: CaConfigItem, wall_time_s: float) -> None:
    now = datetime.datetime.fromtimestamp(int(wall_time_s), tz=datetime.UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not start <= now < end:
        word = "expired" if now >= end else "is not valid yet"
        fix = FIX_INIT
        if item is not CaConfigItem.TRUST_ANCHOR:
            fix = "issue a new one signed by the trust anchor (`tether identity init` writes a fresh mesh)"
        raise CaConfigError(
            item, f"the {item.value} {word}: valid {start:%Y-%m-%dT%H:%M:%SZ} to {end:%Y-%m-%dT%H:%M:%SZ}; {fix}"
        )


def _mesh_of(certificate: x509.Certificate) -> Mesh:
    names = [attribute.value for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        if len(names) != 1 or not isinstance(names[0], str):
            raise IdentityNameError(f"the issuer has {len(names)} common names; it needs exactly one")
        return Mesh.from_issuer_name(names[0])
    except IdentityNameError as error:
        raise CaConfigError(CaConfigItem.ISSUER_CERTIFICATE, f"{error}; {_fix_issuer()}") from None


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(certificate: x509.Certificate, anchor: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(anchor)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _fix_issuer() -> str:
    return "write the issuer certificate and key as a pair signed by the trust anchor (`tether identity init` does)"
