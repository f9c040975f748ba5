"""The opaque transport header between meshed proxies (``transport.l5d.io/v1``), encoded and decoded.

When an outbound proxy tunnels opaque TCP to a meshed peer it connects to the peer's inbound port (4143)
rather than the application's port, and first writes this header naming the port the connection was
really for, so the inbound proxy knows where to forward it. Wire format, as Linkerd's proxies use it:

    "transport.l5d.io/v1\\r\\n\\r\\n"  then a 4-byte big-endian length  then a protobuf message
    Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3; }
    SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; } }   (both kinds are empty messages)

The protobuf is written and read by hand: three fields do not justify a code generator, and the decoder
skips fields it does not know, as protobuf requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREFACE = b"transport.l5d.io/v1\r\n\r\n"
MAX_HEADER_BYTES = 1024 - len(PREFACE) - 4  # the header must fit in what detection reads
SESSION_PROTOCOLS = {"http1": 1, "http2": 2}


class TransportHeaderError(ValueError):
    """A connection started with the preface but the header after it is invalid."""


@dataclass(frozen=True, slots=True)
class TransportHeader:
    port: int
    name: str = ""
    session_protocol: str | None = None  # "http1", "http2", or None for opaque

    def encode(self) -> bytes:
        assert 0 < self.port <= 65535, self.port
        message = b"\x08" + _varint(self.port)
        if self.name:
            name = self.name.encode()
            message += b"\x12" + _varint(len(name)) + name
        if self.session_protocol is not None:
            inner = bytes([SESSION_PROTOCOLS[self.session_protocol] << 3 | 2, 0])
            message += b"\x1a" + _varint(len(inner)) + inner
        return PREFACE + struct.pack("!I", len(message)) + message


def parse(data: bytes) -> tuple[TransportHeader, int] | None:
    """The header at the start of ``data`` and the bytes it took, or None if more bytes are needed.

    The caller has already seen that ``data`` starts with (a prefix of) the preface.
    """
    if len(data) < len(PREFACE) + 4:
        return None
    if not data.startswith(PREFACE):
        raise TransportHeaderError("not a transport header preface")
    (length,) = struct.unpack("!I", data[len(PREFACE) : len(PREFACE) + 4])
    if length > MAX_HEADER_BYTES:
        raise TransportHeaderError(f"a {length}-byte header is larger than {MAX_HEADER_BYTES} bytes")
    start = len(PREFACE) + 4
    if len(data) < start + length:
        return None
    return _decode(data[start : start + length]), start + length


def _decode(message: bytes) -> TransportHeader:
    port, name, protocol = 0, "", None
    position = 0
    while position < len(message):
        key, position = _read_varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _read_varint(message, position)
            if field == 1:
                port = value
        elif wire_type == 2:
            size, position = _read_varint(message, position)
            chunk = message[position : position + size]
            if len(chunk) != size:
                raise TransportHeaderError("a field runs past the end of the header")
            position += size
            if field == 2:
                name = chunk.decode("utf-8", "replace")
            elif field == 3 and chunk:
                kind = chunk[0] >> 3
                protocol = {1: "http1", 2: "http2"}.get(kind)
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise TransportHeaderError(f"unsupported protobuf wire type {wire_type}")
    if not 0 < port <= 65535:
        raise TransportHeaderError(f"invalid target port {port}")
    return TransportHeader(port, name, protocol)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise TransportHeaderError("a varint runs past the end of the header")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
