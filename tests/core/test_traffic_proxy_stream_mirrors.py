"""Mirroring on StreamExchanges: HTTP/2 and gRPC clients' requests, and HTTP/1.1 clients' requests to meshed
peers, copied to a shadow backend whose answers are discarded and which never holds the primary back."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2_peers import H2Peer, client_for

from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.proxy.routing import RoutesUpdated
from tether.core.traffic.faults import MIRROR_MAX_BODY_BYTES, MIRROR_MAX_IN_FLIGHT, MirrorGate, MirrorSkip
from tether.core.traffic.route_config import load_route_yaml

S = 1_000_000_000
A, SHADOW = Address("10.0.0.1", 80), Address("10.0.0.9", 80)
GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
MIRROR = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  rules:
    - filters:
        - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}, percent: 100}}
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-routed, value: "yes"}]}}
"""
H2_PREFACE = b"PRI * HTTP/2.0\r\n"


def mirrored(make_harness, resolver: StaticResolver | None = None, **config):
    """A harness whose requests are all mirrored to the service ``shadow``."""
    resolver = resolver or StaticResolver(default=[A], by_host={"shadow": [SHADOW]})
    h = make_harness(resolver=resolver, **config)
    h.proxy.control(RoutesUpdated(routes=load_route_yaml(MIRROR, "m.yaml")), h.now_ns)
    return h


def connect_id(h, address: Address, nth: int = 0) -> int:
    return [connect.conn_id for connect in h.connects if connect.address == address][nth]


def peer_at(h, address: Address, *, window: int | None = None, nth: int = 0) -> H2Peer:
    """The h2 endpoint of the proxy's ``nth`` connection to ``address`` (connected now). ``window``: it
    offers that initial stream window and never acknowledges what it receives."""
    conn_id = connect_id(h, address, nth)
    h.connected(conn_id)
    wire = h.take(conn_id)
    h.written[conn_id] = bytearray(wire[wire.index(H2_PREFACE) :])  # past a meshed peer's transport header
    peer = H2Peer(h, conn_id, client=False, auto_ack=window is None)
    if window is not None:
        peer.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
    peer.flush()
    peer.read()
    return peer


def upload(
    client: H2Peer, stream: int, body: bytes, *peers: H2Peer, end: bool = True, piece_bytes: int = 16_384
) -> None:
    """Send ``body`` as the client's windows allow; the ``peers`` read (and acknowledge) when they are shut."""
    sent = 0
    while sent < len(body):
        window = min(client.h2.local_flow_control_window(stream), piece_bytes)
        if window == 0:
            for peer in peers:
                peer.read()
            client.read()
            assert client.h2.local_flow_control_window(stream) > 0, f"the client's window stayed shut at {sent}"
            continue
        piece = body[sent : sent + window]
        sent += len(piece)
        client.h2.send_data(stream, piece, end_stream=end and sent == len(body))
        client.flush()


def only_stream(peer: H2Peer) -> int:
    peer.read()
    (stream_id,) = peer.streams
    return stream_id


def assert_all_released(h) -> None:
    proxy = h.proxy
    assert proxy._mirror_gate.in_flight == 0 and proxy._mirror_tickets == {} and proxy._streams == {}


def route_counters(h):
    (counters,) = (counters for _key, counters in h.proxy._route_stats.items())
    return counters


# ---------------------------------------------------------------- what the shadow gets, what the client sees


def test_an_h2_request_reaches_the_shadow_as_the_primary_sends_it(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/items?q=1", end=False, extra=[(b"l5d-retry-limit", b"3"), (b"x-app", b"1")])
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    upload(client, stream, b"payload")
    shadow_stream, primary_stream = only_stream(shadow), only_stream(primary)
    copy, original = shadow.streams[shadow_stream], primary.streams[primary_stream]
    assert copy.headers == original.headers  # method, path, authority, the rule's rewrite, no l5d-retry-*
    assert (b":path", b"/items?q=1") in copy.headers and (b"x-routed", b"yes") in copy.headers
    assert not any(name.startswith(b"l5d-retry-") for name, _ in copy.headers)
    assert bytes(copy.data) == bytes(original.data) == b"payload" and copy.ended
    counters = route_counters(h)
    assert (counters.mirrored, counters.mirror_skipped) == (1, 0)


def test_the_shadow_response_is_discarded_and_the_client_sees_the_primary_only(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    upload(client, stream, b"abc")
    shadow.respond(only_stream(shadow), 500, b"shadow says no", extra=[(b"x-shadow", b"1")])
    client.read()
    assert client.streams.get(stream) is None  # nothing of the shadow's answer reached the client
    primary.respond(only_stream(primary), 200, b"primary")
    client.read()
    answer = client.streams[stream]
    assert dict(answer.headers)[b":status"] == b"200" and b"x-shadow" not in dict(answer.headers)
    assert bytes(answer.data) == b"primary" and answer.ended and answer.reset is None
    assert_all_released(h)
    assert h.proxy.telemetry.services.service("shadow").requests == 1  # the copy is counted, as a request of its own


def test_request_trailers_reach_the_shadow(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    upload(client, stream, b"body", end=False)
    client.h2.send_headers(stream, [(b"x-checksum", b"42")], end_stream=True)
    client.flush()
    copy = shadow.streams[only_stream(shadow)]
    assert bytes(copy.data) == b"body" and copy.trailers == [(b"x-checksum", b"42")] and copy.ended
    assert primary.streams[only_stream(primary)].trailers == [(b"x-checksum", b"42")]


def test_a_grpc_call_is_mirrored_and_the_shadow_status_never_reaches_the_client(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/pkg.Svc/Call", end=False, extra=GRPC)
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    message = b"\0\0\0\0\x05hello"
    upload(client, stream, message)
    shadow_stream = only_stream(shadow)
    copy = shadow.streams[shadow_stream]
    assert (b"content-type", b"application/grpc") in copy.headers and (b"te", b"trailers") in copy.headers
    assert bytes(copy.data) == message
    shadow.h2.send_headers(shadow_stream, [(b":status", b"200"), (b"grpc-status", b"14")], end_stream=True)
    shadow.flush()
    primary.respond(only_stream(primary), 200, message, trailers=[(b"grpc-status", b"0")], extra=GRPC[:1])
    client.read()
    assert client.streams[stream].trailers == [(b"grpc-status", b"0")]
    assert bytes(client.streams[stream].data) == message
    assert_all_released(h)


# ---------------------------------------------------------------- the primary is never held back


def test_a_shadow_that_reads_nothing_never_holds_the_primary_back(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)
    shadow, primary = peer_at(h, SHADOW, window=0), peer_at(h, A)
    # 64 KiB, the gate's limit: more than the client's 65,535-byte window, so the upload completes only if the
    # proxy reopens it while the shadow has taken none of it.
    body = bytes(range(256)) * (MIRROR_MAX_BODY_BYTES // 256)
    upload(client, stream, body, primary)
    primary_stream = only_stream(primary)
    assert bytes(primary.streams[primary_stream].data) == body and primary.streams[primary_stream].ended
    shadow_stream = only_stream(shadow)
    assert shadow.streams[shadow_stream].data == b"" and not shadow.streams[shadow_stream].ended
    assert (h.proxy._mirror_gate.in_flight, h.proxy._mirror_gate.abandoned) == (1, 0)  # kept, only waiting
    primary.respond(primary_stream, 200, b"done")
    client.read()
    assert bytes(client.streams[stream].data) == b"done" and client.streams[stream].ended
    h.advance(10.5)  # the copy's response timeout: it ends, and only it
    shadow.read()
    assert shadow.streams[shadow_stream].reset == ErrorCodes.CANCEL
    assert_all_released(h)


def test_a_copy_the_shadow_does_not_take_is_abandoned_past_the_gate_backlog(make_harness) -> None:
    h = mirrored(make_harness)
    h.proxy._mirror_gate = MirrorGate(max_unsent_bytes=4096)
    client = client_for(h)
    stream = client.request("/", end=False)
    shadow, primary = peer_at(h, SHADOW, window=0), peer_at(h, A)
    body = b"q" * 20_000
    upload(client, stream, body, piece_bytes=1000)  # each piece within the backlog: only their sum is not
    shadow.read()
    (shadow_stream,) = shadow.streams
    assert shadow.streams[shadow_stream].reset == ErrorCodes.CANCEL
    assert h.proxy._mirror_gate.abandoned == 1 and h.proxy._mirror_gate.in_flight == 0
    primary_stream = only_stream(primary)
    assert bytes(primary.streams[primary_stream].data) == body
    primary.respond(primary_stream, 200, b"done")
    client.read()
    assert bytes(client.streams[stream].data) == b"done" and client.streams[stream].reset is None
    assert_all_released(h)


def test_a_long_shadow_response_is_consumed_so_the_shared_connection_never_stalls(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    streams = [client.request(f"/{n}") for n in range(3)]
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    shadow.read()
    big = b"s" * 400_000  # three of them pass the proxy's 1 MiB connection window, each its 64 KiB stream window
    for shadow_stream in sorted(shadow.streams):
        shadow.h2.send_headers(shadow_stream, [(b":status", b"200")])
        sent = 0
        while sent < len(big):
            window = min(shadow.h2.local_flow_control_window(shadow_stream), shadow.h2.max_outbound_frame_size)
            assert window > 0, f"the proxy stopped reading the shadow's response at {sent} bytes"
            shadow.h2.send_data(shadow_stream, big[sent : sent + window])
            sent += window
            shadow.flush()
            shadow.read()  # the proxy's WINDOW_UPDATEs
        shadow.h2.end_stream(shadow_stream)
        shadow.flush()
    primary.read()
    for primary_stream in sorted(primary.streams):
        primary.respond(primary_stream, 200, b"p")
    client.read()
    assert [bytes(client.streams[stream].data) for stream in streams] == [b"p"] * 3
    assert_all_released(h)


# ---------------------------------------------------------------- shadow failures


@pytest.mark.parametrize("failure", ["refused", "reset", "closed", "garbage"])
def test_a_failing_shadow_never_affects_the_primary(make_harness, failure: str) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)
    if failure == "refused":
        h.proxy.connect_failed(connect_id(h, SHADOW), "connection refused", h.now_ns)
        h.pump()
        primary = peer_at(h, A)
    else:
        shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    upload(client, stream, b"abc")
    if failure == "reset":
        shadow.h2.reset_stream(only_stream(shadow), ErrorCodes.INTERNAL_ERROR)
        shadow.flush()
    elif failure == "closed":
        h.recv(shadow.conn_id, b"")
    elif failure == "garbage":
        h.recv(shadow.conn_id, b"\0\0\x04\x09\0\0\0\0\x07junk")  # a CONTINUATION out of nowhere
    assert h.proxy._mirror_gate.in_flight == 0
    primary.respond(only_stream(primary), 200, b"fine")
    client.read()
    answer = client.streams[stream]
    assert dict(answer.headers)[b":status"] == b"200" and bytes(answer.data) == b"fine" and answer.reset is None
    assert client.conn_id not in h.closed
    assert_all_released(h)


def test_a_client_reset_mid_upload_cuts_the_copy(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    upload(client, stream, b"half of it", end=False)
    client.h2.reset_stream(stream, ErrorCodes.CANCEL)
    client.flush()
    shadow.read()
    copy = shadow.streams[only_stream(shadow)]
    assert bytes(copy.data) == b"half of it" and not copy.ended and copy.reset == ErrorCodes.CANCEL
    assert h.proxy._mirror_gate.abandoned == 1
    assert_all_released(h)
    del primary


# ---------------------------------------------------------------- the gate's limits


def test_a_content_length_past_the_limit_is_not_copied(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    length = str(MIRROR_MAX_BODY_BYTES + 1).encode()
    client.request("/", end=False, extra=[(b"content-length", length)])
    assert [connect.address for connect in h.connects] == [A]
    counters = route_counters(h)
    assert (counters.mirrored, counters.mirror_skipped) == (0, 1)
    assert h.proxy._mirror_gate.skipped[MirrorSkip.BODY_TOO_LARGE] == 1


def test_a_streamed_body_that_outgrows_the_limit_abandons_the_copy(make_harness) -> None:
    h = mirrored(make_harness)
    client = client_for(h)
    stream = client.request("/", end=False)  # no content-length: admitted, then watched
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    body = b"b" * (MIRROR_MAX_BODY_BYTES + 10_000)
    upload(client, stream, body, shadow, primary)
    shadow.read()
    copy = shadow.streams[only_stream(shadow)]
    assert len(copy.data) <= MIRROR_MAX_BODY_BYTES and copy.reset == ErrorCodes.CANCEL and not copy.ended
    primary_stream = only_stream(primary)
    assert bytes(primary.streams[primary_stream].data) == body
    assert h.proxy._mirror_gate.abandoned == 1
    primary.respond(primary_stream, 200, b"ok")
    client.read()
    assert client.streams[stream].ended and client.streams[stream].reset is None
    assert_all_released(h)


def test_copies_past_the_in_flight_cap_are_skipped(make_harness) -> None:
    h = mirrored(make_harness)
    first, second = client_for(h), client_for(h)
    for n in range(MIRROR_MAX_IN_FLIGHT):
        first.request(f"/{n}")
    shadow, primary = peer_at(h, SHADOW), peer_at(h, A)
    shadow.read()
    assert len(shadow.streams) == MIRROR_MAX_IN_FLIGHT
    late = second.request("/late")
    shadow.read()
    assert len(shadow.streams) == MIRROR_MAX_IN_FLIGHT  # not copied
    counters = route_counters(h)
    assert (counters.mirrored, counters.mirror_skipped) == (MIRROR_MAX_IN_FLIGHT, 1)
    for shadow_stream in list(shadow.streams):
        shadow.respond(shadow_stream, 204)
    assert h.proxy._mirror_gate.in_flight == 0
    again = second.request("/again")  # room again
    shadow.read()
    assert len(shadow.streams) == MIRROR_MAX_IN_FLIGHT + 1
    assert dict(shadow.streams[max(shadow.streams)].headers)[b":path"] == b"/again"
    answered: set[int] = set()
    while len(answered) < MIRROR_MAX_IN_FLIGHT + 2:  # the primaries, the last two once others made room
        primary.read()
        for primary_stream in [stream for stream in primary.streams if stream not in answered]:
            answered.add(primary_stream)
            primary.respond(primary_stream, 200, b"p")
    second.read()
    assert bytes(second.streams[late].data) == b"p" and bytes(second.streams[again].data) == b"p"


# ---------------------------------------------------------------- HTTP/1.1 clients of meshed peers


MESHED_WEB = Address("10.0.0.1", 8080)


def test_a_meshed_request_is_mirrored_over_h2_to_a_meshed_shadow(make_harness) -> None:
    resolver = StaticResolver(
        by_host={"web": [MESHED_WEB], "shadow": [SHADOW]}, meshed_hosts={"web": 4143, "shadow": 4143}
    )
    h = mirrored(make_harness, resolver)
    client = h.accept()
    h.recv(client, b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
    shadow = peer_at(h, Address(SHADOW.host, 4143))
    primary = peer_at(h, Address(MESHED_WEB.host, 4143))
    copy = shadow.streams[only_stream(shadow)]
    assert (b"l5d-orig-proto", b"HTTP/1.1") in copy.headers and bytes(copy.data) == b"abc" and copy.ended
    shadow.respond(only_stream(shadow), 503, b"shadow")
    primary.respond(only_stream(primary), 201, b"ok")
    assert_client_got_the_primary_answer(h.take(client))
    assert_all_released(h)


def assert_client_got_the_primary_answer(answer: bytes) -> None:
    """The HTTP/1.1 client got the primary's 201 "ok" (chunked, as it came over HTTP/2), nothing of the shadow's."""
    assert (
        answer.startswith(b"HTTP/1.1 201 ")
        and answer.endswith(b"\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        and b"shadow" not in answer
    )


def test_a_meshed_request_is_mirrored_as_http1_to_a_shadow_outside_the_mesh(make_harness) -> None:
    resolver = StaticResolver(by_host={"web": [MESHED_WEB], "shadow": [SHADOW]}, meshed_hosts={"web": 4143})
    h = mirrored(make_harness, resolver)
    client = h.accept()
    h.recv(client, b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
    shadow_id = connect_id(h, SHADOW)
    h.connected(shadow_id)
    request = h.take(shadow_id)
    assert request.startswith(b"POST /x HTTP/1.1\r\n") and request.endswith(b"\r\n\r\nabc")
    assert b"x-routed: yes" in request.lower() and b"l5d-orig-proto" not in request
    h.recv(shadow_id, b"HTTP/1.1 500 Oops\r\nContent-Length: 6\r\n\r\nshadow")
    primary = peer_at(h, Address(MESHED_WEB.host, 4143))
    primary.respond(only_stream(primary), 201, b"ok")
    assert_client_got_the_primary_answer(h.take(client))
    assert_all_released(h)
