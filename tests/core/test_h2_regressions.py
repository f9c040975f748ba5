"""HTTP/2 proxy bugs the state machines of test_h2_stateful.py found, shrunk to plain reproductions.

Each test names the behaviour the proxy should have; its docstring says what went wrong and where (names in
the present tense describe the code before the fix). While a bug stands, the state machines steer clear of
(or tolerate) its trigger under the name in ``KNOWN_BUGS`` (h2_stateful_support.py), so that they keep
guarding everything else. All of them are fixed now (the section headings name the commits), so the set is
empty and these tests guard against the bugs coming back. Each failed on the commit before its fix.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2_peers import H2Peer, client_for, endpoint_for

from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.effects import Close

S = 1_000_000_000
MESHED = StaticResolver(by_host={"web": [Address("10.0.0.9", 8080)]}, meshed_hosts={"web": 4143})
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _respond_in_windows(endpoint: H2Peer, stream_id: int, body: bytes, *, end: bool = True) -> None:
    """The endpoint writes ``body`` as its send window allows, reading the proxy's WINDOW_UPDATEs in between."""
    endpoint.h2.send_headers(stream_id, [(b":status", b"200")])
    sent = 0
    while sent < len(body):
        room = min(endpoint.h2.local_flow_control_window(stream_id), 16_384, len(body) - sent)
        assert room > 0, f"the endpoint's window closed after {sent} of {len(body)} bytes"
        endpoint.h2.send_data(stream_id, body[sent : sent + room])
        sent += room
        endpoint.flush()
        endpoint.read()
    if end:
        endpoint.h2.end_stream(stream_id)
        endpoint.flush()


def _read_on(client: H2Peer, stream: int) -> bytes:
    """A client that had stopped reading reads the stream to its end, reopening its window as it goes."""
    received = bytearray()
    for _ in range(10):
        client.read()
        received += client.streams[stream].data
        if client.streams[stream].data:
            client.h2.acknowledge_received_data(len(client.streams[stream].data), stream)
            client.streams[stream].data.clear()
            client.flush()
    return bytes(received)


def _meshed_endpoint(h, upstream_id: int) -> tuple[h2.connection.H2Connection, list[h2.events.Event]]:
    """A bare h2 server behind the meshed peer's port: it skips the transport header the proxy writes first."""
    wire = h.take(upstream_id)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    return server, server.receive_data(wire[wire.index(H2_PREFACE) :])


# ---------------------------------------------------------------------------------------------------------
# Fixed in adc6ae0 and 51460f3 (found by test_h2_stateful.py: protocol "http1", pool (1, 1), tight limits, chaos)


def test_client_goaway_that_closes_a_backed_up_connection_asks_nothing_more_of_it(make_harness) -> None:
    """setreading-after-close. A client whose last stream has ended sends GOAWAY while the proxy's writes to
    it are still unacknowledged past ``max_buffered_bytes``. h2flows.py, ``_h2_downstream_received`` calls
    ``_close_finished_h2``, which closes the connection, then ``_sync_h2_reading`` on it: the backed-up
    connection is no longer in ``_downstream``, but ``_set_reading`` still emits SetReading(enabled=False)
    for a connection the driver was just told to close."""
    h = make_harness(max_buffered_bytes=1024)
    client = client_for(h)
    stream = client.request("/")
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    h.auto_ack = False  # the proxy's writes to the client stay in the kernel's buffer from now on
    endpoint.respond(upstream_stream, 200, b"x" * 4000)
    assert h.proxy._downstream[client.conn_id].unsent_bytes > 1024, "the test needs a backed-up client"
    client.h2.close_connection()  # the client is done (it has not read the response yet)
    h.proxy.received(client.conn_id, client.h2.data_to_send(), h.now_ns)
    effects = [e for e in h.proxy.effects() if getattr(e, "conn_id", None) == client.conn_id]
    closes = [i for i, effect in enumerate(effects) if isinstance(effect, Close)]
    assert closes, f"the connection should close once its last stream is done: {effects}"
    assert closes[0] == len(effects) - 1, f"effects after the Close: {effects[closes[0] + 1 :]}"
    h.auto_ack = True
    client.h2.receive_data(bytes(h.written.get(client.conn_id, b"")))
    assert client.h2.streams[stream].closed


def test_endpoint_reset_mid_response_gives_back_the_connection_window_its_queued_bytes_used(make_harness) -> None:
    """reset-leaks-connection-window. The endpoint resets a stream whose response bytes still wait for the
    client's window (unacknowledged, so counted in ``sink_unacked``). h2upstream.py, ``_sink_reset`` clears
    ``sink_id`` before ``_abandon_stream``, so ``_credit_all`` finds no sink connection and zeroes
    ``sink_unacked`` without acknowledging it: the pooled connection's window shrinks by those bytes for
    good, and once it is spent every later response on that connection stalls with every peer reading."""
    h = make_harness(h2_connection_window=65_535)
    client = client_for(h)
    client.auto_ack = False  # a client that does not reopen its window
    first = client.request("/a")
    endpoint = endpoint_for(h)
    (upstream_first,) = endpoint.streams
    endpoint.h2.send_headers(upstream_first, [(b":status", b"200")])
    for _ in range(2):  # a window to the client, then a window the proxy holds for it
        for _ in range(4):
            room = min(endpoint.h2.local_flow_control_window(upstream_first), 16_384)
            endpoint.h2.send_data(upstream_first, b"x" * room)
        endpoint.flush()
        endpoint.read()
    exchange = h.proxy._streams[h.proxy._downstream[client.conn_id].streams[first]]
    assert exchange.sink_unacked > 30_000, "the test needs response bytes waiting for the client's window"
    endpoint.h2.reset_stream(upstream_first, ErrorCodes.INTERNAL_ERROR)
    endpoint.flush()
    client.read()
    assert client.streams[first].reset == ErrorCodes.INTERNAL_ERROR
    client.h2.acknowledge_received_data(len(client.streams[first].data), first)  # it read what it got
    client.auto_ack = True
    second = client.request("/b")
    endpoint.read()
    assert len(h.connects) == 1, "the second request should ride the same pooled connection"
    upstream_second = max(endpoint.streams)
    assert endpoint.h2.local_flow_control_window(upstream_second) >= 10_000, (
        f"connection window left to the endpoint: {endpoint.h2.outbound_flow_control_window}"
    )
    endpoint.respond(upstream_second, 200, b"y" * 10_000)
    client.read()
    assert client.streams[second].ended and bytes(client.streams[second].data) == b"y" * 10_000


# ---------------------------------------------------------------------------------------------------------
# Fixed in 78f35de


def test_endpoint_no_error_reset_after_its_whole_response_does_not_cut_what_the_client_has_yet_to_read(
    make_harness,
) -> None:
    """An endpoint that answers before the upload ended ends its response, then resets the stream with NO_ERROR
    to stop the upload (RFC 9113 section 8.1; nginx and Go's server do this). Since b4a5131 the exchange stays
    until the last response bytes have left for the client's window, so the reset can reach it first: h2upstream.py,
    ``_sink_reset`` hands NO_ERROR to ``_reset_source``, whose ``H2Session.reset`` drops the bytes still queued
    for the client, and the client gets RST_STREAM(NO_ERROR) without the end of a response the endpoint sent
    whole. After ``response_ended`` an endpoint's reset should only stop the upload."""
    h = make_harness()
    client = client_for(h)
    client.auto_ack = False  # a client that reads the response later
    stream = client.request("/upload", body=b"u" * 100, end=False)
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    body = bytes(range(256)) * 400  # 102,400 bytes: more than the client's window
    _respond_in_windows(endpoint, upstream_stream, body)
    endpoint.h2.reset_stream(upstream_stream, ErrorCodes.NO_ERROR)
    endpoint.flush()
    received = _read_on(client, stream)
    assert client.streams[stream].ended and received == body, (len(received), client.streams[stream].reset)


# ---------------------------------------------------------------------------------------------------------
# Fixed in 04636a1


def test_idle_h2_client_connection_closes_although_the_client_answers_keepalive_pings(make_harness) -> None:
    """keepalive-rearms-idle (downstream). h2flows.py, ``_h2_downstream_received`` calls ``_close_finished_h2``
    after every read, and for a connection with no streams that re-arms the ("idle", conn) deadline. The PING
    ACK a client sends back to the proxy's own keepalive PING is such a read, so with pings more frequent than
    the idle timeout (the defaults: 10 s and 60 s) an idle HTTP/2 client connection is never closed."""
    h = make_harness(idle_timeout_ns=30 * S, h2_keepalive_interval_ns=10 * S, h2_keepalive_timeout_ns=3 * S)
    client = client_for(h)  # answers every PING as it reads, as h2 (and every real client) does
    for _ in range(120):
        h.advance(1)
        if client.conn_id in h.closed:
            break
        client.read()
    assert client.conn_id in h.closed, "an HTTP/2 connection without streams outlived 4 idle timeouts"


def test_idle_pooled_h2_connection_closes_although_the_endpoint_answers_keepalive_pings(make_harness) -> None:
    """keepalive-rearms-idle (upstream). h2upstream.py, ``_stream_upstream_received`` ends with
    ``_h2_upstream_maybe_idle``, which re-arms the ("pool-idle", conn) deadline after every read of a
    connection with no streams, PING ACKs included: with a pool idle timeout longer than the keepalive interval
    an idle pooled connection to an endpoint that answers PINGs is never closed."""
    h = make_harness(pool_idle_timeout_ns=25 * S, h2_keepalive_interval_ns=10 * S, idle_timeout_ns=3600 * S)
    client = client_for(h)
    stream = client.request("/")
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    endpoint.respond(upstream_stream, 200, b"done")
    client.read()
    assert client.streams[stream].ended
    for _ in range(120):
        h.advance(1)
        if endpoint.conn_id in h.closed:
            break
        endpoint.read()
        client.read()
    assert endpoint.conn_id in h.closed, "a pooled HTTP/2 connection without streams outlived 4 idle timeouts"


def test_an_endpoints_103_crossing_the_proxys_reset_spares_the_other_streams(make_harness) -> None:
    """informational-after-reset. A client resets stream A; the proxy resets A towards the endpoint, which
    sent a 103 on A before it read that reset. h2 has no (CLOSED, RECV_INFORMATIONAL_HEADERS) transition, so
    ``H2Session.receive`` raises a connection error (RFC 9113 section 5.1 wants such a frame ignored) and
    ``_stream_upstream_received`` drops the whole endpoint connection: stream B, which had nothing to do with
    it, gets a 502. h2session.py could give h2 that transition, as it already patches GOAWAY's."""
    h = make_harness()
    client = client_for(h)
    first, second = client.request("/a"), client.request("/b")
    endpoint = endpoint_for(h)
    upstream_first, upstream_second = sorted(endpoint.streams)
    client.h2.reset_stream(first, ErrorCodes.CANCEL)
    client.flush()  # the proxy resets upstream_first; the endpoint has not read that yet
    endpoint.h2.send_headers(upstream_first, [(b":status", b"103")])
    endpoint.flush()
    assert endpoint.conn_id not in h.closed, h.errors
    endpoint.read()
    endpoint.respond(upstream_second, 200, b"for b")
    client.read()
    assert client.streams[second].data == b"for b", client.streams[second].headers


def test_bytes_queued_for_a_stream_the_endpoint_reset_are_released(make_harness) -> None:
    """queue-outlives-reset-stream (endpoint side). When an endpoint resets a stream, ``_h2_upstream_event``
    forgets the exchange but never tells the session: ``H2Session.forget`` exists and is never called, so the
    request bytes queued for the dead stream (up to a window per stream) stay in ``_outgoing`` until h2 happens
    to purge the stream and a later flush trips over it, or the connection closes."""
    h = make_harness()
    client = client_for(h)
    stream = client.request("/upload", body=b"a" * 16_000, end=False)
    conn_id = h.connects[-1].conn_id
    h.connected(conn_id)
    endpoint = H2Peer(h, conn_id, client=False, auto_ack=False)  # reads, but never reopens the window
    endpoint.flush()
    endpoint.read()
    for piece in (b"b", b"c", b"d", b"e", b"f"):
        client.h2.send_data(stream, piece * 16_000)
        client.flush()
        client.read()
        endpoint.read()
    upstream = h.proxy._upstream[conn_id]
    (upstream_stream,) = endpoint.streams
    assert upstream.h2.queued_bytes(upstream_stream) > 0, "the test needs bytes waiting for the endpoint's window"
    endpoint.h2.reset_stream(upstream_stream, ErrorCodes.REFUSED_STREAM)
    endpoint.flush()
    client.read()
    assert client.streams[stream].reset == ErrorCodes.REFUSED_STREAM
    assert upstream.h2.queued_bytes(upstream_stream) == 0


def test_bytes_queued_for_a_stream_the_client_reset_are_released(make_harness) -> None:
    """queue-outlives-reset-stream (client side). The same with the roles swapped: a client that reset its
    stream leaves the response bytes queued for it in the client connection's session (``_source_reset`` ends
    the exchange, nothing calls ``H2Session.forget``)."""
    h = make_harness()
    client = client_for(h)
    client.auto_ack = False  # a client that does not reopen its window
    stream = client.request("/big")
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    _respond_in_windows(endpoint, upstream_stream, b"x" * 100_000, end=False)
    session = h.proxy._downstream[client.conn_id].h2
    assert session.queued_bytes(stream) > 0, "the test needs bytes waiting for the client's window"
    client.h2.reset_stream(stream, ErrorCodes.CANCEL)
    client.flush()
    assert session.queued_bytes(stream) == 0


def test_proxy_error_response_to_an_unfinished_upload_reaches_the_client_whole(make_harness) -> None:
    """early-answer-truncated (the proxy's own answer). h2flows.py, ``_h2_error_response`` queues the error
    body and the end of the stream, then at once resets the stream with NO_ERROR because the upload has not
    ended; ``H2Session.reset`` drops what was queued. When the client's connection window is spent (another
    stream's response is waiting to be read), the client gets the 502 head and RST_STREAM(NO_ERROR): a
    response that never ends, where RFC 9113 section 8.1 allows NO_ERROR only after a complete one.
    (``_response_complete`` had the same flaw for endpoint responses; b4a5131 made it wait for the queue.)"""
    h = make_harness()
    client = client_for(h)
    client.auto_ack = False
    big = client.request("/big")
    upload = client.request("/upload", body=b"u" * 100, end=False)
    endpoint = endpoint_for(h)
    upstream_big, _upstream_upload = sorted(endpoint.streams)
    _respond_in_windows(endpoint, upstream_big, b"x" * 65_535)  # spends the client's connection window
    client.read()
    h.recv(endpoint.conn_id, b"")  # the endpoint goes away: the upload's stream fails with a 502
    client.read()
    assert dict(client.streams[upload].headers)[b":status"] == b"502"
    client.h2.acknowledge_received_data(65_535, big)  # the client reads on: its window opens
    client.flush()
    client.read()
    answer = client.streams[upload]
    assert answer.ended and answer.data.endswith(b"\n"), (bytes(answer.data), answer.reset)


def test_silent_http1_client_keeps_its_connection_past_the_detect_timeout(make_harness) -> None:
    """silent-http1-client-closed. With protocol "http1", a client that sends nothing before the detect
    timeout is HTTP/1.1 (``detect_http``), and tunnel.py's ``_decide`` then hands h11 the empty buffer:
    ``downstream.h11.receive_data(b"")``, which h11 reads as the end of the connection. The proxy closes a
    healthy keep-alive connection 10 s after accept, and a request that races the timer gets a FIN instead of
    a response. (``_start_h2_downstream`` already guards this very b"" since b4a5131.)"""
    h = make_harness(detect_timeout_ns=10 * S, idle_timeout_ns=60 * S)
    client = h.accept()
    h.advance(11)
    assert client not in h.closed, "closed a connection that had only been quiet for the detect timeout"
    h.recv(client, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert h.connects, "the request went nowhere"


def test_endpoint_no_error_reset_mid_response_resets_the_http1_client(make_harness) -> None:
    """no-error-reset-mid-response. An HTTP/1.1 client's request rides HTTP/2 to a meshed peer, which answers
    a head and part of the body, then RST_STREAM(NO_ERROR). ``_sink_reset`` hands the code to
    ``_reset_source``, which for an HTTP/1.1 client treats NO_ERROR as "the response is complete, the upload
    was cut short": it marks the connection closing, and ``_forget_stream`` closes it with a FIN. The client
    gets a truncated body ended like a whole one; h1flows.py's rule is to reset the client connection once a
    response cannot be finished."""
    h = make_harness(resolver=MESHED)
    client = h.accept()
    h.recv(client, b"GET /x HTTP/1.1\r\nHost: web\r\n\r\n")
    upstream = h.connects[-1].conn_id
    h.connected(upstream)
    server, events = _meshed_endpoint(h, upstream)
    (stream,) = [event.stream_id for event in events if isinstance(event, h2.events.RequestReceived)]
    server.send_headers(stream, [(b":status", b"200"), (b"content-length", b"10")])
    server.send_data(stream, b"12345")
    server.reset_stream(stream, ErrorCodes.NO_ERROR)
    h.recv(upstream, server.data_to_send())
    assert h.take(client).endswith(b"12345")
    assert h.closed.get(client) is True, "a cut response must end with a reset, not a FIN"


def test_drain_deadline_resets_http1_clients_of_meshed_peers(make_harness) -> None:
    """drain-ends-meshed-h1-with-fin. machine.py, ``_drain_expired`` abandons a client's exchanges and then
    closes the connection with reset=True. For an HTTP/1.1 client of a meshed peer, ``_abandon_client_streams``
    ends the StreamExchange, whose ``_forget_stream`` calls ``_next_request``, which closes the (closing)
    connection gracefully first: the reset that follows is a no-op, and a client waiting for its response
    gets a FIN, as if an idle connection had been closed."""
    h = make_harness(resolver=MESHED, drain_timeout_ns=1 * S)
    client = h.accept()
    h.recv(client, b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
    h.connected(h.connects[-1].conn_id)
    h.proxy.shutdown(h.now_ns)
    h.pump()
    h.advance(1.5)
    assert h.closed.get(client) is True, "an exchange cut at the drain deadline must end with a reset"


def test_a_stream_over_the_concurrency_limit_is_refused_not_the_connection(make_harness) -> None:
    """streams-over-limit-kill-connection. RFC 9113 section 5.1.2: a HEADERS frame that exceeds the advertised
    SETTINGS_MAX_CONCURRENT_STREAMS is a *stream* error (RST_STREAM with REFUSED_STREAM or PROTOCOL_ERROR),
    and until a client has read the proxy's SETTINGS the limit it knows is unlimited (section 6.5.2). h2
    raises ``TooManyStreamsError`` from ``receive_data``, which ``H2Session.receive`` turns into a connection
    error: GOAWAY(PROTOCOL_ERROR), and ``_h2_downstream_lost`` abandons the client's other streams."""
    h = make_harness(h2_max_concurrent_streams=2)
    client = H2Peer(h, h.accept(), client=True)
    first, second, third = (client.request(f"/{i}") for i in range(3))  # before reading the proxy's SETTINGS
    client.read()
    assert client.conn_id not in h.closed and client.goaway is None, h.errors
    assert client.streams[third].reset == ErrorCodes.REFUSED_STREAM
    endpoint = endpoint_for(h)
    for upstream_stream in sorted(endpoint.streams):
        endpoint.respond(upstream_stream, 200, b"ok")
    client.read()
    assert client.streams[first].data == client.streams[second].data == b"ok"


# ---------------------------------------------------------------------------------------------------------
# Fixed in b4a5131 (found by the simulator at the same time)


def test_endpoint_connection_window_is_credited_when_a_stream_ends_with_bytes_unacknowledged(make_harness) -> None:
    """A response that ended while part of it still waited for the client's window finished its exchange with
    ``sink_unacked`` bytes that ``_forget_stream`` could no longer credit (``_detach_sink`` had cleared
    ``sink_id``): the endpoint connection's window shrank by them for good, and the second such response on
    the connection stalled with every peer reading."""
    h = make_harness(h2_connection_window=65_535)
    client = client_for(h)
    client.auto_ack = False  # reads only once the whole response is out
    endpoint = None
    for round_ in range(3):
        stream = client.request(f"/{round_}")
        if endpoint is None:
            endpoint = endpoint_for(h)
        endpoint.read()
        _respond_in_windows(endpoint, max(endpoint.streams), b"x" * 100_000)
        received = 0
        for _ in range(10):
            client.read()
            received += len(client.streams[stream].data)
            if client.streams[stream].data:
                client.h2.acknowledge_received_data(len(client.streams[stream].data), stream)
                client.streams[stream].data.clear()
                client.flush()
            endpoint.read()
        assert client.streams[stream].ended and received == 100_000, (round_, received)


def test_response_that_ends_before_the_upload_reaches_the_client_whole(make_harness) -> None:
    """The endpoint answers, whole, before the client's upload ended. ``_response_complete`` ran when the end of
    the response was *queued* for the client, and reset the client's stream with NO_ERROR to stop the upload:
    ``H2Session.reset`` dropped the response bytes still waiting for the client's window, so the client got
    a window's worth of the body and RST_STREAM(NO_ERROR), with no END_STREAM."""
    h = make_harness()
    client = client_for(h)
    client.auto_ack = False  # reads the response later
    stream = client.request("/upload", body=b"u" * 100, end=False)
    endpoint = endpoint_for(h)
    (upstream_stream,) = endpoint.streams
    body = bytes(range(256)) * 400  # 102,400 bytes: more than the client's window
    _respond_in_windows(endpoint, upstream_stream, body)
    received = _read_on(client, stream)
    assert client.streams[stream].ended and received == body, (len(received), client.streams[stream].reset)


def test_meshed_http1_upload_is_read_again_once_a_window_update_drains_its_queue(make_harness) -> None:
    """An HTTP/1.1 client's upload to a meshed peer stops being read while its HTTP/2 queue is full
    (``_sync_h1_source_reading``); a WINDOW_UPDATE that emptied the queue only settled the exchange, so the
    client was never read again unless its HTTP/2 connection had been backed up past ``max_buffered_bytes``."""
    h = make_harness(resolver=MESHED)
    client = h.accept()
    body = bytes(range(256)) * 800  # 204,800 bytes
    head = b"POST /up HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % len(body)
    h.recv(client, head + body[:140_000])
    upstream = h.connects[-1].conn_id
    h.connected(upstream)
    server, events = _meshed_endpoint(h, upstream)
    rest, uploaded = body[140_000:], bytearray()
    for _ in range(50):
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                uploaded += event.data
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if len(uploaded) == len(body):
            break
        h.recv(upstream, server.data_to_send())
        if rest and h.reading.get(client, True):
            h.recv(client, rest)  # the driver reads the client only while the proxy asks it to
            rest = b""
        events = server.receive_data(h.take(upstream))
    assert bytes(uploaded) == body, f"the upload stalled at {len(uploaded)} bytes; reading: {h.reading.get(client)}"
