"""HTTP/2 frames (RFC 9113 section 4 and 6): the reader that cuts bytes into frames, and the writers.

Theory of operation
-------------------
``FrameReader`` holds the bytes of one connection's inbound direction. ``feed`` appends what arrived (the
server side first checks and strips the client's connection preface, byte by byte as it arrives, so a
peer that is not speaking HTTP/2 is refused at its first wrong byte). ``next_frame`` returns one complete
frame at a time as a ``Frame`` tuple (type, flags, stream id, payload), or ``None`` while a frame is still
incomplete. A frame is refused as soon as its 9-byte header is in: a length over ``max_frame_size``
(FRAME_SIZE_ERROR, before its payload is buffered, so a peer cannot make the reader hold 16 MiB) and a
frame on the wrong kind of stream, connection-level or stream-level (PROTOCOL_ERROR).

Header blocks are assembled here: a HEADERS or PUSH_PROMISE without END_HEADERS is held, the CONTINUATION
frames that follow are appended to it (any other frame in between is a PROTOCOL_ERROR, section 6.10), and
the block comes out as one HEADERS frame whose payload is the block fragment, padding and priority
already removed, with the priority fields (if any) in ``priority``. At most ``CONTINUATION_FRAMES_MAX``
CONTINUATION frames make one block (the "CONTINUATION flood": h2 allows 64, and so do we).

The per-type payload checks (sizes of fixed-length frames, padding, SETTINGS length multiple of 6, the
WINDOW_UPDATE increment) are in ``parse_*`` helpers; each raises ``FrameError`` with the RFC's error code
for a connection error. Unknown frame types pass through untouched (section 4.1: they are ignored by the
connection, which reports them). Writers are plain functions that return bytes.

Errors follow h2 (4.x) wherever the RFC leaves a choice, because tests/core/test_h2wire_differential.py
compares the two; where h2 departs from the RFC and the departure hurts, the connection (h2conn.py) says so.
"""

from __future__ import annotations

from typing import NamedTuple

from h2.errors import ErrorCodes

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

DEFAULT_MAX_FRAME_SIZE = 16_384
CONTINUATION_FRAMES_MAX = 64  # h2's CONTINUATION_BACKLOG: a header block in more frames is a flood
WINDOW_MAX = 2**31 - 1

# Section 6: which frames must name a stream, and which must not (WINDOW_UPDATE and unknown ones may).
_ON_STREAM = frozenset({DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION})
_ON_CONNECTION = frozenset({SETTINGS, PING, GOAWAY})


class FrameError(Exception):
    """The peer sent a frame that breaks the framing layer: a connection error with ``code``."""

    def __init__(self, message: str, code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class FrameTooLong(FrameError):
    """A frame header announced more than the frame size we advertised (FRAME_SIZE_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCodes.FRAME_SIZE_ERROR)


class Priority(NamedTuple):
    depends_on: int
    exclusive: bool
    weight: int  # as on the wire, 0-255 (the RFC's weight minus one)


class Frame(NamedTuple):
    kind: int
    flags: int
    stream_id: int
    payload: bytes
    priority: Priority | None = None  # HEADERS with the PRIORITY flag only
    padded_length: int = 0  # DATA: the whole payload length, what flow control counts


class FrameReader:
    def __init__(self, *, server: bool) -> None:
        self._preface = PREFACE if server else b""
        self._buffer = bytearray()
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self._block: list[Frame] = []  # a header block waiting for its CONTINUATION frames

    def feed(self, data: bytes) -> None:
        if self._preface:
            take = min(len(self._preface), len(data))
            if data[:take] != self._preface[:take]:
                raise FrameError("Invalid HTTP/2 preamble.")
            self._preface = self._preface[take:]
            data = data[take:]
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame (a header block counts as one), or None until more bytes arrive."""
        while True:
            buffer = self._buffer
            if len(buffer) < 9:
                return None
            length = int.from_bytes(buffer[:3], "big")
            kind = buffer[3]
            stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            if kind in _ON_STREAM and not stream_id:
                raise FrameError(f"frame type {kind} must name a stream")
            if kind in _ON_CONNECTION and stream_id:
                raise FrameError(f"frame type {kind} must be on stream 0")
            if length > self.max_frame_size:
                raise FrameTooLong(f"a {length}-byte frame exceeds the {self.max_frame_size}-byte limit")
            if len(buffer) < 9 + length:
                return None
            flags = buffer[4]
            payload = bytes(buffer[9 : 9 + length])
            del buffer[: 9 + length]
            if not self._block and not flags & FLAG_PADDED:  # the common frames, built once
                if kind == DATA:
                    return Frame(kind, flags, stream_id, payload, None, length)
                if kind == HEADERS and flags & (FLAG_END_HEADERS | FLAG_PRIORITY) == FLAG_END_HEADERS:
                    return Frame(kind, flags, stream_id, payload)
            frame = self._assemble(Frame(kind, flags, stream_id, payload))
            if frame is not None:
                return frame

    def _assemble(self, frame: Frame) -> Frame | None:
        """Header blocks: hold HEADERS or PUSH_PROMISE until END_HEADERS, joining CONTINUATION frames."""
        kind = frame.kind
        if self._block:
            first = self._block[0]
            if kind != CONTINUATION or frame.stream_id != first.stream_id:
                raise FrameError("Invalid frame during header block.")
            self._block.append(frame)
            if len(self._block) > CONTINUATION_FRAMES_MAX:
                raise FrameError("Too many continuation frames received.")
            if not frame.flags & FLAG_END_HEADERS:
                return None
            fragment = b"".join(part.payload for part in self._block)
            self._block = []
            return first._replace(flags=first.flags | FLAG_END_HEADERS, payload=fragment)
        if kind == HEADERS:
            frame = parse_headers(frame)
        elif kind == PUSH_PROMISE:
            frame = parse_push_promise(frame)
        elif kind == DATA:
            return frame._replace(payload=_unpad(frame.flags, frame.payload), padded_length=len(frame.payload))
        if kind in (HEADERS, PUSH_PROMISE) and not frame.flags & FLAG_END_HEADERS:
            self._block.append(frame)
            return None
        return frame


def _unpad(flags: int, payload: bytes) -> bytes:
    """Section 6.1: the Pad Length byte and the padding after the content."""
    if not flags & FLAG_PADDED:
        return payload
    if not payload:
        raise FrameError("padded frame without a Pad Length", ErrorCodes.FRAME_SIZE_ERROR)
    pad = payload[0]
    if pad > len(payload) - 1:
        raise FrameError("Received frame with invalid padding.")
    return payload[1 : len(payload) - pad]


def parse_headers(frame: Frame) -> Frame:
    """Section 6.2. As hyperframe does, padding that leaves no room for the fragment is an error, and a
    fragment cut short by padding after the priority fields is empty."""
    payload = frame.payload
    pad = 0
    if frame.flags & FLAG_PADDED:
        if not payload:
            raise FrameError("padded frame without a Pad Length", ErrorCodes.FRAME_SIZE_ERROR)
        pad = payload[0]
        payload = payload[1:]
        if pad and pad >= len(payload):
            raise FrameError("Received frame with invalid padding.")
    priority = None
    start = 0
    if frame.flags & FLAG_PRIORITY:
        if len(payload) < 5:
            raise FrameError("HEADERS too short for its priority", ErrorCodes.FRAME_SIZE_ERROR)
        dependency = int.from_bytes(payload[:4], "big")
        priority = Priority(dependency & 0x7FFFFFFF, bool(dependency >> 31), payload[4])
        start = 5
    return frame._replace(payload=payload[start : len(payload) - pad], priority=priority)


def parse_push_promise(frame: Frame) -> Frame:
    """Section 6.6 (the connection refuses every push; the frame is still checked first, as h2 does)."""
    padded = frame.flags & FLAG_PADDED
    payload = frame.payload
    if padded and not payload or len(payload) < 4 + (1 if padded else 0):
        raise FrameError("PUSH_PROMISE too short", ErrorCodes.FRAME_SIZE_ERROR)
    promised = int.from_bytes(payload[1 if padded else 0 :][:4], "big")
    if not promised or promised % 2:
        raise FrameError(f"Invalid PUSH_PROMISE promised stream id: {promised}")
    return frame._replace(payload=_unpad(frame.flags, payload)[4:])


def parse_priority(frame: Frame) -> Priority:
    if len(frame.payload) != 5:
        raise FrameError("PRIORITY must be 5 bytes", ErrorCodes.FRAME_SIZE_ERROR)
    dependency = int.from_bytes(frame.payload[:4], "big")
    return Priority(dependency & 0x7FFFFFFF, bool(dependency >> 31), frame.payload[4])


def parse_rst_stream(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise FrameError("RST_STREAM must be 4 bytes", ErrorCodes.FRAME_SIZE_ERROR)
    return int.from_bytes(frame.payload, "big")


def parse_settings(frame: Frame) -> dict[int, int]:
    """Section 6.5: identifier/value pairs; a repeated identifier keeps its last value (as h2)."""
    payload = frame.payload
    if frame.flags & FLAG_ACK:
        if payload:
            raise FrameError("SETTINGS ACK with a payload", ErrorCodes.FRAME_SIZE_ERROR)
        return {}
    if len(payload) % 6:
        raise FrameError("SETTINGS length not a multiple of 6", ErrorCodes.FRAME_SIZE_ERROR)
    return {
        int.from_bytes(payload[at : at + 2], "big"): int.from_bytes(payload[at + 2 : at + 6], "big")
        for at in range(0, len(payload), 6)
    }


def parse_ping(frame: Frame) -> bytes:
    if len(frame.payload) != 8:
        raise FrameError("PING must be 8 bytes", ErrorCodes.FRAME_SIZE_ERROR)
    return frame.payload


def parse_goaway(frame: Frame) -> tuple[int, int, bytes]:
    payload = frame.payload
    if len(payload) < 8:
        raise FrameError("GOAWAY too short", ErrorCodes.FRAME_SIZE_ERROR)
    last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
    return last, int.from_bytes(payload[4:8], "big"), payload[8:]


def parse_window_update(frame: Frame) -> int:
    if len(frame.payload) != 4:
        raise FrameError("WINDOW_UPDATE must be 4 bytes", ErrorCodes.FRAME_SIZE_ERROR)
    increment = int.from_bytes(frame.payload, "big")
    if not 1 <= increment <= WINDOW_MAX:  # h2 counts the reserved bit in; the RFC would ignore it
        raise FrameError("WINDOW_UPDATE increment must be between 1 and 2^31-1")
    return increment


# ---------------------------------------------------------------- writers


def frame_bytes(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big") + payload


def settings_bytes(settings: dict[int, int], *, ack: bool = False) -> bytes:
    payload = b"".join(code.to_bytes(2, "big") + value.to_bytes(4, "big") for code, value in settings.items())
    return frame_bytes(SETTINGS, FLAG_ACK if ack else 0, 0, payload)


def window_update_bytes(stream_id: int, increment: int) -> bytes:
    return frame_bytes(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def rst_stream_bytes(stream_id: int, code: int) -> bytes:
    return frame_bytes(RST_STREAM, 0, stream_id, int(code).to_bytes(4, "big"))


def goaway_bytes(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame_bytes(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + int(code).to_bytes(4, "big") + debug)


def headers_bytes(stream_id: int, block: bytes, *, end_stream: bool, max_frame_size: int) -> bytes:
    """One HEADERS frame, and CONTINUATION frames for a block longer than ``max_frame_size``."""
    end = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame_size:
        return frame_bytes(HEADERS, end | FLAG_END_HEADERS, stream_id, block)
    pieces = [block[at : at + max_frame_size] for at in range(0, len(block), max_frame_size)]
    out = [frame_bytes(HEADERS, end, stream_id, pieces[0])]
    for piece in pieces[1:-1]:
        out.append(frame_bytes(CONTINUATION, 0, stream_id, piece))
    out.append(frame_bytes(CONTINUATION, FLAG_END_HEADERS, stream_id, pieces[-1]))
    return b"".join(out)
