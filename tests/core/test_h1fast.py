"""The HTTP/1.1 fast path against h11 itself: the same bytes in, the same events, states, bytes out and errors.

Each example builds a connection's worth of traffic (common-case messages and hostile ones: other versions,
bad header lines, bare LF line ends, conflicting framing, broken chunked bodies, garbage), splits it at
arbitrary points, and runs an ``h11.Connection`` and an ``H1Connection`` side by side, answering each request
(or sending each request, in the client role) with the same events. Consecutive Data events are merged before
comparing: how a body is cut into events is not part of the contract, its bytes are.

TETHER_H1FAST_EXAMPLES raises the example count for a longer local run.
"""

from __future__ import annotations

import os
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.core.proxy.h1fast import H1Connection, write_head
from tether.core.proxy.h1heads import BLOCKS_MAX, ROWS_MAX, Block, FieldMemo, Head, parse_fields

FILLER = Block(Head([], 0, True, b"", set(), 0))

EXAMPLES = int(os.environ.get("TETHER_H1FAST_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"CONNECT", b"OPTIONS", b"get", b"G@T", b""]
TARGETS = [b"/", b"/a/b?c=d&e", b"*", b"http://example.com/x", b"/a b", b"/\x7f", b"/\xc3\xa9"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1"]
HEADER_LINES = [
    b"Host: example.com",
    b"host: other",
    b"User-Agent: wrk",
    b"Accept: */*",
    b"X-Spaced:   padded value  ",
    b"X-Empty:",
    b"X-Tab:\tvalue\t",
    b"Connection: keep-alive",
    b"Connection: close",
    b"Connection: upgrade",
    b"Connection: Keep-Alive, Close",
    b"Upgrade: websocket",
    b"Expect: 100-continue",
    b"Bad Name: x",
    b"X-Control: a\x01b",
    b"X-Latin: \xe9t\xe9",
    b" folded continuation",
    b"NoColon",
    b"X-Colon : x",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 05",
    b"Content-Length: 3, 3",
    b"Content-Length: -1",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: Chunked",
]
STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 500 Internal Server Error",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 999 Odd",
    b"HTTP/1.1 20 Short",
    b"HTTP/1.1 200 \xe9",
    b"HTTX/1.1 200 OK",
]


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    pieces = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3))
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), draw(st.sampled_from([b"", b";ext=1", b" "])), p) for p in pieces)
    trailer = draw(st.sampled_from([b"", b"X-Trailer: yes\r\n", b"Bad Trailer\r\n", b"A: 1\r\nB: 2\r\n"]))
    out += b"0\r\n" + trailer + b"\r\n"
    if draw(st.integers(0, 9)) == 0:  # a broken chunk: wrong size, missing CRLF, not hex
        out = draw(st.sampled_from([b"5\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXY0\r\n\r\n", b"zz\r\n", b"3\r\nabc\r\n"]))
    return out


@st.composite
def message(draw: st.DrawFn, *, request: bool) -> bytes:
    """One head and body, mostly the common case, sometimes hostile."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=60))
    if request:
        start = b"%s %s %s" % (
            draw(st.sampled_from(METHODS)),
            draw(st.sampled_from(TARGETS)),
            draw(st.sampled_from(VERSIONS)),
        )
    else:
        start = draw(st.sampled_from(STATUS_LINES))
    common = [b"Host: example.com"] if request else [b"Server: test"]
    lines = common + draw(st.lists(st.sampled_from(HEADER_LINES), max_size=4))
    if not request and draw(st.booleans()):
        lines.append(draw(st.sampled_from([b"Content-Length: 5", b"Transfer-Encoding: chunked"])))
    eol = b"\r\n" if draw(st.integers(0, 9)) else b"\n"
    head = eol.join([start, *lines]) + eol + eol
    if any(line.startswith(b"Transfer-Encoding") for line in lines):
        body = draw(chunked_body())
    else:
        body = draw(st.binary(max_size=8))
        if any(line == b"Content-Length: 5" for line in lines):
            body = draw(st.sampled_from([b"hello", b"hell", b"hello!"]))
    return head + body


def pieces_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if data[a:b]]


def normal(event: Any) -> Any:
    if isinstance(event, h11.Request):
        return ("Request", event.method, event.target, event.http_version, list(event.headers._full_items))
    if isinstance(event, (h11.Response, h11.InformationalResponse)):
        items = list(event.headers._full_items)
        return (type(event).__name__, event.status_code, event.reason, event.http_version, items)
    if isinstance(event, h11.EndOfMessage):
        return ("EndOfMessage", list(event.headers))
    if isinstance(event, h11.Data):
        return ("Data", bytes(event.data))
    if isinstance(event, h11.ConnectionClosed):
        return ("ConnectionClosed",)
    return (event.__name__,)  # NEED_DATA, PAUSED


def drain(connection: Any) -> tuple[list[Any], str | None]:
    """Events until NEED_DATA, PAUSED or ConnectionClosed, with Data merged; and the error, if one was raised."""
    events: list[Any] = []
    for _ in range(1000):
        try:
            event = normal(connection.next_event())
        except h11.RemoteProtocolError as error:
            return events, type(error).__name__
        if events and event[0] == "Data" and events[-1][0] == "Data":
            events[-1] = ("Data", events[-1][1] + event[1])
        else:
            events.append(event)
        if event[0] in ("NEED_DATA", "PAUSED", "ConnectionClosed"):
            return events, None
    raise AssertionError("next_event never settles")


def same_state(slow: h11.Connection, fast: H1Connection) -> None:
    assert (fast.our_state, fast.their_state) == (slow.our_state, slow.their_state)
    assert fast.trailing_data == slow.trailing_data


def send_both(slow: h11.Connection, fast: H1Connection, event: Any) -> bool:
    """Send ``event`` on both; True if both accepted it, False if both refused it."""
    outcomes = []
    for connection in (slow, fast):
        try:
            outcomes.append(connection.send(event))
        except h11.LocalProtocolError:
            outcomes.append("refused")
    assert outcomes[0] == outcomes[1], event
    return outcomes[0] != "refused"


RESPONSE_HEADS = [
    [("content-length", "5")],
    [("transfer-encoding", "chunked")],
    [("x-any", "1")],
    [("content-length", "5"), ("connection", "close")],
    [("Transfer-Encoding", "chunked"), ("connection", "keep-alive")],
    [("content-length", "0")],
]


@st.composite
def response_events(draw: st.DrawFn) -> list[Any]:
    status = draw(st.sampled_from([200, 204, 304, 404, 502]))
    head = h11.Response(status_code=status, headers=draw(st.sampled_from(RESPONSE_HEADS)), reason=b"R")
    body = draw(st.sampled_from([[b"hello"], [b"hel", b"lo"], [b""], [], [b"hello!"]]))
    trailers = draw(st.sampled_from([[], [("x-trailer", "1")]]))
    extra = [h11.InformationalResponse(status_code=103, headers=[])] if draw(st.integers(0, 9)) == 0 else []
    return [*extra, head, *[h11.Data(data=b) for b in body], h11.EndOfMessage(headers=trailers)]


@SETTINGS
@given(
    messages=st.lists(message(request=True), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
    answers=st.lists(response_events(), min_size=4, max_size=4),
    eof=st.booleans(),
)
def test_server_role_matches_h11(messages: list[bytes], cuts: list[int], answers: list[list[Any]], eof: bool) -> None:
    slow = h11.Connection(h11.SERVER, max_incomplete_event_size=200)
    fast = H1Connection(h11.SERVER, max_incomplete_event_size=200)
    chunks = [*pieces_of(b"".join(messages), cuts), *([b""] if eof else [])]
    answer_index = 0
    for chunk in chunks:
        slow.receive_data(chunk)
        fast.receive_data(chunk)
        while True:
            slow_events, slow_error = drain(slow)
            fast_events, fast_error = drain(fast)
            assert (fast_events, fast_error) == (slow_events, slow_error)
            if slow_error:
                return
            same_state(slow, fast)
            if slow.our_state is not h11.SEND_RESPONSE or slow.their_state is not h11.DONE or answer_index >= 4:
                break
            for event in answers[answer_index]:
                if not send_both(slow, fast, event):
                    return
                same_state(slow, fast)
            answer_index += 1
            if slow.our_state is h11.DONE and slow.their_state is h11.DONE:
                slow.start_next_cycle()
                fast.start_next_cycle()
            else:
                return


REQUESTS = [
    ([b"GET", b"/"], [("host", "a")], []),
    ([b"POST", b"/up"], [("host", "a"), ("content-length", "5")], [b"hel", b"lo"]),
    ([b"POST", b"/up"], [("host", "a"), ("transfer-encoding", "chunked")], [b"hello"]),
    ([b"HEAD", b"/"], [("host", "a")], []),
    ([b"GET", b"/"], [("host", "a"), ("connection", "close")], []),
    ([b"GET", b"/"], [("host", "a"), ("connection", "keep-alive"), ("x-b", "c")], []),
]


@SETTINGS
@given(
    requests=st.lists(st.sampled_from(REQUESTS), min_size=1, max_size=3),
    answers=st.lists(message(request=False), min_size=3, max_size=3),
    cuts=st.lists(st.integers(0, 400), max_size=5),
    eof=st.booleans(),
)
def test_client_role_matches_h11(requests: list[Any], answers: list[bytes], cuts: list[int], eof: bool) -> None:
    slow = h11.Connection(h11.CLIENT, max_incomplete_event_size=200)
    fast = H1Connection(h11.CLIENT, max_incomplete_event_size=200)
    for (method, target), headers, body in requests:
        events = [h11.Request(method=method, target=target, headers=headers)]
        events += [h11.Data(data=piece) for piece in body] + [h11.EndOfMessage()]
        for event in events:
            if not send_both(slow, fast, event):
                return
            same_state(slow, fast)
        answer = answers.pop(0)
        chunks = [*pieces_of(answer, cuts), *([b""] if eof and not answers else [])]
        for chunk in chunks:
            slow.receive_data(chunk)
            fast.receive_data(chunk)
            slow_events, slow_error = drain(slow)
            assert drain(fast) == (slow_events, slow_error)
            if slow_error:
                return
            same_state(slow, fast)
        if slow.our_state is not h11.DONE or slow.their_state is not h11.DONE:
            return
        slow.start_next_cycle()
        fast.start_next_cycle()


def test_common_request_takes_the_fast_path() -> None:
    """The point of the module: a plain keep-alive exchange never builds an h11 connection."""
    server = H1Connection(h11.SERVER)
    server.receive_data(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
    assert isinstance(server.next_event(), h11.Request)
    assert server.next_event() == h11.Data(data=b"hi")
    assert isinstance(server.next_event(), h11.EndOfMessage)
    server.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    server.send(h11.EndOfMessage())
    server.start_next_cycle()
    assert server._slow is None


@pytest.mark.parametrize("head", [b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\n\r\n"])
def test_uncommon_heads_are_left_to_h11(head: bytes) -> None:
    server = H1Connection(h11.SERVER)
    server.receive_data(head)
    server.next_event()
    assert server._slow is not None


# ---------------------------------------------------------------------------------------------------------
# The whole-head calls the proxy's lane uses (h1lane.py) against the event calls they stand for.


def _whole_or_events(whole: H1Connection, events: H1Connection, data: bytes) -> None:
    """Feed ``data`` to ``whole`` as the lane does and to ``events`` as h1flows does; compare what each saw."""
    head = whole.receive_head(data)
    events.receive_data(data)
    if head is None:
        whole.receive_data(data)  # declined: nothing happened, the bytes go in as usual
        assert drain(whole) == drain(events)
        return
    assert normal(head.event()) == normal(events.next_event())
    body = whole.take_body()
    if body is None:  # not all of the body is here (or it is chunked): the events go on as usual
        assert drain(whole) == drain(events)
        return
    seen, error = drain(events)
    after, error_after = drain(whole)  # what follows the message, for both
    message_events = [("Data", body)] if body else []
    assert (seen, error) == ([*message_events, ("EndOfMessage", []), *after], error_after)
    assert (whole.our_state, whole.their_state, whole.trailing_data) == (
        events.our_state,
        events.their_state,
        events.trailing_data,
    )


@SETTINGS
@given(requests=st.lists(message(request=True), min_size=1, max_size=3), tail=st.binary(max_size=6))
def test_receive_head_and_take_body_match_next_event(requests: list[bytes], tail: bytes) -> None:
    whole, events = H1Connection(h11.SERVER), H1Connection(h11.SERVER)
    for data in requests:
        try:
            _whole_or_events(whole, events, data + tail)
        except h11.RemoteProtocolError:
            return  # both failed alike inside drain, or the hostile bytes came out in next_event
        if events.our_state is not h11.SEND_RESPONSE or events.their_state is not h11.DONE:
            return
        for connection in (whole, events):
            connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            connection.start_next_cycle()
        tail = b""


@SETTINGS
@given(answers=st.lists(message(request=False), min_size=1, max_size=3))
def test_receive_head_matches_next_event_for_responses(answers: list[bytes]) -> None:
    whole, events = H1Connection(h11.CLIENT), H1Connection(h11.CLIENT)
    for data in answers:
        for connection in (whole, events):
            connection.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
            connection.send(h11.EndOfMessage())
        try:
            _whole_or_events(whole, events, data)
        except h11.RemoteProtocolError:
            return
        if events.our_state is not h11.DONE or events.their_state is not h11.DONE:
            return
        whole.start_next_cycle()
        events.start_next_cycle()


PREPARED_RESPONSES = [
    (200, b"OK", [(b"server", b"t"), (b"content-length", b"5")], b"hello"),
    (503, b"", [(b"host", b"h"), (b"content-length", b"0")], b""),
    (200, b"OK", [(b"content-length", b"2"), (b"connection", b"close")], b"ok"),
]
FIRST_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", FIRST_REQUESTS)
@pytest.mark.parametrize(("status", "reason", "headers", "body"), PREPARED_RESPONSES)
def test_send_whole_writes_what_send_writes(
    request_bytes: bytes, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """The same bytes and states as the three events, on the fast path and on h11 (HTTP/1.0, HEAD)."""
    whole, events = H1Connection(h11.SERVER), H1Connection(h11.SERVER)
    for connection in (whole, events):
        connection.receive_data(request_bytes)
        drain(connection)
    if request_bytes.startswith(b"HEAD"):
        body = b""  # the answer to a HEAD has the head only
    event = h11.Response(status_code=status, reason=reason, headers=headers)
    keep_alive = (b"connection", b"close") not in headers
    wire = write_head(b"HTTP/1.1 %d %s\r\n" % (status, reason), [(n, n, v) for n, v in headers])
    written = whole.send_whole(lambda: event, wire, body, keep_alive=keep_alive)
    expected = events.send(event) + events.send(h11.Data(data=body)) + events.send(h11.EndOfMessage())
    assert written == expected
    assert (whole.our_state, whole.their_state) == (events.our_state, events.their_state)
    whole._go_slow()  # what was sent replays into h11 without complaint


def test_send_prepared_writes_what_send_writes_for_a_request() -> None:
    whole, events = H1Connection(h11.CLIENT), H1Connection(h11.CLIENT)
    headers = [(b"x-a", b"1"), (b"host", b"h"), (b"content-length", b"3")]
    event = h11.Request(method=b"POST", target=b"/p", headers=headers)
    wire = write_head(b"POST /p HTTP/1.1\r\n", [(n, n, v) for n, v in headers])
    assert whole.send_prepared(event, wire, 3) == events.send(event)
    assert whole.send(h11.Data(data=b"abc")) + whole.send(h11.EndOfMessage()) == events.send(
        h11.Data(data=b"abc")
    ) + events.send(h11.EndOfMessage())
    assert (whole.our_state, whole.their_state) == (events.our_state, events.their_state)
    whole._go_slow()


# ---------------------------------------------------------------------------------------------------------
# The proxy's memo of heads seen before (h1heads.FieldMemo) changes no parse.


def _parsed(data: bytes, request: bool, memo: FieldMemo | None) -> Any:
    line_end, end = data.find(b"\r\n"), data.find(b"\r\n\r\n")
    if line_end < 0 or end < 0:
        return "no head"
    head = parse_fields(data, line_end + 2, end + 2, request=request, memo=memo)
    if head is None:
        return None
    return (head.fields, head.framing, head.keep_alive, head.host, head.connection, head.hosts)


@SETTINGS
@given(request=st.booleans(), data=st.data(), full=st.booleans())
def test_parse_fields_with_a_memo_matches_a_fresh_parse(request: bool, data: st.DataObject, full: bool) -> None:
    messages = data.draw(st.lists(message(request=request), min_size=1, max_size=6))
    memo = FieldMemo()
    if full:  # a table at its bound empties itself on the next entry it keeps: both states are covered
        memo.rows.update({b"x-filler-%d: v" % i: (b"x", b"x", b"v") for i in range(ROWS_MAX)})
        memo.blocks.update({(b"x-filler: %d\r\n" % i, request): FILLER for i in range(BLOCKS_MAX)})
    for each in messages + messages:  # the second round finds every short head and line remembered
        first = _parsed(each, request, memo)
        assert first == _parsed(each, request, None)
        if first is not None and first != "no head":
            first[0].append((b"x", b"x", b"mutated"))  # what a caller does to one head never reaches the next
    assert len(memo.rows) <= ROWS_MAX and len(memo.blocks) <= BLOCKS_MAX


@SETTINGS
@given(
    names=st.lists(st.sampled_from([b"Host", b"host", b"Server", b"X-A", b"content-length"]), max_size=6),
    value=st.binary(min_size=0, max_size=4),
)
def test_write_head_in_order_matches_the_two_passes(names: list[bytes], value: bytes) -> None:
    rows = [(name, name.lower(), value) for name in names]
    if any(row[1] == b"host" for row in rows[1:]):
        return  # the caller's promise for in_order does not hold
    assert write_head(b"GET / HTTP/1.1\r\n", rows, in_order=True) == write_head(b"GET / HTTP/1.1\r\n", rows)


@SETTINGS
@given(request=st.booleans(), data=st.data())
def test_remembered_heads_read_as_fresh_ones(request: bool, data: st.DataObject) -> None:
    """Connections sharing one memo (as a proxy's do) read each head as a connection with a memo of its own."""
    messages = data.draw(st.lists(message(request=request), min_size=1, max_size=4))
    role = h11.SERVER if request else h11.CLIENT
    memo = FieldMemo()
    for each in messages + messages:
        shared, alone = H1Connection(role, memo=memo), H1Connection(role)
        if not request:  # a client reads a response to a request it sent
            for connection in (shared, alone):
                connection.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
                connection.send(h11.EndOfMessage())
        heads = [connection.receive_head(each) for connection in (shared, alone)]
        if heads[0] is None or heads[1] is None:
            assert heads[0] is heads[1] is None
            continue
        seen = [
            (normal(head.event()), head.framing, head.keep_alive, head.length, head.host, head.connection)
            for head in heads
        ]
        assert seen[0] == seen[1]
        assert (shared.our_state, shared.their_state, shared.trailing_data) == (
            alone.our_state,
            alone.their_state,
            alone.trailing_data,
        )


def test_a_chunk_whose_crlf_arrives_split_leaves_what_h11_leaves() -> None:
    """Only the CR of a chunk's closing CRLF here: h11 takes it at once, so trailing_data holds nothing."""
    slow = h11.Connection(h11.CLIENT)
    fast = H1Connection(h11.CLIENT)
    for connection in (slow, fast):
        connection.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        connection.send(h11.EndOfMessage())
    for piece in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r", b"\n0\r\n\r\n"):
        slow.receive_data(piece)
        fast.receive_data(piece)
        assert drain(fast) == drain(slow)
        assert fast.trailing_data == slow.trailing_data
    assert (fast.their_state, slow.their_state) == (h11.DONE, h11.DONE)
