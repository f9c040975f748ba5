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

Heads are parsed and written in h1heads.py. For the proxy's lane (h1lane.py) a connection also takes and
gives whole heads without events: ``receive_head`` and ``take_body`` read exactly what ``next_event`` would,
``send_prepared`` and ``send_whole`` write what ``send`` would from bytes the caller already holds. They
change the same state as the event calls, so the two can be mixed within a cycle.
"""

from __future__ import annotations

import re
from typing import Any

import h11

from tether.core.proxy.h1heads import (
    CHUNKED,
    HEADER_LINE,
    REQUEST_LINE,
    STATUS_LINE,
    FieldMemo,
    Head,
    outgoing_framing,
    parse_fields,
    request_event,
    response_event,
    send_headers,
    write_head,
)

__all__ = ["END_OF_MESSAGE", "H1Connection", "Head", "request_event", "response_event", "write_head"]

_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_BLANK_LINE = re.compile(rb"\n\r?\n")
END_OF_MESSAGE = h11.EndOfMessage()  # events are frozen: one serves every message
_SLOW_METHODS = frozenset({b"HEAD", b"CONNECT"})  # both change how the response is framed

Headers = list[tuple[bytes, bytes]]


def _replayed(sent: Any) -> Any:
    """An entry of ``H1Connection._sent`` as the event h11 is given: a body's length, a head's maker, or the
    event itself."""
    if type(sent) is int:
        return h11.Data(data=b"x" * sent)  # h11 only counts body bytes
    return sent() if callable(sent) else sent


class H1Connection:
    """``h11.Connection(role)`` with a fast path; see the module docstring."""

    def __init__(
        self,
        our_role: type[h11._util.Sentinel],
        max_incomplete_event_size: int = 16 * 1024,
        *,
        memo: FieldMemo | None = None,
    ) -> None:
        self.our_role = our_role
        self._memo = memo if memo is not None else FieldMemo()  # heads seen before (h1heads.parse_fields)
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
        # The part of a chunk's closing CRLF still to come: taken as it arrives, as h11 does, so a lone
        # b"\r" never lingers in trailing_data.
        self._chunk_crlf_due = b""
        self._chunk_left = 0  # bytes of the current chunk still to come
        # This cycle so far, for a replay into h11: what we sent (events, a head's maker, a body's length), the
        # head received, its body bytes received.
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
    def answering_head(self) -> bool:
        """Whether the request being answered is a HEAD, whose response has a head and no body. The fast path
        never takes a HEAD, so only h11 can be answering one."""
        return self._slow is not None and self._slow._request_method == b"HEAD"

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
            if event is not END_OF_MESSAGE and event.headers and self._send_framing != CHUNKED:
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

    def next_cycle_if_done(self) -> bool:
        """``start_next_cycle`` when both sides are DONE (bytes may wait: a pipelined request); False: not so,
        and nothing changed."""
        slow = self._slow
        if slow is not None:
            if slow.our_state is not h11.DONE or slow.their_state is not h11.DONE:
                return False
        elif self._our is not h11.DONE or self._their is not h11.DONE:
            return False
        self.start_next_cycle()
        return True

    def next_cycle_if_clean(self) -> bool:
        """``start_next_cycle`` when both sides are DONE and no byte waits to be parsed: whether the connection
        may carry another exchange (an endpoint's bytes after its response would be read as the next answer).
        False: not so, and nothing changed."""
        slow = self._slow
        if slow is not None:
            if slow.our_state is not h11.DONE or slow.their_state is not h11.DONE or slow.trailing_data[0]:
                return False
        elif self._our is not h11.DONE or self._their is not h11.DONE or self._buffer:
            return False
        self.start_next_cycle()
        return True

    # ------------------------------------------------------------------ whole heads, without events

    def receive_head(self, data: bytes) -> Head | None:
        """``receive_data(data)`` and the head ``next_event`` would return, for a connection waiting for a head
        with nothing buffered when ``data`` starts with a whole common-case head (the rest stays buffered).
        None: nothing changed, and ``data`` goes to ``receive_data`` as usual."""
        if self._slow is not None or self._buffer or self._closed or not data:
            return None
        if self._their is not (h11.IDLE if self._server else h11.SEND_RESPONSE):
            return None
        if (self._server and not 0x41 <= data[0] <= 0x5A) or (not self._server and data[0] != 0x48):
            return None
        end = data.find(b"\r\n\r\n")
        head = self._take_head(data, end) if end >= 0 else None
        if head is not None and len(data) > head.length:
            self._buffer += memoryview(data)[head.length :]
        return head

    def take_body(self) -> bytes | None:
        """After a head: its whole Content-Length body if all of it is buffered, read as ``next_event`` would
        (the message is then complete). None: not all there, or not such a body; nothing changed."""
        remaining = self._receive_framing
        buffer = self._buffer
        if self._slow is not None or self._their is not h11.SEND_BODY or remaining < 0 or len(buffer) < remaining:
            return None
        body = b""
        if remaining:
            body = bytes(buffer[:remaining])
            del buffer[:remaining]
            self._receive_framing = 0
            self._body_received += remaining
        self._message_received = True  # _message_complete
        self._their = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        return body

    def send_prepared(self, head: Any, wire: bytes, framing: int, *, keep_alive: bool = True) -> bytes:
        """``send(head)`` for a head already written out as ``send`` would write it (``wire``: see
        ``write_head``): a request other than HEAD or CONNECT, or a final response other than 204 and 304,
        framed by a Content-Length of ``framing`` (or none, for 0), with ``Connection: close`` exactly when not
        ``keep_alive``. ``head`` may be a callable making the event: h11 needs it only if this connection is
        ever handed over. Anywhere the fast path would not write such a head, it goes through ``send``."""
        if self._slow is not None or not (
            self._our is h11.SEND_RESPONSE if self._server else self._our is h11.IDLE and self._their is h11.IDLE
        ):
            return self.send(head() if callable(head) else head)
        self._sent.append(head)
        self._send_framing = framing
        self._our = h11.SEND_BODY
        if not self._server:
            self._their = h11.SEND_RESPONSE
        elif not keep_alive:
            self._disable_keep_alive()
        return wire

    def send_whole(self, head: Any, wire: bytes, body: bytes, *, keep_alive: bool = True) -> bytes:
        """``send_prepared(head, wire, len(body))``, then ``body`` and the end of the message."""
        data = self.send_prepared(head, wire, len(body), keep_alive=keep_alive)
        if self._slow is not None:
            return data + self._slow.send(h11.Data(data=body)) + self._slow.send(END_OF_MESSAGE)
        self._sent += (len(body), END_OF_MESSAGE)
        self._send_framing = 0
        self._our = h11.DONE if self._keep_alive else h11.MUST_CLOSE
        return data + body

    def nothing_to_read(self) -> bool:
        """No bytes wait to be parsed and the peer has not closed: ``next_event`` has nothing new to say."""
        if self._slow is not None:
            return self._slow.trailing_data == (b"", False)
        return not self._buffer and not self._closed

    # ------------------------------------------------------------------ receiving

    def _read_head(self) -> Any:
        buffer = self._buffer
        if not buffer or self._closed:
            return self._go_slow().next_event() if self._closed else h11.NEED_DATA
        # A request starts with an upper-case method, a response with its version; anything else (a
        # leading blank line, garbage) is for h11 to judge, and so is a head with bare LF line ends.
        if (self._server and not 0x41 <= buffer[0] <= 0x5A) or (not self._server and buffer[0] != 0x48):
            return self._go_slow().next_event()
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self._max_incomplete or b"\n\n" in buffer or b"\n\r\n" in buffer:
                return self._go_slow().next_event()
            return h11.NEED_DATA
        head = self._take_head(buffer, end)
        if head is None:
            return self._go_slow().next_event()
        del buffer[: head.length]
        return head.event()

    def _take_head(self, data: bytes | bytearray, end: int) -> Head | None:
        """The head ``data[:end + 4]`` (``end``: where its blank line starts) if it is common-case, with this
        connection's state moved past it as h11 would; None: nothing changed."""
        raw = bytes(data[: end + 4])
        head = self._memo.known_head(raw, self._server)
        if head is None:
            head = self._parse_head(data, end)
            if head is None:
                return None
            if head.block is not None:
                self._memo.remember_head(raw, self._server, head)
        if self._server:
            self._our = h11.SEND_RESPONSE
        self._their = h11.SEND_BODY
        self._receive_framing = head.framing
        self._reading_trailers = False
        self._chunk_crlf_due = b""
        self._chunk_left = 0
        if not head.keep_alive:
            self._disable_keep_alive()
        head.length = end + 4
        self._head_received = raw
        return head

    def _parse_head(self, data: bytes | bytearray, end: int) -> Head | None:
        """``_take_head``'s parse, which changes nothing."""
        line_end = data.find(b"\r\n", 0, end + 2)
        if self._server:
            match = REQUEST_LINE.fullmatch(data, 0, line_end)
            if match is None or match.group(1) in _SLOW_METHODS:
                return None
            head = parse_fields(data, line_end + 2, end + 2, request=True, memo=self._memo)
            if head is None:
                return None
            head.method, head.target = match.groups()
        else:
            match = STATUS_LINE.fullmatch(data, 0, line_end)
            if match is None:
                return None
            head = parse_fields(data, line_end + 2, end + 2, request=False, memo=self._memo)
            if head is None:
                return None
            head.status = int(match.group(1))
            head.reason = match.group(2) or b""
            if head.status in (204, 304):
                head.framing = 0
        return head

    def _read_body(self) -> Any:
        if self._receive_framing == CHUNKED:
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
        due = self._chunk_crlf_due
        if due:
            taken = bytes(buffer[: len(due)])
            if not due.startswith(taken):
                self._fail("malformed chunk footer")
            del buffer[: len(taken)]
            self._chunk_crlf_due = due[len(taken) :]
            if self._chunk_crlf_due:
                return self._need_body_bytes(True)
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
        self._chunk_crlf_due = b"\r\n" if self._chunk_left == 0 else b""
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
            field = HEADER_LINE.fullmatch(line[:-1] if line.endswith(b"\r") else line)
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
        framing = outgoing_framing(event.headers, request=not self._server)
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
            send_headers(out, raw)
        else:
            send_headers(out, event.headers)
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
        if framing == CHUNKED:
            self._sent.append(len(data))
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        if len(data) > framing:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self._send_framing = framing - len(data)
        self._sent.append(len(data))
        return bytes(data)

    def _send_end(self, event: h11.EndOfMessage) -> bytes:
        if self._send_framing == CHUNKED:
            out = [b"0\r\n"]
            send_headers(out, event.headers)
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
                slow.send(_replayed(event))
        else:
            for event in self._sent:
                slow.send(_replayed(event))
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
        chunked = self._receive_framing == CHUNKED
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
