"""The hand-written identity messages against the protobuf runtime (an independent implementation, built
from a descriptor at test time): the same bytes out, the same values in, and the same verdict on garbage."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.core.identity.wire import (
    MESSAGE_BYTES_MAX,
    CertifyRequest,
    CertifyResponse,
    Timestamp,
    WireError,
    decode_certify_request,
    decode_certify_response,
    decode_timestamp,
    encode_certify_request,
    encode_certify_response,
    encode_timestamp,
)

try:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
    from google.protobuf.message import DecodeError
except ImportError:  # the round trips and the garbage test below still run
    descriptor_pb2 = None
needs_protobuf = pytest.mark.skipif(
    descriptor_pb2 is None, reason="the protobuf runtime (pip install protobuf) checks the codec independently"
)


def _message_classes() -> tuple[Any, Any]:
    if descriptor_pb2 is None:
        return None, None

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED
    proto = descriptor_pb2.FileDescriptorProto(
        name="tether_test_identity.proto",
        package="io.linkerd.proxy.identity",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    request = proto.message_type.add(name="CertifyRequest")
    request.field.add(name="identity", number=1, type=field.TYPE_STRING, label=optional)
    request.field.add(name="token", number=2, type=field.TYPE_BYTES, label=optional)
    request.field.add(name="certificate_signing_request", number=3, type=field.TYPE_BYTES, label=optional)
    response = proto.message_type.add(name="CertifyResponse")
    response.field.add(name="leaf_certificate", number=1, type=field.TYPE_BYTES, label=optional)
    response.field.add(name="intermediate_certificates", number=2, type=field.TYPE_BYTES, label=repeated)
    response.field.add(
        name="valid_until",
        number=3,
        type=field.TYPE_MESSAGE,
        label=optional,
        type_name=".google.protobuf.Timestamp",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    find = pool.FindMessageTypeByName
    return (
        message_factory.GetMessageClass(find("io.linkerd.proxy.identity.CertifyRequest")),
        message_factory.GetMessageClass(find("io.linkerd.proxy.identity.CertifyResponse")),
    )


PbRequest, PbResponse = _message_classes()
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
timestamps = st.builds(Timestamp, seconds=INT64, nanos=INT32)
requests = st.builds(
    CertifyRequest,
    identity=st.text(max_size=40),
    token=st.binary(max_size=40),
    certificate_signing_request=st.binary(max_size=40),
)
responses = st.builds(
    CertifyResponse,
    leaf_certificate=st.binary(max_size=40),
    intermediate_certificates=st.lists(st.binary(max_size=20), max_size=3).map(tuple),
    valid_until=st.none() | timestamps,
)


def pb_request(message: CertifyRequest) -> Any:
    return PbRequest(
        identity=message.identity, token=message.token, certificate_signing_request=message.certificate_signing_request
    )


def pb_response(message: CertifyResponse) -> Any:
    converted = PbResponse(
        leaf_certificate=message.leaf_certificate, intermediate_certificates=list(message.intermediate_certificates)
    )
    if message.valid_until is not None:
        converted.valid_until.seconds = message.valid_until.seconds
        converted.valid_until.nanos = message.valid_until.nanos
    return converted


@settings(max_examples=200, deadline=None)
@given(message=requests)
def test_wire_request_round_trips(message: CertifyRequest) -> None:
    assert decode_certify_request(encode_certify_request(message)) == message


@needs_protobuf
@settings(max_examples=100, deadline=None)
@given(message=requests)
def test_wire_request_encodes_like_protobuf(message: CertifyRequest) -> None:
    assert encode_certify_request(message) == pb_request(message).SerializeToString(deterministic=True)


@settings(max_examples=200, deadline=None)
@given(message=responses)
@example(message=CertifyResponse(intermediate_certificates=(b"",), valid_until=Timestamp()))
def test_wire_response_round_trips(message: CertifyResponse) -> None:
    assert decode_certify_response(encode_certify_response(message)) == message


@needs_protobuf
@settings(max_examples=100, deadline=None)
@given(message=responses)
@example(message=CertifyResponse(intermediate_certificates=(b"",), valid_until=Timestamp()))
def test_wire_response_encodes_like_protobuf(message: CertifyResponse) -> None:
    assert encode_certify_response(message) == pb_response(message).SerializeToString(deterministic=True)


@settings(max_examples=100, deadline=None)
@given(stamp=timestamps)
def test_wire_timestamp_round_trips(stamp: Timestamp) -> None:
    assert decode_timestamp(encode_timestamp(stamp)) == stamp


# Differential decoding: raw field sequences (unknown numbers, wrong wire types, groups, repeats, bad UTF-8)
# and plain garbage must get the same verdict and the same values from both decoders.


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def raw_fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    # Known numbers and the wire types they use are drawn more often, so most examples carry values.
    number = draw(st.sampled_from([1, 2, 3, 1, 2, 3, 4, 16, 1000]))
    wire_type = draw(st.sampled_from([2, 2, 0, 0, 1, 5] + ([3] if depth < 3 else [])))
    tag = varint(number << 3 | wire_type)
    if wire_type == 0:
        return tag + varint(draw(st.integers(0, 2**64 - 1)))
    if wire_type == 1:
        return tag + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return tag + draw(st.binary(min_size=4, max_size=4))
    if wire_type == 3:
        inner = b"".join(draw(st.lists(raw_fields(depth + 1), max_size=3)))
        return tag + inner + varint(number << 3 | 4)
    payload = draw(
        st.binary(max_size=12)
        | st.text(max_size=6).map(str.encode)
        | st.lists(raw_fields(depth + 1), max_size=3).map(b"".join)
    )
    return tag + varint(len(payload)) + payload


raw_messages = st.lists(raw_fields(), max_size=6).map(b"".join)


def corrupt(data: bytes, position: int, mask: int) -> bytes:
    if not data:
        return data
    changed = bytearray(data)
    changed[position % len(data)] ^= mask
    return bytes(changed)


hostile_bytes = (
    raw_messages
    | raw_messages.filter(bool)  # twice: well-formed messages with values are the interesting case
    | st.binary(max_size=40)
    | st.builds(corrupt, raw_messages, st.integers(0, 200), st.integers(1, 255))
    | st.builds(lambda data, cut: data[:cut], raw_messages, st.integers(0, 60))
)


def ours(decode: Any, data: bytes) -> Any:
    try:
        return decode(data)
    except WireError:
        return "error"


def upb_quirk(decode: Any, data: bytes) -> bool:
    """True when we refuse ``data`` for a field number 0 (which the protobuf encoding reserves), the one
    place where protobuf's upb runtime is laxer: inside a group it skips a tag of 0 written as a multi-byte
    varint (b"\\x0b\\x80\\x00\\x00\\x0c"), while it refuses a one-byte 0 tag anywhere. We refuse both."""
    try:
        decode(data)
    except WireError as error:
        return "field number 0 " in str(error)
    return False


def theirs(message_class: Any, data: bytes) -> Any:
    message = message_class()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return "error"
    return message


@settings(max_examples=100, deadline=None)
@given(data=hostile_bytes)
def test_wire_decoders_raise_only_wire_error(data: bytes) -> None:
    for decode in (decode_certify_request, decode_certify_response, decode_timestamp):
        ours(decode, data)  # anything but a result or WireError propagates and fails the test


@needs_protobuf
@settings(max_examples=200, deadline=None)
@given(data=hostile_bytes)
@example(data=b"\x0a\x01\xff\x0a\x01a")  # bad UTF-8 overwritten by good: still an error
@example(data=b"\x0b\x0c")  # an empty group
@example(data=b"\x0c")  # an end group alone
@example(data=b"\x00")  # field number 0
@example(data=b"\x08" + b"\xff" * 9 + b"\x7f")  # a ten-byte varint with bits past 64
@example(data=b"\x1a\x02\x08\x05\x1a\x02\x10\x07")  # two partial timestamps merge
@example(data=b"\x08\x00\x0b\x80\x00\x00\x0c")  # a multi-byte tag 0 in a group: upb skips it (upb_quirk)
def test_wire_decoders_agree_with_protobuf(data: bytes) -> None:
    check_request_decoder(data)
    check_response_decoder(data)


def check_request_decoder(data: bytes) -> None:
    mine, reference = ours(decode_certify_request, data), theirs(PbRequest, data)
    if reference == "error":
        assert mine == "error", mine
        return
    if upb_quirk(decode_certify_request, data):
        return
    assert mine != "error", data
    assert mine == CertifyRequest(
        identity=reference.identity,
        token=reference.token,
        certificate_signing_request=reference.certificate_signing_request,
    )


def check_response_decoder(data: bytes) -> None:
    mine, reference = ours(decode_certify_response, data), theirs(PbResponse, data)
    if reference == "error":
        assert mine == "error", mine
        return
    if upb_quirk(decode_certify_response, data):
        return
    assert mine != "error", data
    stamp = reference.valid_until
    expected_stamp = Timestamp(seconds=stamp.seconds, nanos=stamp.nanos) if reference.HasField("valid_until") else None
    assert mine == CertifyResponse(
        leaf_certificate=reference.leaf_certificate,
        intermediate_certificates=tuple(reference.intermediate_certificates),
        valid_until=expected_stamp,
    )


def test_wire_refuses_messages_over_the_limit() -> None:
    with pytest.raises(WireError, match="more than"):
        decode_certify_request(b"\x12" + varint(MESSAGE_BYTES_MAX) + b"\0" * MESSAGE_BYTES_MAX)


def test_wire_errors_name_the_offset() -> None:
    with pytest.raises(WireError, match="offset 0"):
        decode_certify_request(b"\x0a\x05ab")
