"""The pieces of one HTTP/2 connection's state that are not the connection itself (h2conn.py): the error a
peer's protocol violation raises, a stream's record, the inbound window's update rule, and the checks on
settings, error codes and header blocks.

They live apart so that h2conn.py holds only the connection's transitions. ``InboundWindow`` follows h2's
``WindowManager`` on purpose: the differential test (tests/core/test_h2wire_differential.py) compares the
WINDOW_UPDATE frames both send, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable

import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from tether.core.proxy import h2frames as wire


class ConnectionProtocolError(h2.exceptions.ProtocolError):
    """The peer broke the protocol: a connection error; GOAWAY with ``error_code`` is already queued, unless
    ``answered`` is False (a frame too long: the session answers it, as it did when h2 could not)."""

    def __init__(self, message: str, code: int = ErrorCodes.PROTOCOL_ERROR, *, answered: bool = True) -> None:
        super().__init__(message)
        self.error_code = code
        self.answered = answered  # False: no GOAWAY queued yet


class InboundWindow:
    """What the peer may still send, and when to open it again: h2's ``WindowManager`` algorithm (a
    WINDOW_UPDATE once half the window has been processed, or sooner when the window is shut), so that
    both implementations send the same updates."""

    __slots__ = ("current", "maximum", "processed")

    def __init__(self, size: int) -> None:
        self.current = self.maximum = size
        self.processed = 0

    def consume(self, size: int) -> None:
        self.current -= size
        if self.current < 0:
            raise ConnectionProtocolError("Flow control window shrunk below 0", ErrorCodes.FLOW_CONTROL_ERROR)

    def open(self, size: int) -> None:
        self.current += size
        if self.current > wire.WINDOW_MAX:
            raise ConnectionProtocolError("Flow control window too large", ErrorCodes.FLOW_CONTROL_ERROR)
        self.maximum = max(self.current, self.maximum)

    def process(self, size: int) -> int:
        self.processed += size
        if not self.processed:
            return 0
        if (self.current == 0 and self.processed > min(1024, self.maximum // 4)) or self.processed >= (
            self.maximum // 2
        ):
            increment = min(self.processed, self.maximum - self.current)
            self.processed = 0
            self.current += increment
            return increment
        return 0


class StreamState:
    __slots__ = (
        "content_length",
        "content_received",
        "head",
        "outbound_window",
        "inbound",
        "response_received",
        "response_sent",
        "state",
        "stream_id",
    )

    def __init__(self, stream_id: int, state: int, inbound_window: int, outbound_window: int) -> None:
        self.stream_id = stream_id
        self.state = state
        self.inbound = InboundWindow(inbound_window)
        self.outbound_window = outbound_window
        self.response_received = False  # a final header block arrived (a later one is trailers)
        self.response_sent = False  # a final header block went out
        self.content_length: int | None = None
        self.content_received = 0
        self.head = False  # a response to HEAD has no body whatever its Content-Length says


def is_informational(headers: Iterable) -> bool:
    """h2's test: the :status among the leading pseudo-headers starts with 1."""
    for field in headers:
        name = field[0]
        if name == b":status":
            return field[1][:1] == b"1"
        if name[:1] != b":":
            return False
    return False


def error_code_of(code: int) -> int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


def setting_of(code: int) -> int:
    try:
        return SettingCodes(code)
    except ValueError:
        return code


def check_setting(code: int, value: int, *, from_server: bool) -> None:
    """Section 6.5.2's bounds (h2's ``_validate_setting``); a server may not enable push."""
    error = None
    if code == SettingCodes.ENABLE_PUSH:
        if value not in (0, 1) or (from_server and value != 0):
            error = ErrorCodes.PROTOCOL_ERROR
    elif code == SettingCodes.INITIAL_WINDOW_SIZE:
        if value > wire.WINDOW_MAX:
            error = ErrorCodes.FLOW_CONTROL_ERROR
    elif code == SettingCodes.MAX_FRAME_SIZE:
        if not 16_384 <= value <= 16_777_215:
            error = ErrorCodes.PROTOCOL_ERROR
    elif code == SettingCodes.ENABLE_CONNECT_PROTOCOL and value not in (0, 1):
        error = ErrorCodes.PROTOCOL_ERROR
    if error is not None:
        raise ConnectionProtocolError(f"Setting {code} has invalid value {value}", error)
