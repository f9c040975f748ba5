"""The identity API's three protobuf messages, encoded and decoded by hand (linkerd2-proxy-api's identity.proto).

    message CertifyRequest  { string identity = 1; bytes token = 2; bytes certificate_signing_request = 3; }
    message CertifyResponse { bytes leaf_certificate = 1; repeated bytes intermediate_certificates = 2;
                              google.protobuf.Timestamp valid_until = 3; }
    message Timestamp       { int64 seconds = 1; int32 nanos = 2; }

Three messages do not justify generated code and a protobuf runtime in the core; the grpcio server and
the proxy's own identity client (a gRPC client on the core's HTTP/2 machine) share these functions.

Decoding follows the protobuf rules a generated parser applies: fields in any order, the last value of
a singular field wins, a repeated message field merges, unknown fields (and known fields with another
wire type, which protobuf also treats as unknown) are skipped, including groups. Strings must be UTF-8
(proto3). Anything else — a truncated varint or length, a length past the end, field number 0, an end
group without its start, nesting deeper than ``GROUP_DEPTH_MAX`` — raises ``WireError``.
Encoding writes fields in number order and omits proto3 defaults (empty strings and bytes, zero).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MESSAGE_BYTES_MAX = 1 << 20  # the whole request; gRPC's default receive limit is 4 MiB, a CSR is ~300 bytes
GROUP_DEPTH_MAX = 32  # unknown groups nest; the protobuf runtimes stop recursing at 100
VARINT_BYTES_MAX = 10
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LENGTH, _WIRE_START_GROUP, _WIRE_END_GROUP, _WIRE_FIXED32 = 0, 1, 2, 3, 4, 5
_U64 = 1 << 64


class WireError(ValueError):
    """Bytes that are not a valid encoding of the message; the message names the offset and the problem."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timestamp:
    """google.protobuf.Timestamp: seconds since the Unix epoch and a nanosecond fraction."""

    seconds: int = 0
    nanos: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CertifyRequest:
    """What a proxy sends: the identity it wants, the token proving it, and a CSR (DER, or PEM here)."""

    identity: str = ""
    token: bytes = b""
    certificate_signing_request: bytes = b""

    def __repr__(self) -> str:
        return (
            f"CertifyRequest(identity={self.identity!r}, token=<{len(self.token)} bytes>, "
            f"certificate_signing_request=<{len(self.certificate_signing_request)} bytes>)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CertifyResponse:
    """What the identity service answers: the leaf (DER), the intermediates (DER), and the leaf's expiry."""

    leaf_certificate: bytes = b""
    intermediate_certificates: tuple[bytes, ...] = ()
    valid_until: Timestamp | None = field(default=None)


# Encoding


def encode_certify_request(message: CertifyRequest) -> bytes:
    out = bytearray()
    _put_bytes(out, 1, message.identity.encode("utf-8"))
    _put_bytes(out, 2, message.token)
    _put_bytes(out, 3, message.certificate_signing_request)
    return bytes(out)


def encode_certify_response(message: CertifyResponse) -> bytes:
    out = bytearray()
    _put_bytes(out, 1, message.leaf_certificate)
    for certificate in message.intermediate_certificates:
        _put_bytes(out, 2, certificate, always=True)  # repeated elements are written even when empty
    if message.valid_until is not None:
        _put_bytes(out, 3, encode_timestamp(message.valid_until), always=True)
    return bytes(out)


def encode_timestamp(message: Timestamp) -> bytes:
    out = bytearray()
    if message.seconds:
        _put_varint(out, 1 << 3 | _WIRE_VARINT)
        _put_varint(out, message.seconds % _U64)  # negative int64: ten-byte two's complement
    if message.nanos:
        _put_varint(out, 2 << 3 | _WIRE_VARINT)
        _put_varint(out, message.nanos % _U64)  # int32 is sign-extended to 64 bits on the wire
    return bytes(out)


def _put_bytes(out: bytearray, number: int, value: bytes, *, always: bool = False) -> None:
    if value or always:
        _put_varint(out, number << 3 | _WIRE_LENGTH)
        _put_varint(out, len(value))
        out += value


def _put_varint(out: bytearray, value: int) -> None:
    assert 0 <= value < _U64, value
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


# Decoding


def decode_certify_request(data: bytes) -> CertifyRequest:
    identity, token, csr = "", b"", b""

    def on_field(number: int, wire_type: int, value: int | bytes) -> None:
        nonlocal identity, token, csr
        if wire_type != _WIRE_LENGTH:
            return  # a known number with another wire type is an unknown field, as in protobuf
        assert isinstance(value, bytes)
        if number == 1:
            identity = _utf8(value, "CertifyRequest.identity")  # every occurrence must be UTF-8, not just the last
        elif number == 2:
            token = value
        elif number == 3:
            csr = value

    _walk(data, on_field)
    return CertifyRequest(identity=identity, token=token, certificate_signing_request=csr)


def decode_certify_response(data: bytes) -> CertifyResponse:
    leaf = b""
    intermediates: list[bytes] = []
    valid_until: Timestamp | None = None

    def on_field(number: int, wire_type: int, value: int | bytes) -> None:
        nonlocal leaf, valid_until
        if wire_type != _WIRE_LENGTH:
            return
        assert isinstance(value, bytes)
        if number == 1:
            leaf = value
        elif number == 2:
            intermediates.append(value)
        elif number == 3:
            valid_until = decode_timestamp(value, merge_into=valid_until)

    _walk(data, on_field)
    return CertifyResponse(
        leaf_certificate=leaf, intermediate_certificates=tuple(intermediates), valid_until=valid_until
    )


def decode_timestamp(data: bytes, *, merge_into: Timestamp | None = None) -> Timestamp:
    seconds = merge_into.seconds if merge_into else 0
    nanos = merge_into.nanos if merge_into else 0

    def on_field(number: int, wire_type: int, value: int | bytes) -> None:
        nonlocal seconds, nanos
        if wire_type != _WIRE_VARINT:
            return
        assert isinstance(value, int)
        if number == 1:
            seconds = _signed(value, 64)
        elif number == 2:
            nanos = _signed(value & 0xFFFFFFFF, 32)  # int32 keeps the low 32 bits of the varint

    _walk(data, on_field)
    return Timestamp(seconds=seconds, nanos=nanos)


def _walk(data: bytes, on_field: Callable[[int, int, int | bytes], None]) -> None:
    """Call ``on_field(number, wire_type, value)`` for each top-level field; groups are skipped whole."""
    if len(data) > MESSAGE_BYTES_MAX:
        raise WireError(f"message is {len(data)} bytes, more than {MESSAGE_BYTES_MAX}")
    position = 0
    while position < len(data):
        number, wire_type, value, position = _read_field(data, position)
        if wire_type == _WIRE_START_GROUP:
            position = _skip_group(data, position, number, depth=1)
        elif wire_type == _WIRE_END_GROUP:
            raise WireError(f"end of group {number} at offset {position} without its start")
        else:
            on_field(number, wire_type, value)


def _read_field(data: bytes, position: int) -> tuple[int, int, int | bytes, int]:
    start = position
    tag, position = _read_varint(data, position)
    number, wire_type = tag >> 3, tag & 7
    if number == 0 or number >= 1 << 29:
        raise WireError(f"field number {number} at offset {start} is outside 1 .. 2**29-1")
    if wire_type == _WIRE_VARINT:
        value, position = _read_varint(data, position)
        return number, wire_type, value, position
    if wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
        size = 8 if wire_type == _WIRE_FIXED64 else 4
        if position + size > len(data):
            raise WireError(f"field {number} at offset {start}: {size}-byte value cut short")
        return number, wire_type, int.from_bytes(data[position : position + size], "little"), position + size
    if wire_type == _WIRE_LENGTH:
        length, position = _read_varint(data, position)
        if length > len(data) - position:
            raise WireError(f"field {number} at offset {start}: length {length} runs past the end")
        return number, wire_type, data[position : position + length], position + length
    if wire_type in (_WIRE_START_GROUP, _WIRE_END_GROUP):
        return number, wire_type, 0, position
    raise WireError(f"field {number} at offset {start}: wire type {wire_type} does not exist")


def _skip_group(data: bytes, position: int, group_number: int, *, depth: int) -> int:
    if depth > GROUP_DEPTH_MAX:
        raise WireError(f"groups nest deeper than {GROUP_DEPTH_MAX} at offset {position}")
    while position < len(data):
        number, wire_type, _, position = _read_field(data, position)
        if wire_type == _WIRE_END_GROUP:
            if number != group_number:
                raise WireError(f"group {group_number} ended by end-group {number} at offset {position}")
            return position
        if wire_type == _WIRE_START_GROUP:
            position = _skip_group(data, position, number, depth=depth + 1)
    raise WireError(f"group {group_number} is not closed before the end of the message")


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = 0
    for index in range(VARINT_BYTES_MAX):
        if position + index >= len(data):
            raise WireError(f"varint at offset {position} is cut short")
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value % _U64, position + index + 1  # bits past 64 are dropped, as protobuf does
    raise WireError(f"varint at offset {position} is longer than {VARINT_BYTES_MAX} bytes")


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise WireError(f"{name} is not UTF-8 ({error.reason} at byte {error.start})") from None
