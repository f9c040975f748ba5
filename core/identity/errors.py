"""Why the identity service refused a certificate, as data: a coarse kind the adapter maps to a gRPC status,
a precise problem a test can assert, and a sentence that names what was wrong and how to fix it.

The kinds follow what a caller can do about them: fix the request (INVALID_REQUEST), present another
token (INVALID_TOKEN), ask for the identity its token proves (IDENTITY_MISMATCH), or retry later
(NOT_READY). service.py maps them to INVALID_ARGUMENT, UNAUTHENTICATED, FAILED_PRECONDITION and
UNAVAILABLE (``CERTIFY_STATUS``), for the grpcio service and the simulator's control plane alike.
"""

from __future__ import annotations

import enum


class CertifyErrorKind(enum.Enum):
    """What the caller should do differently; one gRPC status code each (service.CERTIFY_STATUS)."""

    INVALID_REQUEST = "invalid_request"
    INVALID_TOKEN = "invalid_token"
    IDENTITY_MISMATCH = "identity_mismatch"
    NOT_READY = "not_ready"


class Problem(enum.Enum):
    """The one check a request failed, with the kind it belongs to and a snake_case label."""

    MALFORMED_MESSAGE = (CertifyErrorKind.INVALID_REQUEST, "malformed_message")
    INVALID_IDENTITY = (CertifyErrorKind.INVALID_REQUEST, "invalid_identity")
    CSR_TOO_LARGE = (CertifyErrorKind.INVALID_REQUEST, "csr_too_large")
    CSR_UNPARSEABLE = (CertifyErrorKind.INVALID_REQUEST, "csr_unparseable")
    CSR_KEY_NOT_ECDSA = (CertifyErrorKind.INVALID_REQUEST, "csr_key_not_ecdsa")
    CSR_CURVE_NOT_P256 = (CertifyErrorKind.INVALID_REQUEST, "csr_curve_not_p256")
    CSR_UNSUPPORTED_HASH = (CertifyErrorKind.INVALID_REQUEST, "csr_unsupported_hash")
    CSR_BAD_SIGNATURE = (CertifyErrorKind.INVALID_REQUEST, "csr_bad_signature")
    CSR_NOT_DNS_SAN = (CertifyErrorKind.INVALID_REQUEST, "csr_not_dns_san")
    CSR_NO_DNS_SAN = (CertifyErrorKind.INVALID_REQUEST, "csr_no_dns_san")
    CSR_EXTRA_DNS_SAN = (CertifyErrorKind.INVALID_REQUEST, "csr_extra_dns_san")
    CSR_SAN_MISMATCH = (CertifyErrorKind.INVALID_REQUEST, "csr_san_mismatch")
    CSR_CN_MISMATCH = (CertifyErrorKind.INVALID_REQUEST, "csr_cn_mismatch")
    TOKEN_REJECTED = (CertifyErrorKind.INVALID_TOKEN, "token_rejected")
    TOKEN_FOR_OTHER_IDENTITY = (CertifyErrorKind.IDENTITY_MISMATCH, "token_for_other_identity")
    ISSUER_NOT_VALID_NOW = (CertifyErrorKind.NOT_READY, "issuer_not_valid_now")
    VERIFIER_UNAVAILABLE = (CertifyErrorKind.NOT_READY, "verifier_unavailable")

    def __init__(self, kind: CertifyErrorKind, label: str) -> None:
        self.kind = kind
        self.label = label


class CertifyError(Exception):
    """A refused Certify call: the problem and a message for the caller (sent as the gRPC status details)."""

    def __init__(self, problem: Problem, message: str) -> None:
        assert message, "every refusal says why"
        super().__init__(message)
        self.problem = problem
        self.message = message

    @property
    def kind(self) -> CertifyErrorKind:
        return self.problem.kind

    def __repr__(self) -> str:
        return f"CertifyError(Problem.{self.problem.name}, {self.message!r})"
