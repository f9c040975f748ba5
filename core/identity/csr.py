"""Certificate signing requests: the checks a CSR must pass before the CA signs anything for it.

The CSR only contributes its public key. Everything else in the leaf certificate (names, extensions,
validity) comes from the CA, so the checks exist to catch a confused or hostile caller early, with a
message that says what to change, rather than to copy fields across. They run in a fixed order and
the first failure wins, so a test can name the one problem a given CSR has:

1. size and parsing (DER, or PEM with a CERTIFICATE REQUEST block);
2. the key: ECDSA on P-256, the only key the mesh's TLS is configured for;
3. the signature: SHA-256, -384 or -512, and valid (proof that the caller holds the private key);
4. the subject alternative names: exactly one, a DNS name, equal to the requested identity; no IP,
   email, URI or other kinds, since a peer would trust those too;
5. the common name: absent or equal to the identity.

Requested extensions other than the SAN are ignored; the CA never copies them.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.identity.errors import CertifyError, Problem

# A P-256 CSR with one SAN is about 300 bytes of DER (400 as PEM); 8 KiB leaves room for odd but honest
# encoders while keeping a hostile caller from making the parser chew on megabytes.
CSR_BYTES_MAX = 8192
ACCEPTED_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_PEM_MARKER = b"-----BEGIN CERTIFICATE REQUEST-----"


def parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    """The CSR in ``data`` (DER, or PEM), or CertifyError(CSR_TOO_LARGE / CSR_UNPARSEABLE)."""
    if len(data) > CSR_BYTES_MAX:
        raise CertifyError(
            Problem.CSR_TOO_LARGE,
            f"certificate_signing_request is {len(data)} bytes; at most {CSR_BYTES_MAX} are accepted "
            "(a P-256 CSR with one DNS name is about 300)",
        )
    if not data:
        raise CertifyError(Problem.CSR_UNPARSEABLE, "certificate_signing_request is empty; send a DER or PEM CSR")
    try:
        if data.lstrip().startswith(_PEM_MARKER):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as error:
        # InvalidVersion is no ValueError: a CSR whose version byte is not 0 would otherwise escape as a crash.
        raise CertifyError(
            Problem.CSR_UNPARSEABLE, f"certificate_signing_request is not a DER or PEM PKCS#10 CSR ({error})"
        ) from None


def validate_csr(data: bytes, identity: str) -> ec.EllipticCurvePublicKey:
    """The public key of a CSR that passes every check for ``identity``; CertifyError naming the first failed one."""
    assert identity, "the identity name is checked before the CSR"
    csr = parse_csr(data)
    try:
        key = _checked_key(csr)
        _check_signature(csr, key)
        _check_names(csr, identity)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        # Lazily parsed parts (extensions, attribute values) can still turn out malformed here.
        message = f"certificate_signing_request has a malformed part ({error})"
        raise CertifyError(Problem.CSR_UNPARSEABLE, message) from None
    return key


def _checked_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertifyError(
            Problem.CSR_KEY_NOT_ECDSA,
            f"the CSR's key is {type(key).__name__.removeprefix('_')}; generate an ECDSA P-256 key (secp256r1)",
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise CertifyError(
            Problem.CSR_CURVE_NOT_P256, f"the CSR's key is on curve {key.curve.name}; generate it on P-256 (secp256r1)"
        )
    return key


def _check_signature(csr: x509.CertificateSigningRequest, key: ec.EllipticCurvePublicKey) -> None:
    algorithm = csr.signature_hash_algorithm
    if not isinstance(algorithm, ACCEPTED_HASHES):
        name = algorithm.name if algorithm is not None else "none"
        message = f"the CSR is signed with {name}; sign it with ECDSA and SHA-256"
        raise CertifyError(Problem.CSR_UNSUPPORTED_HASH, message)
    # The same check as csr.is_signature_valid, with the key already parsed (that property parses it again).
    try:
        key.verify(csr.signature, csr.tbs_certrequest_bytes, ec.ECDSA(algorithm))
    except InvalidSignature:
        raise CertifyError(
            Problem.CSR_BAD_SIGNATURE, "the CSR's signature does not verify with its own key; sign it with that key"
        ) from None


def _check_names(csr: x509.CertificateSigningRequest, identity: str) -> None:
    try:
        names = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    others = [name for name in names if not isinstance(name, x509.DNSName)]
    if others:
        raise CertifyError(
            Problem.CSR_NOT_DNS_SAN,
            f"the CSR asks for a {type(others[0]).__name__} subject alternative name ({others[0].value!r}); "
            f"request only the DNS name {identity}",
        )
    dns_names = [name.value for name in names]
    if not dns_names:
        raise CertifyError(
            Problem.CSR_NO_DNS_SAN, f"the CSR has no DNS subject alternative name; add exactly one: {identity}"
        )
    if len(dns_names) > 1:
        raise CertifyError(
            Problem.CSR_EXTRA_DNS_SAN,
            f"the CSR asks for {len(dns_names)} DNS names {dns_names[:4]!r}; request exactly one: {identity}",
        )
    if dns_names[0] != identity:
        raise CertifyError(
            Problem.CSR_SAN_MISMATCH,
            f"the CSR's DNS name {dns_names[0]!r} differs from the requested identity {identity!r}; "
            "the two must be equal",
        )
    common_names = [attribute.value for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if common_names not in ([], [""], [identity]):
        raise CertifyError(
            Problem.CSR_CN_MISMATCH,
            f"the CSR's common name {common_names!r} differs from the requested identity {identity!r}; "
            "leave it empty or set it to the identity",
        )
