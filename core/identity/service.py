"""One Certify call as the identity service answers it: wire bytes in, the certificate and wire bytes out.

The grpcio service (adapters/identity_service.py) and the simulator's control plane (sim/identity_host.py)
both answer with this: decode the ``CertifyRequest`` (INVALID_ARGUMENT when malformed), check the identity and
the CSR before any token is looked at (garbage never costs a TokenReview), ask the verifier, then issue. The
serial is drawn only for a request that gets a certificate, so a seeded simulator draws the same sequence
whatever the refusals. Raises ``CertifyError``; its kind says which gRPC status the caller answers with.
"""

from __future__ import annotations

from collections.abc import Callable

from tether.core.grpc_codes import GrpcStatus
from tether.core.identity.ca import IssuedCertificate, Issuer, certify, check_request
from tether.core.identity.errors import CertifyError, CertifyErrorKind, Problem
from tether.core.identity.tokens import TokenVerifier
from tether.core.identity.wire import (
    CertifyResponse,
    Timestamp,
    WireError,
    decode_certify_request,
    encode_certify_response,
)

# The gRPC status each refusal is answered with: what the caller can do about it (errors.py).
CERTIFY_STATUS: dict[CertifyErrorKind, GrpcStatus] = {
    CertifyErrorKind.INVALID_REQUEST: GrpcStatus.INVALID_ARGUMENT,
    CertifyErrorKind.INVALID_TOKEN: GrpcStatus.UNAUTHENTICATED,
    CertifyErrorKind.IDENTITY_MISMATCH: GrpcStatus.FAILED_PRECONDITION,
    CertifyErrorKind.NOT_READY: GrpcStatus.UNAVAILABLE,
}


def answer_certify(
    request: bytes,
    *,
    issuer: Issuer,
    verifier: TokenVerifier,
    wall_time_s: float,
    serial: Callable[[], int],
    leaf_validity_s: int,
) -> tuple[IssuedCertificate, bytes]:
    """The certificate issued for ``request`` and the encoded ``CertifyResponse`` that carries it."""
    try:
        message = decode_certify_request(request)
    except WireError as error:
        raise CertifyError(Problem.MALFORMED_MESSAGE, f"the CertifyRequest message is malformed: {error}") from None
    checked = check_request(identity=message.identity, csr=message.certificate_signing_request, mesh=issuer.mesh)
    verdict = verifier.verify(message.token, wall_time_s)
    issued = certify(
        checked, verdict, issuer, wall_time_s=wall_time_s, serial=serial(), leaf_validity_s=leaf_validity_s
    )
    response = CertifyResponse(
        leaf_certificate=issued.leaf_der,
        intermediate_certificates=issued.intermediates_der,
        valid_until=Timestamp(seconds=issued.not_after_s),
    )
    return issued, encode_certify_response(response)
