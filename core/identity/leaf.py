"""Leaf certificates from a precomputed template: the DER of a TBSCertificate, signed with the issuer's key.

Theory of operation
-------------------
Every leaf one issuer signs has the same version, signature algorithm, issuer name and four of its five
extensions (basicConstraints, keyUsage, extendedKeyUsage, authorityKeyIdentifier). ``LeafTemplate.of``
encodes those once, when the issuer is loaded. ``LeafTemplate.sign`` then encodes only what changes per
call (serial, validity, the subject and SAN built from the identity, the subject's public key), joins the
pieces into the TBSCertificate, signs it with ECDSA-SHA256 and wraps the signature into the Certificate.

The layout is the one cryptography's ``CertificateBuilder`` writes for the same inputs, field by field and
in the same order (tests/core/identity/test_leaf.py compares the TBSCertificate bytes of both, and has
``openssl verify`` check the chain), so switching to the template changed no certificate, only its cost:
about 100 us of builder work per leaf, a third of the core's share of a Certify call, while the signature
itself costs about 45 us.

A common name is limited to 64 octets (RFC 5280's ub-common-name; cryptography's builder refuses longer
ones). Longer identities, which Linkerd's naming scheme allows, get an empty subject, and then RFC 5280
4.2.1.6 requires the subjectAltName to be critical, so it is; the SAN is what peers match either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tether.core.identity import der

ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
COMMON_NAME_BYTES_MAX = 64  # RFC 5280 ub-common-name
MEMO_ENTRIES_MAX = 1024  # per memo of LeafTemplate: a mesh's identities, at ~300 bytes each
_VERSION_3 = der.context(0, der.integer(2), constructed=True)
_SIGNATURE_ALGORITHM = der.sequence(der.oid(ECDSA_WITH_SHA256))
_SAN_OID = der.oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string)
_COMMON_NAME_OID = der.oid(NameOID.COMMON_NAME.dotted_string)
_EMPTY_NAME = der.sequence()
_CRITICAL = der.boolean(True)
_DNS_NAME_TAG = 2  # GeneralName dNSName [2] IA5String, implicit
# Every KeyUsage flag, off; leaves and CA certificates (ca.py) each turn on their own.
KEY_USAGE_FLAGS = dict.fromkeys(
    (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    ),
    False,
)
LEAF_KEY_USAGE = x509.KeyUsage(**{**KEY_USAGE_FLAGS, "digital_signature": True})
LEAF_EXTENDED_KEY_USAGE = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


@dataclass(frozen=True, slots=True, kw_only=True)
class LeafFields:
    """The per-call fields of a leaf: everything else comes from the template."""

    identity: str
    public_key: ec.EllipticCurvePublicKey
    serial: int
    not_before_s: int
    not_after_s: int


@dataclass(frozen=True, slots=True)
class LeafTemplate:
    """The constant DER pieces of one issuer's leaves, and the issuer key that signs them."""

    key: ec.EllipticCurvePrivateKey
    issuer_name_der: bytes
    constant_extensions_der: bytes  # the four fixed extensions, encoded, in the builder's order
    # Memos of pure encodings: identity -> (subject, extensions), and (not before, not after) -> validity. A
    # proxy asks for the same identity every time, and every call within one second shares its validity.
    # Each is emptied when full (a miss costs one encoding, ~10 us), which bounds memory without LRU upkeep.
    _names: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, compare=False, repr=False)
    _validities: dict[tuple[int, int], bytes] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> LeafTemplate:
        assert isinstance(key.curve, ec.SECP256R1), "the issuer key is P-256"
        extensions = [
            _extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
            _extension(LEAF_KEY_USAGE, critical=True),
            _extension(LEAF_EXTENDED_KEY_USAGE, critical=False),
            _extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False),
        ]
        return cls(key, certificate.subject.public_bytes(), b"".join(extensions))

    def tbs_certificate(self, fields: LeafFields) -> bytes:
        """The TBSCertificate (RFC 5280 4.1) for ``fields``, as DER."""
        assert fields.serial > 0 and fields.not_before_s < fields.not_after_s, fields
        names = self._names.get(fields.identity)
        if names is None:
            names = self._names_der(fields.identity)
            _remember(self._names, fields.identity, names)
        window = (fields.not_before_s, fields.not_after_s)
        validity = self._validities.get(window)
        if validity is None:
            validity = der.sequence(der.x509_time(fields.not_before_s), der.x509_time(fields.not_after_s))
            _remember(self._validities, window, validity)
        subject, extensions = names
        return der.sequence(
            _VERSION_3,
            der.integer(fields.serial),
            _SIGNATURE_ALGORITHM,
            self.issuer_name_der,
            validity,
            subject,
            fields.public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            extensions,
        )

    def _names_der(self, name: str) -> tuple[bytes, bytes]:
        """The subject and the extensions field ([3], with the SAN last) for identity ``name``."""
        assert name.isascii(), "identities are DNS names (IA5String in the SAN)"
        general_names = der.sequence(der.context(_DNS_NAME_TAG, name.encode("ascii"), constructed=False))
        if len(name) <= COMMON_NAME_BYTES_MAX:
            subject = der.sequence(der.set_of(der.sequence(_COMMON_NAME_OID, der.utf8_string(name))))
            san = der.sequence(_SAN_OID, der.octet_string(general_names))
        else:  # no common name, so the SAN must be critical (module docstring)
            subject = _EMPTY_NAME
            san = der.sequence(_SAN_OID, _CRITICAL, der.octet_string(general_names))
        return subject, der.context(3, der.sequence(self.constant_extensions_der, san), constructed=True)

    def sign(self, fields: LeafFields) -> bytes:
        """The leaf Certificate for ``fields``, as DER, signed with ECDSA-SHA256 by the issuer key."""
        tbs = self.tbs_certificate(fields)
        signature = self.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        return der.sequence(tbs, _SIGNATURE_ALGORITHM, der.bit_string(signature))


def _remember(memo: dict, key: object, value: bytes | tuple[bytes, bytes]) -> None:
    if len(memo) >= MEMO_ENTRIES_MAX:
        memo.clear()
    memo[key] = value


def _extension(value: x509.ExtensionType, *, critical: bool) -> bytes:
    """One Extension: its OID, criticality (DER omits the default FALSE) and the encoded value."""
    parts = [der.oid(value.oid.dotted_string), der.octet_string(value.public_bytes())]
    if critical:
        parts.insert(1, _CRITICAL)
    return der.sequence(*parts)
