"""One HTTP/2 connection's protocol state (RFC 9113), the part of h2's ``H2Connection`` the proxy uses.

Theory of operation
-------------------
``H2Connection`` is a sans-IO machine with h2's interface (``receive_data`` returns h2.events instances,
``send_headers`` / ``send_data`` / ``end_stream`` / ``reset_stream`` / ``acknowledge_received_data`` /
``close_connection`` / ``ping`` queue frames, ``data_to_send`` drains them), so ``H2Session`` and the
proxy above it see exactly what they saw from h2. It exists because h2 was more than half of an HTTP/2
stream's CPU in the proxy: a frame object per frame, a state-machine call per input, debug logging.

Sub-machines:

- Framing (h2frames.py): the preface, frame headers, frame-size and stream-association checks, header
  block assembly with CONTINUATION.
- The connection: settings both ways, both connection windows, stream ids, GOAWAY, PING.
- One ``StreamState`` per open stream: its state (RFC 9113 section 5.1; ``_OPEN``, the two half-closed states;
  reserved states never occur because both sides send ENABLE_PUSH 0 and a PUSH_PROMISE is refused), its
  two windows, and what it has received (a final response yet? Content-Length and the bytes so far).
  A stream that closes leaves the table at once and only its way of closing (``_RESET`` or ``_ENDED``) is
  remembered, for the last ``CLOSED_STREAMS_MAX`` streams: that is all a frame arriving late needs.

Errors: a connection error raises ``ConnectionProtocolError`` (an ``h2.exceptions.ProtocolError`` with the
RFC's ``error_code``) after queueing GOAWAY with that code; everything received earlier in the same call is
dropped, as in h2. Stream errors queue RST_STREAM and report ``StreamReset(remote_reset=False)``.

Behaviour follows h2 4.x (tests/core/test_h2wire_differential.py feeds both the same frames): for frames on
closed streams, as h2 answered them once it had moved the stream out of its table (before that, h2 answered
a few hostile frames on a stream it had just reset with a connection error rather than RST_STREAM). Except for
these deliberate differences, each where h2 departs from RFC 9113 to the proxy's cost:

1. A received GOAWAY does not discard bytes already queued to send (h2 clears its outbound buffer, which
   drops a SETTINGS ACK or the responses section 6.8 lets finish).
2. CONTINUATION without a header block open is always a PROTOCOL_ERROR (section 6.10); h2 sometimes
   answered it with RST_STREAM.
3. ALTSVC frames are ignored like unknown frames (RFC 7838 lets an endpoint that does not use them do so).
4. HEADERS opening an even stream towards a client is a PROTOCOL_ERROR (section 5.1.1: a server opens
   streams only by PUSH_PROMISE); h2 reported it as a request.
5. A SETTINGS ACK with a payload is a FRAME_SIZE_ERROR, as section 6.5 says (h2: PROTOCOL_ERROR).
6. RST_STREAM on an idle stream is a PROTOCOL_ERROR, as section 6.4 says (h2 ignored it once any stream
   had been opened).
"""

from __future__ import annotations

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import ChangedSetting, SettingCodes
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hyperframe.frame import ExtensionFrame

from tether.core.proxy import h2frames as wire
from tether.core.proxy.h2frames import Frame, FrameError, FrameReader, FrameTooLong
from tether.core.proxy.h2state import (
    ConnectionProtocolError,
    InboundWindow,
    StreamState,
    check_setting,
    error_code_of,
    is_informational,
    setting_of,
)

_OPEN, _HALF_CLOSED_LOCAL, _HALF_CLOSED_REMOTE = 1, 2, 3
_RESET, _ENDED = "reset", "ended"
CLOSED_STREAMS_MAX = 1000  # late frames on streams closed longer ago than this are treated as on unknown ids
HIGHEST_STREAM_ID = 2**31 - 1
_ALTSVC = 0xA


class H2Connection:
    def __init__(self, *, client: bool, settings: dict[int, int], encoder: object, decoder: object) -> None:
        self.client_side = client
        self.encoder = encoder
        self.decoder = decoder
        # Local settings take effect at once (as with h2's initial values): the ACK changes nothing.
        self.local_settings = {
            SettingCodes.HEADER_TABLE_SIZE: 4096,
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: 65_535,
            SettingCodes.MAX_FRAME_SIZE: wire.DEFAULT_MAX_FRAME_SIZE,
            SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            **settings,
        }
        self.remote_settings: dict[int, int] = {
            SettingCodes.HEADER_TABLE_SIZE: 4096,
            SettingCodes.ENABLE_PUSH: int(not client),
            SettingCodes.INITIAL_WINDOW_SIZE: 65_535,
            SettingCodes.MAX_FRAME_SIZE: wire.DEFAULT_MAX_FRAME_SIZE,
            SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
        }
        self._reader = FrameReader(server=not client)
        self._reader.max_frame_size = self.local_settings[SettingCodes.MAX_FRAME_SIZE]
        self._out: list[bytes] = []
        self._streams: dict[int, StreamState] = {}
        self._closed: dict[int, str] = {}  # stream id -> _RESET or _ENDED, the latest CLOSED_STREAMS_MAX
        self._inbound = InboundWindow(65_535)
        self.outbound_window = 65_535
        self.max_outbound_frame_size = wire.DEFAULT_MAX_FRAME_SIZE
        self.highest_inbound_stream_id = 0
        self.highest_outbound_stream_id = 0
        self._dispatch = {
            wire.DATA: self._on_data,
            wire.HEADERS: self._on_headers,
            wire.PRIORITY: self._on_priority,
            wire.RST_STREAM: self._on_rst_stream,
            wire.SETTINGS: self._on_settings,
            wire.PUSH_PROMISE: self._on_push_promise,
            wire.PING: self._on_ping,
            wire.GOAWAY: self._on_goaway,
            wire.WINDOW_UPDATE: self._on_window_update,
            wire.CONTINUATION: self._on_continuation,
        }

    def initiate_connection(self) -> None:
        preface = wire.PREFACE if self.client_side else b""
        self._out.append(preface + wire.settings_bytes(self.local_settings))

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out = []
        return data

    # ---------------------------------------------------------------- receiving

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        events: list[h2.events.Event] = []
        reader = self._reader
        dispatch = self._dispatch
        try:
            reader.feed(data)
            while (frame := reader.next_frame()) is not None:
                handler = dispatch.get(frame.kind)
                if handler is not None:
                    handler(frame, events)
                elif frame.kind != _ALTSVC:  # difference 3
                    body = ExtensionFrame(frame.kind, frame.stream_id, frame.flags)
                    body.parse_body(memoryview(frame.payload))
                    events.append(h2.events.UnknownFrameReceived(frame=body))
        except FrameTooLong as error:  # the caller answers (its GOAWAY names the last stream it saw)
            raise ConnectionProtocolError(str(error), error.code, answered=False) from None
        except FrameError as error:
            self._terminate(error.code)
            raise ConnectionProtocolError(str(error), error.code) from None
        except ConnectionProtocolError as error:
            self._terminate(error.error_code)
            raise
        return events

    def _terminate(self, code: int) -> None:
        self._out.append(wire.goaway_bytes(self.highest_inbound_stream_id, code))

    def _is_outbound(self, stream_id: int) -> bool:
        return stream_id % 2 == int(self.client_side)

    def _unknown_is_idle(self, stream_id: int) -> bool:
        """A stream id not in the table: True if it was never used (idle), False if it is closed."""
        highest = self.highest_outbound_stream_id if self._is_outbound(stream_id) else self.highest_inbound_stream_id
        return stream_id > highest

    def _close(self, stream: StreamState, how: str) -> None:
        del self._streams[stream.stream_id]
        closed = self._closed
        closed[stream.stream_id] = how
        if len(closed) > CLOSED_STREAMS_MAX:
            del closed[next(iter(closed))]

    def _on_data(self, frame: Frame, events: list) -> None:
        flow = frame.padded_length
        self._inbound.consume(flow)
        stream_id = frame.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._unknown_is_idle(stream_id):
                raise ConnectionProtocolError(f"DATA on idle stream {stream_id}")
            self._refuse_closed_data(stream_id, flow)
            return
        if stream.state == _HALF_CLOSED_REMOTE:  # the peer ended it: a stream error (section 5.1)
            self._close(stream, _RESET)
            events.append(
                h2.events.StreamReset(stream_id=stream_id, error_code=ErrorCodes.STREAM_CLOSED, remote_reset=False)
            )
            self._refuse_closed_data(stream_id, flow)
            return
        if not stream.response_received:  # a response's DATA before its HEADERS
            raise ConnectionProtocolError(f"DATA before HEADERS on stream {stream_id}")
        stream.inbound.consume(flow)
        data = frame.payload
        stream.content_received += len(data)
        ended = frame.flags & wire.FLAG_END_STREAM
        expected = stream.content_length
        if expected is not None and (
            expected < stream.content_received or ended and expected != stream.content_received
        ):
            raise ConnectionProtocolError(f"body length {stream.content_received} against Content-Length {expected}")
        event = h2.events.DataReceived(stream_id=stream_id, data=data, flow_controlled_length=flow)
        events.append(event)
        if ended:
            event.stream_ended = self._remote_ended(stream, events)

    def _refuse_closed_data(self, stream_id: int, flow: int) -> None:
        """DATA on a closed stream: its bytes still count against the connection window, which is opened
        again as if they had been read, and the stream gets RST_STREAM STREAM_CLOSED (as h2)."""
        increment = self._inbound.process(flow)
        if increment:
            self._out.append(wire.window_update_bytes(0, increment))
        self._out.append(wire.rst_stream_bytes(stream_id, ErrorCodes.STREAM_CLOSED))

    def _remote_ended(self, stream: StreamState, events: list) -> h2.events.StreamEnded:
        ended = h2.events.StreamEnded(stream_id=stream.stream_id)
        events.append(ended)
        if stream.state == _OPEN:
            stream.state = _HALF_CLOSED_REMOTE
        else:
            self._close(stream, _ENDED)
        return ended

    def _on_headers(self, frame: Frame, events: list) -> None:
        headers = self._decode(frame.payload)
        stream_id = frame.stream_id
        end = bool(frame.flags & wire.FLAG_END_STREAM)
        stream = self._streams.get(stream_id)
        informational = is_informational(headers)
        if informational and end and stream is not None:
            raise ConnectionProtocolError("Cannot set END_STREAM on informational responses")
        if informational and stream is not None and stream.state == _HALF_CLOSED_REMOTE:  # as h2's table has it
            raise ConnectionProtocolError(f"Informational response on ended stream {stream_id}")
        if stream is None:
            stream = self._open_inbound(stream_id)
            if stream is None:
                return
            if informational:
                raise ConnectionProtocolError("Informational response on a new stream")
            event = h2.events.RequestReceived(stream_id=stream_id)
            stream.response_received = True
        elif stream.state == _HALF_CLOSED_REMOTE:  # the peer already ended it: a stream error
            self._close(stream, _RESET)
            self._out.append(wire.rst_stream_bytes(stream_id, ErrorCodes.STREAM_CLOSED))
            events.append(
                h2.events.StreamReset(stream_id=stream_id, error_code=ErrorCodes.STREAM_CLOSED, remote_reset=False)
            )
            return
        elif informational:
            if stream.response_received:
                raise ConnectionProtocolError("Informational response after final response")
            event = h2.events.InformationalResponseReceived(stream_id=stream_id)
        elif not stream.response_received:
            stream.response_received = True
            event = h2.events.ResponseReceived(stream_id=stream_id)
        else:
            event = h2.events.TrailersReceived(stream_id=stream_id)
        events.append(event)
        if end:
            event.stream_ended = self._remote_ended(stream, events)
        self._expect_content_length(stream, headers)
        if type(event) is h2.events.TrailersReceived and not end:
            raise ConnectionProtocolError("Trailers must have END_STREAM set")
        event.headers = headers
        if frame.priority is not None:
            priority = self._priority_event(stream_id, frame.priority)
            event.priority_updated = priority
            events.append(priority)

    def _open_inbound(self, stream_id: int) -> StreamState | None:
        """A HEADERS frame on a stream not in the table: a new stream of the peer's, or a late frame."""
        if not self._unknown_is_idle(stream_id) or self._is_outbound(stream_id):
            how = self._closed.get(stream_id)
            if how == _RESET:  # we reset it: the frame crossed our RST_STREAM; say it again
                self._out.append(wire.rst_stream_bytes(stream_id, ErrorCodes.STREAM_CLOSED))
                return None
            if how == _ENDED:
                raise ConnectionProtocolError(f"HEADERS on closed stream {stream_id}", ErrorCodes.STREAM_CLOSED)
            if self._unknown_is_idle(stream_id):
                raise ConnectionProtocolError("Invalid stream ID for peer.")
            raise ConnectionProtocolError(f"stream id {stream_id} is lower than one already used")
        if self.client_side:  # difference 4
            raise ConnectionProtocolError(f"HEADERS opening server stream {stream_id}")
        stream = StreamState(
            stream_id,
            _OPEN,
            self.local_settings[SettingCodes.INITIAL_WINDOW_SIZE],
            self.remote_settings[SettingCodes.INITIAL_WINDOW_SIZE],
        )
        self._streams[stream_id] = stream
        self.highest_inbound_stream_id = stream_id
        return stream

    def _decode(self, block: bytes) -> list:
        try:
            return self.decoder.decode(block, raw=True)  # type: ignore[attr-defined]
        except OversizedHeaderListError as error:
            raise ConnectionProtocolError(f"Oversized header block: {error}", ErrorCodes.ENHANCE_YOUR_CALM) from None
        except (HPACKError, IndexError, TypeError, UnicodeDecodeError) as error:
            raise ConnectionProtocolError(f"Error decoding header block: {error}") from None

    @staticmethod
    def _expect_content_length(stream: StreamState, headers: list) -> None:
        if stream.head:
            stream.content_length = 0
            return
        length = None
        for field in headers:
            if field[0] == b"content-length":
                value = field[1]
                if not value.isdigit():
                    raise ConnectionProtocolError(f"Invalid content-length header: {value[:40]!r}")
                if length is not None and int(value) != length:
                    raise ConnectionProtocolError("Conflicting content-length headers")
                length = int(value)
        stream.content_length = length

    def _priority_event(self, stream_id: int, priority: wire.Priority) -> h2.events.PriorityUpdated:
        if priority.depends_on == stream_id:
            raise ConnectionProtocolError(f"Stream {stream_id} may not depend on itself")
        event = h2.events.PriorityUpdated()
        event.stream_id = stream_id
        event.depends_on = priority.depends_on
        event.exclusive = priority.exclusive
        event.weight = priority.weight + 1
        return event

    def _on_priority(self, frame: Frame, events: list) -> None:
        events.append(self._priority_event(frame.stream_id, wire.parse_priority(frame)))

    def _on_rst_stream(self, frame: Frame, events: list) -> None:
        code = wire.parse_rst_stream(frame)
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            if self._unknown_is_idle(frame.stream_id):  # difference 6
                raise ConnectionProtocolError(f"RST_STREAM on idle stream {frame.stream_id}")
            return  # closed: section 5.1 allows it (and h2 ignores it too)
        self._close(stream, _RESET)
        events.append(
            h2.events.StreamReset(stream_id=frame.stream_id, error_code=error_code_of(code), remote_reset=True)
        )

    def _on_settings(self, frame: Frame, events: list) -> None:
        if frame.flags & wire.FLAG_ACK:
            wire.parse_settings(frame)
            acknowledged = h2.events.SettingsAcknowledged()
            acknowledged.changed_settings = {}
            events.append(acknowledged)
            return
        received = wire.parse_settings(frame)
        for code, value in received.items():
            check_setting(code, value, from_server=self.client_side)
        changed = h2.events.RemoteSettingsChanged()
        remote = self.remote_settings
        for code, value in received.items():
            setting = setting_of(code)
            changed.changed_settings[setting] = ChangedSetting(setting, remote.get(code), value)
        events.append(changed)
        window = received.get(SettingCodes.INITIAL_WINDOW_SIZE)
        if window is not None:
            delta = window - remote[SettingCodes.INITIAL_WINDOW_SIZE]
            for stream in self._streams.values():
                stream.outbound_window += delta
                if stream.outbound_window > wire.WINDOW_MAX:
                    raise ConnectionProtocolError("window past 2^31-1", ErrorCodes.FLOW_CONTROL_ERROR)
        remote.update(received)
        if SettingCodes.HEADER_TABLE_SIZE in received:
            self.encoder.header_table_size = received[SettingCodes.HEADER_TABLE_SIZE]  # type: ignore[attr-defined]
        if SettingCodes.MAX_FRAME_SIZE in received:
            self.max_outbound_frame_size = received[SettingCodes.MAX_FRAME_SIZE]
        self._out.append(wire.settings_bytes({}, ack=True))

    def _on_push_promise(self, frame: Frame, events: list) -> None:
        del frame, events
        raise ConnectionProtocolError("Received pushed stream")  # we sent ENABLE_PUSH 0 (either role)

    def _on_ping(self, frame: Frame, events: list) -> None:
        payload = wire.parse_ping(frame)
        if frame.flags & wire.FLAG_ACK:
            events.append(h2.events.PingAckReceived(ping_data=payload))
            return
        events.append(h2.events.PingReceived(ping_data=payload))
        self._out.append(wire.frame_bytes(wire.PING, wire.FLAG_ACK, 0, payload))

    def _on_goaway(self, frame: Frame, events: list) -> None:
        last, code, debug = wire.parse_goaway(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = error_code_of(code)
        event.last_stream_id = last
        event.additional_data = debug or None
        events.append(event)  # difference 1: what was queued to send stays queued

    def _on_window_update(self, frame: Frame, events: list) -> None:
        increment = wire.parse_window_update(frame)
        stream_id = frame.stream_id
        if not stream_id:
            self.outbound_window += increment
            if self.outbound_window > wire.WINDOW_MAX:
                raise ConnectionProtocolError("connection window past 2^31-1", ErrorCodes.FLOW_CONTROL_ERROR)
            events.append(h2.events.WindowUpdated(stream_id=0, delta=increment))
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._unknown_is_idle(stream_id):
                raise ConnectionProtocolError(f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # closed: section 5.1 allows it
        if stream.outbound_window + increment > wire.WINDOW_MAX:  # a stream error (section 6.9.1)
            self._close(stream, _RESET)
            self._out.append(wire.rst_stream_bytes(stream_id, ErrorCodes.FLOW_CONTROL_ERROR))
            events.append(
                h2.events.StreamReset(stream_id=stream_id, error_code=ErrorCodes.FLOW_CONTROL_ERROR, remote_reset=False)
            )
            return
        stream.outbound_window += increment
        events.append(h2.events.WindowUpdated(stream_id=stream_id, delta=increment))

    def _on_continuation(self, frame: Frame, events: list) -> None:
        del events
        raise ConnectionProtocolError(f"CONTINUATION without a header block on stream {frame.stream_id}")

    # ---------------------------------------------------------------- sending

    def get_next_available_stream_id(self) -> int:
        if not self.highest_outbound_stream_id:
            return 1 if self.client_side else 2
        next_id = self.highest_outbound_stream_id + 2
        if next_id > HIGHEST_STREAM_ID:
            raise h2.exceptions.NoAvailableStreamIDError("Exhausted allowed stream IDs")
        return next_id

    def _sending_stream(self, stream_id: int) -> StreamState:
        stream = self._streams.get(stream_id)
        if stream is None:
            if self._unknown_is_idle(stream_id):
                raise h2.exceptions.NoSuchStreamError(stream_id)
            raise h2.exceptions.StreamClosedError(stream_id)
        return stream

    def send_headers(self, stream_id: int, headers: list, end_stream: bool = False) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open_outbound(stream_id, headers)
        elif stream.state == _HALF_CLOSED_LOCAL:
            raise h2.exceptions.StreamClosedError(stream_id)
        elif is_informational(headers):
            if end_stream:
                raise h2.exceptions.ProtocolError("Cannot set END_STREAM on informational responses.")
            if stream.response_sent:
                raise h2.exceptions.ProtocolError("Informational response after final response")
        elif not stream.response_sent:
            stream.response_sent = True
        elif not end_stream:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set")
        block = self.encoder.encode(headers)  # type: ignore[attr-defined]
        self._out.append(
            wire.headers_bytes(stream_id, block, end_stream=end_stream, max_frame_size=self.max_outbound_frame_size)
        )
        if end_stream:
            self._local_ended(stream)

    def _open_outbound(self, stream_id: int, headers: list) -> StreamState:
        if not self._is_outbound(stream_id) or not self._unknown_is_idle(stream_id):
            raise h2.exceptions.StreamIDTooLowError(stream_id, self.highest_outbound_stream_id)
        limit = self.remote_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS, 2**32 + 1)
        if self.open_outbound_streams + 1 > limit:
            raise h2.exceptions.TooManyStreamsError(f"Max outbound streams is {limit}")
        stream = StreamState(
            stream_id,
            _OPEN,
            self.local_settings[SettingCodes.INITIAL_WINDOW_SIZE],
            self.remote_settings[SettingCodes.INITIAL_WINDOW_SIZE],
        )
        stream.response_sent = True
        stream.head = any(field[0] == b":method" and field[1] == b"HEAD" for field in headers)
        self._streams[stream_id] = stream
        self.highest_outbound_stream_id = stream_id
        return stream

    def _local_ended(self, stream: StreamState) -> None:
        if stream.state == _OPEN:
            stream.state = _HALF_CLOSED_LOCAL
        else:
            self._close(stream, _ENDED)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        stream = self._sending_stream(stream_id)
        if stream.state == _HALF_CLOSED_LOCAL:
            raise h2.exceptions.StreamClosedError(stream_id)
        size = len(data)
        if size > min(self.outbound_window, stream.outbound_window):
            raise h2.exceptions.FlowControlError("Cannot send more than the flow control window allows")
        if size > self.max_outbound_frame_size:
            raise h2.exceptions.FrameTooLargeError("Cannot send frame larger than the maximum frame size")
        self.outbound_window -= size
        stream.outbound_window -= size
        self._out.append(wire.frame_bytes(wire.DATA, wire.FLAG_END_STREAM if end_stream else 0, stream_id, data))
        if end_stream:
            self._local_ended(stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        stream = self._sending_stream(stream_id)
        self._close(stream, _RESET)
        self._out.append(wire.rst_stream_bytes(stream_id, error_code))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None and self._unknown_is_idle(stream_id):
            raise h2.exceptions.NoSuchStreamError(stream_id)
        increment = self._inbound.process(acknowledged_size)
        if increment:
            self._out.append(wire.window_update_bytes(0, increment))
        if stream is not None:
            increment = stream.inbound.process(acknowledged_size)
            if increment:
                self._out.append(wire.window_update_bytes(stream_id, increment))

    def increment_flow_control_window(self, increment: int) -> None:
        """Open the connection's receive window by ``increment`` (the stream windows follow SETTINGS)."""
        self._inbound.open(increment)
        self._out.append(wire.window_update_bytes(0, increment))

    def close_connection(self, error_code: int = 0, last_stream_id: int | None = None) -> None:
        last = self.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        self._out.append(wire.goaway_bytes(last, error_code))

    def ping(self, opaque_data: bytes) -> None:
        if len(opaque_data) != 8:
            raise ValueError("PING payload must be 8 bytes")
        self._out.append(wire.frame_bytes(wire.PING, 0, 0, opaque_data))

    # ---------------------------------------------------------------- state

    def local_flow_control_window(self, stream_id: int) -> int:
        return min(self.outbound_window, self._sending_stream(stream_id).outbound_window)

    @property
    def open_outbound_streams(self) -> int:
        parity = int(self.client_side)
        return sum(1 for stream_id in self._streams if stream_id % 2 == parity)

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self.remote_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS, 2**32 + 1)
