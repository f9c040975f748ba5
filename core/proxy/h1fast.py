"""HTTP/1.1 with h11's interface and a fast path for the common case.

Theory of operation
-------------------
h11 is exact and strict, and it costs about 140 µs per proxied request: its state machine runs for every
event, and every head is validated field by field. Nearly all traffic is the same few shapes: keep-alive
HTTP/1.1, a body framed by Content-Length or chunked encoding, no upgrade, no 100-continue. ``H1Connection``
handles those shapes itself and hands everything else to a real ``h11.Connection``, so the rest of the
proxy keeps one interface (``receive_data``, ``next_event``, ``send``, ``our_state``, ``their_state``,
``start_next_cycle``, ``trailing_data``) and h11's events.

The rule that keeps the two exact: the fast path only ever *accepts* what h11 would accept and produce the
same events, bytes and states for it; when a head is anything it does not recognise (another version, an
upgrade, HEAD, Expect, an odd header line, a leading blank line), it does not judge it. It builds an h11
connection, replays the current request/response cycle into it (what was sent, and what was received, with
body bytes replaced by placeholders of the same length, which h11 only counts), and delegates from then on.
A differential Hypothesis test (tests/core/test_h1fast.py) runs both over arbitrary and hostile byte
streams, split at arbitrary points, and compares events, bytes, states and errors.

Inside a body the fast path decides alone: a Content-Length or chunked body that breaks its framing is an
error here too, with our own message (the test compares that both fail, not the wording).
"""

from __future__ import annotations

import re
from typing import Any

import h11

# RFC 9110 section 5.6.2 (token) and 5.5 (field-value, here without obs-text: such a head takes the slow path).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[\x21-\x7e](?:[ \t]*[\x21-\x7e])*)?)[ \t]*")
_REQUEST_LINE = re.compile(rb"([A-Z]+) ([\x21-\x7e]+) HTTP/1\.1")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: ([\t\x20-\x7e]*))?")
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNKED = -1  # body framing: chunked, else the bytes a Content-Length body still has to go
_SLOW_METHODS = frozenset({b"HEAD", b"CONNECT"})  # both change how the response is framed

Headers = list[tuple[bytes, bytes]]
_FullItems = list[tuple[bytes, bytes, bytes]]  # (name as sent, lower-case name, value): h11's own header rows
_set = object.__setattr__


def request_event(method: bytes, target: bytes, items: _FullItems) -> h11.Request:
    """An ``h11.Request`` from parts already checked (by this module's parser or by h11 upstream of us).

    h11's constructor validates again and walks the headers through the ``Sequence`` protocol even for parsed
    events, several µs per head; the differential test holds these events equal to h11's."""
    event = object.__new__(h11.Request)
    _set(event, "method", method)
    _set(event, "target", target)
    _set(event, "headers", h11._headers.Headers(items))
    _set(event, "http_version", b"1.1")
    return event


def response_event(status: int, reason: bytes, items: _FullItems) -> h11.Response:
    """An ``h11.Response`` from checked parts; see ``request_event``."""
    event = object.__new__(h11.Response)
    _set(event, "status_code", status)
    _set(event, "reason", reason)
    _set(event, "headers", h11._headers.Headers(items))
    _set(event, "http_version", b"1.1")
    return event


class _Head:
    """What the fast path needs to know of a parsed head: its framing, and whether it keeps the connection."""

    __slots__ = ("headers", "framing", "keep_alive")

    def __init__(self, headers: _FullItems, framing: int, keep_alive: bool) -> None:
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive


def _parse_fields(lines: list[bytes], *, request: bool) -> _Head | None:
    """Header lines -> a _Head, or None when anything is out of the common case (the slow path decides)."""
    headers: _FullItems = []
    content_length: bytes | None = None
    chunked = False
    keep_alive = True
    hosts = 0
    for line in lines:
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            return None
        raw_name, value = match.groups()
        name = raw_name.lower()
        if name == b"content-length":
            if content_length is not None or _DIGITS.fullmatch(value) is None:
                return None
            content_length = value
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                return None
            chunked = True
            value = b"chunked"  # h11 keeps this header's value in lower case
        elif name == b"connection":
            tokens = {token.strip().lower() for token in value.split(b",")}
            if not tokens <= {b"keep-alive", b"close"} or (request and b"close" in tokens):
                return None
            keep_alive = keep_alive and b"close" not in tokens
        elif name in (b"upgrade", b"expect"):
            return None
        elif name == b"host":
            hosts += 1
        headers.append((raw_name, name, value))
    if request and hosts != 1:
        return None
    if chunked:
        if content_length is not None or request:
            return None  # both framings at once is for h11 to refuse; chunked uploads are rare
        return _Head(headers, _CHUNKED, keep_alive)
    if content_length is None:
        if not request:
            return None  # a body delimited by the connection's close
        return _Head(headers, 0, keep_alive)
    return _Head(headers, int(content_length), keep_alive)


def _outgoing_framing(headers: Any, *, request: bool) -> tuple[int, bool, bool] | None:
    """(framing, keep-alive, whether h11 would add Transfer-Encoding: chunked) of a head we send, or None
    when it is not a common-case head. Our heads were validated on the way in, so only names matter here."""
    content_length = -2
    chunked = False
    keep_alive = True
    hosts = 0
    for name, value in headers:
        if name == b"content-length":
            if content_length != -2 or _DIGITS.fullmatch(value) is None:
                return None
            content_length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value != b"chunked" or request:
                return None
            chunked = True
        elif name == b"connection":
            tokens = {token.strip() for token in value.split(b",")}
            if not tokens <= {b"keep-alive", b"close"} or (request and b"close" in tokens):
                return None
            keep_alive = keep_alive and b"close" not in tokens
        elif name == b"upgrade" or name == b"expect":
            return None
        elif name == b"host":
            hosts += 1
    if request:
        return (max(content_length, 0), True, False) if hosts == 1 else None
    if chunked:
        return None if content_length != -2 else (_CHUNKED, keep_alive, True)
    if content_length == -2:
        return _CHUNKED, keep_alive, True  # h11 frames a body of unknown length with chunked encoding
    return content_length, keep_alive, False


def _send_headers(out: list[bytes], headers: Any) -> None:
    """Header lines as h11 writes them: Host first, then the rest in order, then the blank line."""
    raw = headers._full_items if hasattr(headers, "_full_items") else [(n, n.lower(), v) for n, v in headers]
    for raw_name, name, value in raw:
        if name == b"host":
            out.append(b"%s: %s\r\n" % (raw_name, value))
    for raw_name, name, value in raw:
        if name != b"host":
            out.append(b"%s: %s\r\n" % (raw_name, value))
    out.append(b"\r\n")


class H1Connection:
    """``h11.Connection(role)`` with a fast path; see the module docstring."""

    def __init__(self, our_role: type[h11._util.Sentinel], max_incomplete_event_size: int = 16 * 1024) -> None:
        self.our_role = our_role
        self._server = our_role is h11.SERVER
        self._max_incomplete = max_incomplete_event_size
        self._slow: h11.Connection | None = None
        self._buffer = bytearray()
        self._closed = False
        self._our = h11.IDLE
        self._their = h11.IDLE
        self._keep_alive = True
        self._receive_framing = 0
        self._send_framing = 0
        self._reading_trailers = False
        self._chunk_crlf_due = False
        self._chunk_left = 0  # bytes of the current chunk still to come
        # This cycle so far, for a replay into h11: what we sent, the head received, its body bytes received.
        self._sent: list[Any] = []
        self._head_received = b""
        self._body_received = 0
        self._message_received = False

    # ------------------------------------------------------------------ h11's interface

    @property
    def our_state(self) -> type[h11._util.Sentinel]:
        return self._slow.our_state if self._slow is not None else self._our

    @property
    def their_state(self) -> type[h11._util.Sentinel]:
        return self._slow.their_state if self._slow is not None else self._their

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet turned into events (a pipelined request, say)."""
        if self._slow is not None:
            return len(self._slow.trailing_data[0])
        return len(self._buffer)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        if self._slow is not None:
            return self._slow.trailing_data
        return bytes(self._buffer), self._closed

    def receive_data(self, data: bytes) -> None:
        if self._slow is not None:
            self._slow.receive_data(data)
        elif data:
            if self._closed:
                raise RuntimeError("received close, then received more data?")
            self._buffer += data
        else:
            self._closed = True

    def next_event(self) -> Any:
        if self._slow is not None:
            return self._slow.next_event()
        their = self._their
        if their is h11.SEND_BODY:
            return self._read_body()
        if their is h11.DONE and not self._closed:
            return h11.PAUSED if self._buffer else h11.NEED_DATA
        if (their is h11.IDLE and self._server) or (their is h11.SEND_RESPONSE and not self._server):
            return self._read_head()
        # An error, an end of the connection, or a response before any request: rare, and h11's to judge.
        return self._go_slow().next_event()

    def send(self, event: Any) -> bytes:
        if self._slow is not None:
            return self._slow.send(event)
        kind = type(event)
        if kind is h11.Data and self._our is h11.SEND_BODY:
            return self._send_data(event.data)
        if kind is h11.EndOfMessage and self._our is h11.SEND_BODY:
            if event.headers and self._send_framing != _CHUNKED:
                return self._go_slow().send(event)  # h11 refuses trailers on a Content-Length body
            return self._send_end(event)
        if kind is h11.Response and self._server and self._our is h11.SEND_RESPONSE and event.http_version == b"1.1":
            return self._send_head(event, b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason))
        if (
            kind is h11.Request
            and not self._server
            and self._our is h11.IDLE
            and self._their is h11.IDLE
            and event.http_version == b"1.1"
            and event.method not in _SLOW_METHODS
        ):
            return self._send_head(event, b"%s %s HTTP/1.1\r\n" % (event.method, event.target))
        return self._go_slow().send(event)

    def start_next_cycle(self) -> None:
        if self._slow is not None:
            self._slow.start_next_cycle()
            return
        if self._our is not h11.DONE or self._their is not h11.DONE:
            raise h11.LocalProtocolError(f"not in a reusable state. self.states={self._states()}")
        self._our = self._their = h11.IDLE
        self._sent.clear()
        self._head_received = b""
        self._body_received = 0
        self._message_received = False

    # ------------------------------------------------------------------ receiving

    def _read_head(self) -> Any:
        buffer = self._buffer
        if not buffer or self._closed:
            return self._go_slow().next_event() if self._closed else h11.NEED_DATA
        # A request starts with an upper-case method, a response with its version; anything else (a
        # leading blank line, garbage) is for h11 to judge, and so is a head with bare LF line ends.
        if (self._server and not 0x41 <= buffer[0] <= 0x5A) or (not self._server and buffer[:1] != b"H"):
            return self._go_slow().next_event()
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self._max_incomplete or b"\n\n" in buffer or b"\n\r\n" in buffer:
                return self._go_slow().next_event()
            return h11.NEED_DATA
        head = bytes(buffer[:end])
        lines = head.split(b"\r\n")
        event = self._parse_request(lines) if self._server else self._parse_response(lines)
        if event is None:
            return self._go_slow().next_event()
        del buffer[: end + 4]
        self._head_received = head + b"\r\n\r\n"
        return event

    def _parse_request(self, lines: list[bytes]) -> h11.Request | None:
        match = _REQUEST_LINE.fullmatch(lines[0])
        if match is None or b"\n" in lines[0]:
            return None
        method, target = match.groups()
        fields = _parse_fields(lines[1:], request=True)
        if fields is None or method in _SLOW_METHODS:
            return None
        self._start_receiving(fields)
        self._our = h11.SEND_RESPONSE
        return request_event(method, target, fields.headers)

    def _parse_response(self, lines: list[bytes]) -> h11.Response | None:
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            return None
        status = int(match.group(1))
        fields = _parse_fields(lines[1:], request=False)
        if fields is None:
            return None
        if status in (204, 304):
            fields.framing = 0
        self._start_receiving(fields)
        reason = match.group(2) or b""
        return response_event(status, reason, fields.headers)

    def _start_receiving(self, fields: _Head) -> None:
        self._their = h11.SEND_BODY
        self._receive_framing = fields.framing
        self._reading_trailers = False
        self._chunk_crlf_due = False
        self._chunk_left = 0
        if not fields.keep_alive:
            self._disable_keep_alive()

    def _read_body(self) -> Any:
        if self._receive_framing == _CHUNKED:
            return self._read_chunked()
        remaining = self._receive_framing
        if remaining == 0:
            return self._message_complete(h11.EndOfMessage())
        buffer = self._buffer
        if not buffer:
            if self._closed:
                self._fail(f"peer closed connection without sending complete message body ({remaining} bytes short)")
            return h11.NEED_DATA
        data = bytes(buffer[:remaining])
        del buffer[:remaining]
        self._receive_framing = remaining - len(data)
        self._body_received += len(data)
        return h11.Data(data=data)

    def _read_chunked(self) -> Any:
        buffer = self._buffer
        if self._chunk_crlf_due:
            if len(buffer) < 2:
                return self._need_body_bytes(b"\r\n".startswith(bytes(buffer)))
            if buffer[:2] != b"\r\n":
                self._fail("malformed chunk footer")
            del buffer[:2]
            self._chunk_crlf_due = False
        if self._reading_trailers:
            return self._read_trailers()
        if self._chunk_left == 0:
            end = buffer.find(b"\r\n")
            if end < 0:
                return self._need_body_bytes(len(buffer) <= self._max_incomplete)
            match = _CHUNK_HEADER.fullmatch(buffer, 0, end)
            if match is None:
                self._fail("illegal chunk header")
            self._chunk_left = int(match.group(1), 16)  # before the buffer moves under the match
            del buffer[: end + 2]
            if self._chunk_left == 0:
                self._reading_trailers = True
                return self._read_trailers()
        if not buffer:
            return self._need_body_bytes(True)
        data = bytes(buffer[: self._chunk_left])
        del buffer[: len(data)]
        self._chunk_left -= len(data)
        self._body_received += len(data)
        self._chunk_crlf_due = self._chunk_left == 0
        return h11.Data(data=data)

    def _read_trailers(self) -> Any:
        buffer = self._buffer
        for blank in (b"\r\n", b"\n"):
            if buffer[: len(blank)] == blank:
                del buffer[: len(blank)]
                return self._message_complete(h11.EndOfMessage())
        match = _BLANK_LINE.search(buffer)
        if match is None:
            return self._need_body_bytes(len(buffer) <= self._max_incomplete)
        trailers: Headers = []
        for line in bytes(buffer[: match.start()]).split(b"\n"):
            field = _HEADER_LINE.fullmatch(line[:-1] if line.endswith(b"\r") else line)
            if field is None:
                self._fail("illegal trailer line")  # obs-fold included: RFC 9112 section 5.2 allows refusing it
            trailers.append(field.groups())
        del buffer[: match.end()]
        return self._message_complete(h11.EndOfMessage(headers=trailers, _parsed=True))

    def _need_body_bytes(self, plausible: bool) -> Any:
        if not plausible:
            self._fail("malformed chunked body")
        if self._closed:
            self._fail("peer closed connection without sending complete message body (incomplete chunked read)")
        return h11.NEED_DATA

    def _message_complete(self, event: h11.EndOfMessage) -> h11.EndOfMessage:
        self._message_received = True
        self._their = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        return event

    def _fail(self, message: str) -> None:
        self._their = h11.ERROR
        raise h11.RemoteProtocolError(message)

    # ------------------------------------------------------------------ sending

    def _send_head(self, event: Any, start_line: bytes) -> bytes:
        framing = _outgoing_framing(event.headers, request=not self._server)
        if framing is None:
            return self._go_slow().send(event)
        framing_value, keep_alive, add_chunked = framing
        if self._server and event.status_code in (204, 304):
            framing_value, add_chunked = 0, False
        self._sent.append(event)
        out = [start_line]
        if add_chunked:
            # h11 frames such a response itself and writes its Transfer-Encoding header last.
            raw = [
                (raw_name, value) for raw_name, name, value in event.headers._full_items if name != b"transfer-encoding"
            ]
            raw.append((b"Transfer-Encoding", b"chunked"))
            _send_headers(out, raw)
        else:
            _send_headers(out, event.headers)
        self._send_framing = framing_value
        self._our = h11.SEND_BODY
        if self._server:
            if not keep_alive:
                self._disable_keep_alive()
        else:
            self._their = h11.SEND_RESPONSE
        return b"".join(out)

    def _send_data(self, data: bytes) -> bytes:
        framing = self._send_framing
        if framing == _CHUNKED:
            self._sent.append(h11.Data(data=b"x" * len(data)) if data else h11.Data(data=b""))
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if len(data) > framing:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self._send_framing = framing - len(data)
        self._sent.append(h11.Data(data=b"x" * len(data)))
        return bytes(data)

    def _send_end(self, event: h11.EndOfMessage) -> bytes:
        if self._send_framing == _CHUNKED:
            out = [b"0\r\n"]
            _send_headers(out, event.headers)
            data = b"".join(out)
        elif self._send_framing:
            raise h11.LocalProtocolError(f"Too little data for declared Content-Length: {self._send_framing} missing")
        else:
            data = b""
        self._sent.append(event)
        self._our = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        return data

    def _disable_keep_alive(self) -> None:
        self._keep_alive = False
        if self._our is h11.DONE:
            self._our = h11.MUST_CLOSE
        if self._their is h11.DONE:
            self._their = h11.MUST_CLOSE

    # ------------------------------------------------------------------ the slow path

    def _states(self) -> dict[Any, Any]:
        their_role = h11.CLIENT if self._server else h11.SERVER
        return {self.our_role: self._our, their_role: self._their}

    def _go_slow(self) -> h11.Connection:
        """Hand this connection to h11 for good, replaying the current cycle into it first."""
        slow = h11.Connection(self.our_role, max_incomplete_event_size=self._max_incomplete)
        if self._server:
            self._replay_received(slow)
            for event in self._sent:
                slow.send(event)
        else:
            for event in self._sent:
                slow.send(event)
            self._replay_received(slow)
        if self._buffer:
            slow.receive_data(bytes(self._buffer))
        if self._closed:
            slow.receive_data(b"")
        self._slow = slow
        self._buffer = bytearray()
        return slow

    def _replay_received(self, slow: h11.Connection) -> None:
        if not self._head_received:
            return
        chunked = self._receive_framing == _CHUNKED
        if chunked:
            if not self._message_received:
                # Only a caller's mistake (a send h11 would refuse) gets here in the middle of a response.
                raise h11.LocalProtocolError("cannot hand a half-read chunked body over to h11")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (self._body_received, b"x" * self._body_received)
            body = body if self._body_received else b"0\r\n\r\n"
        else:
            body = b"x" * self._body_received
        slow.receive_data(self._head_received + body)
        while True:
            event = slow.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or type(event) is h11.EndOfMessage:
                break
