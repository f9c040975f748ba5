"""HTTP/2 messages restored to HTTP/1.1: built without h11's second validation, so checked once on the way in.

h2translate builds h11 events directly (h1fast's constructors) after checking what HTTP/2 allows and HTTP/1.1
does not. The differential tests hold those checks and events equal to h11's own constructors; the machine
tests show that a message HTTP/1.1 cannot carry gets an answer (400, 502, a reset), not an exception.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h11
import pytest
from h2_peers import client_for
from hypothesis import example, given
from hypothesis import strategies as st

from tether.core.address import Address
from tether.core.discovery import StaticResolver
from tether.core.proxy import h2translate as tr

ORIG = (b"l5d-orig-proto", b"HTTP/1.1")
MESHED = StaticResolver(by_host={"web": [Address("10.0.0.9", 8080)]}, meshed_hosts={"web": 4143})
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# What h2 lets through in a field (RFC 9113 section 8.2.1): names of visible lower-case ASCII without ':',
# values without NUL, CR, LF or surrounding whitespace. Biased towards the bytes where HTTP/1.1 differs.
_NAME_BYTES = st.sampled_from(list(b'abcxyz019-_.!#~()/;<=>?@[]{}",') + [0x5C, 0x7E])
_VALUE_BYTES = st.sampled_from(list(b'abc 019\t,;="()') + [0x01, 0x0B, 0x0C, 0x7F, 0x80, 0xFF])
names = st.binary(min_size=1, max_size=6).filter(lambda name: name.islower() or not name.isalpha()) | st.lists(
    _NAME_BYTES, min_size=1, max_size=6
).map(bytes)
names = names.filter(lambda name: b":" not in name)  # as the comment says: h2 refuses them before translation
values = st.lists(_VALUE_BYTES, max_size=6).map(bytes).filter(lambda value: value[:1] not in b" \t" or not value)
values = values.filter(lambda value: value[-1:] not in (b" ", b"\t") or not value)
fields = st.lists(
    st.tuples(names | st.sampled_from([b"content-length", b"x-a"]), values | st.sampled_from([b"12", b"012", b"1 2"])),
    max_size=4,
)


def _h11_rows(make) -> list[tuple[bytes, bytes, bytes]] | None:
    try:
        return list(make().headers._full_items)
    except h11.LocalProtocolError:
        return None


@given(fields=fields)
@example(fields=[(b"content-length", b"12"), (b"content-length", b"12")])
@example(fields=[(b"content-length", b"12"), (b"content-length", b"012")])
@example(fields=[(b"a(b", b"1")])
@example(fields=[(b"x", b"a\x0bb")])
def test_h2translate_response_fields_fit_http1_exactly_when_h11_accepts_them(fields) -> None:
    fields = [(name.lower(), value) for name, value in fields if name not in (b"te", tr.ORIG_PROTO)]
    expected = _h11_rows(lambda: h11.Response(status_code=200, headers=fields, reason=b"OK"))
    try:
        tr.check_h1_fields(fields)
    except tr.TranslationError:
        assert expected is None, fields
        return
    assert expected is not None, fields
    assert list(tr.h1_response(200, fields, close=False).headers._full_items) == expected


@given(fields=fields, method=st.sampled_from([b"GET", b"POST", b"G(T", b"GE T"]), has_body=st.booleans())
@example(fields=[], method=b"GET", has_body=True)
def test_h2translate_requests_restored_to_http1_match_h11s_own(fields, method: bytes, has_body: bool) -> None:
    fields = [(name.lower(), value) for name, value in fields]
    pseudo = [(b":method", method), (b":scheme", b"http"), (b":authority", b"web"), (b":path", b"/a?b")]
    regular = [(name, value) for name, value in fields if name not in tr.CONNECTION_SPECIFIC and name != tr.ORIG_PROTO]
    headers = [(b"host", b"web"), *((n, v) for n, v in regular if n != b"te")]
    if has_body and not any(name == b"content-length" for name, _ in regular):
        headers.append((b"transfer-encoding", b"chunked"))
    expected = _h11_rows(lambda: h11.Request(method=method, target=b"/a?b", headers=headers))
    try:
        head = tr.head_from_h2([*pseudo, *fields, ORIG])
    except tr.TranslationError:
        assert expected is None, (method, fields)
        return
    assert expected is not None, (method, fields)
    request = tr.h1_request(head, has_body=has_body)
    assert (request.method, request.target, list(request.headers._full_items)) == (method, b"/a?b", expected)


@pytest.mark.parametrize(
    "extra",
    [[(b"a(b", b"1")], [(b"x", b"a\x0bb")], [(b"content-length", b"0" * 21)]],  # h11 allows 20 digits
    ids=["name", "value", "content-length"],
)
def test_inbound_h2_request_http1_cannot_carry_gets_400_on_its_stream(make_harness, extra) -> None:
    h = make_harness(endpoints=[Address("127.0.0.1", 80)], direction="inbound")
    client = client_for(h)
    stream = client.request("/", extra=[ORIG, *extra])
    client.read()
    assert dict(client.streams[stream].headers)[b":status"] == b"400"
    assert not h.connects, "nothing reaches the workload"
    assert client.conn_id not in h.closed


def _meshed_response(make_harness, headers, trailers=None) -> tuple[object, int, bytes]:
    """An HTTP/1.1 client's GET through the outbound proxy, answered by a bare HTTP/2 peer with ``headers``."""
    outbound = make_harness(resolver=MESHED)
    client = outbound.accept()
    outbound.recv(client, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    link = outbound.connects[-1].conn_id
    outbound.connected(link)
    wire = outbound.take(link)
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    events = peer.receive_data(wire[wire.index(PREFACE) :])
    (request,) = [event for event in events if isinstance(event, h2.events.RequestReceived)]
    peer.send_headers(request.stream_id, [(b":status", b"200"), *headers], end_stream=trailers is None)
    if trailers is not None:
        peer.send_data(request.stream_id, b"x")
        peer.send_headers(request.stream_id, trailers, end_stream=True)
    outbound.recv(link, peer.data_to_send())
    return outbound, client, outbound.take(client)


def test_meshed_response_http1_cannot_carry_gets_the_http1_client_a_502(make_harness) -> None:
    outbound, client, answer = _meshed_response(make_harness, [(b"x(y)", b"1")])
    assert answer.startswith(b"HTTP/1.1 502 ") and b"cannot be carried by HTTP/1.1" in answer


def test_meshed_trailers_http1_cannot_carry_reset_the_http1_client(make_harness) -> None:
    outbound, client, answer = _meshed_response(make_harness, [], trailers=[(b"x-sum", b"a\x0cb")])
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-sum" not in answer
    assert outbound.closed.get(client) is True, "a cut response is a reset, never a clean end"
