"""``IdentityAgent``: the identity client's calls on one HTTP/2 connection, against an in-memory service.

Each test names one behaviour of the connection the agent adds to the client: opened on demand and kept
for refreshes, a new id per connection, failures that fail the attempt at once (so the client's backoff
paces reconnections), calls abandoned when the attempt ends, and the driver's stale reports ignored.
"""

from __future__ import annotations

import random

import pytest
from agent_peers import IDENTITY, PKI, SERVICE, Harness, S, agent_config
from cryptography import x509
from tls_certs import EPOCH_S, new_key

from tether.core.effects import Close
from tether.core.identity.agent import (
    _LINK_TRANSITIONS,
    IdentityAgent,
    IdentityAgentUsageError,
    Link,
    _LinkInput,
)
from tether.core.identity.client import CertificateExpired, CertificateReady, Phase
from tether.core.identity.grpc_unary import GrpcStatus

TOKEN = b"tether1.token-for-web"


def certified(h: Harness) -> CertificateReady:
    """Run the first attempt to its certificate."""
    h.start()
    h.give_token(TOKEN)
    service = h.connect()
    h.open[h.current].certify(service.take_call(), h.key, wall_s=h.wall_s)
    h.deliver()
    [ready] = [effect for effect in h.other if isinstance(effect, CertificateReady)]
    return ready


def test_IdentityAgent_gets_a_certificate_over_one_connection_it_opens_on_demand():
    h = Harness()
    h.start()
    assert h.token_requests == [1] and not h.connects, "no connection before there is a call to make"
    h.give_token(TOKEN)
    assert h.connects == [1] and h.agent.link is Link.CONNECTING
    service = h.connect()
    call = service.take_call()
    assert call.request.identity == IDENTITY and call.request.token == TOKEN
    csr = x509.load_der_x509_csr(call.request.certificate_signing_request)
    assert csr.public_key() == h.key.public_key()
    assert call.headers[b":authority"] == str(SERVICE).encode()
    grpc_timeout = call.headers[b"grpc-timeout"]
    assert grpc_timeout == b"10000000u", "the call gets what is left of the attempt's 10 s"
    response = service.certify(call, h.key, wall_s=h.wall_s)
    assert not h.agent.ready
    h.deliver()
    [ready] = h.other
    assert isinstance(ready, CertificateReady)
    assert ready.leaf_der == response.leaf_certificate and ready.key is h.key
    assert ready.trust_anchors_pem == PKI.root.pem
    assert h.agent.ready and h.agent.metrics().refresh_count == 1
    assert h.agent.link is Link.OPEN and h.open, "the connection stays for the next refresh"
    assert h.agent.last_failure == ""


def test_IdentityAgent_refreshes_on_the_same_connection():
    h = Harness()
    certified(h)
    conn_id = h.current
    h.advance_to_deadline()  # 70 % of the hour: the refresh
    assert h.token_requests == [2]
    h.give_token()
    assert h.connects == [conn_id], "no new connection"
    service = h.service
    service.certify(service.take_call(), h.key, wall_s=h.wall_s)
    h.deliver()
    assert h.agent.metrics().refresh_count == 2


def test_IdentityAgent_connect_failure_fails_the_attempt_and_the_retry_connects_anew():
    h = Harness()
    h.start()
    h.give_token()
    h.refuse_connect("Connection refused")
    assert h.agent.link is Link.IDLE and h.agent.client.phase is Phase.WAITING
    [line] = h.logs
    assert f"cannot connect to the identity service at {SERVICE}: Connection refused" in line
    assert h.agent.last_failure == line
    retry_ns = h.agent.client.next_attempt_ns
    assert retry_ns is not None and S // 2 <= retry_ns - h.now_ns <= S, "the client's first backoff"
    h.advance_to_deadline()
    h.give_token()
    assert h.connects == [1, 2], "one connection per attempt, each with a new id"
    h.agent.connect_failed(1, "late report about the first connection", h.now_ns)  # stale: ignored
    assert h.drain() == [] and h.agent.link is Link.CONNECTING
    service = h.connect()
    service.certify(service.take_call(), h.key, wall_s=h.wall_s)
    h.deliver()
    assert h.agent.ready


def test_IdentityAgent_reconnection_attempts_back_off_while_the_service_stays_unreachable():
    h = Harness(seed=7)
    h.start()
    started_ns = []
    for _ in range(8):
        h.give_token()
        started_ns.append(h.now_ns)
        h.refuse_connect()
        h.advance_to_deadline()
    gaps_s = [(b - a) / S for a, b in zip(started_ns, started_ns[1:], strict=False)]
    ceilings = [1, 2, 4, 8, 16, 30, 30]
    assert all(c / 2 <= gap <= c for gap, c in zip(gaps_s, ceilings, strict=True)), gaps_s
    assert h.connects == list(range(1, 9)), "exactly one connection per attempt"


def test_IdentityAgent_a_refusal_fails_the_attempt_and_keeps_the_connection():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    service.refuse(service.take_call(), GrpcStatus.UNAUTHENTICATED, "the token proves nothing: expired")
    h.deliver()
    [line] = h.logs
    assert "UNAUTHENTICATED: the token proves nothing: expired" in line
    assert h.agent.link is Link.OPEN
    h.advance_to_deadline()
    h.give_token()
    assert h.connects == [1] and service.calls, "the retry rides the same connection"


def test_IdentityAgent_service_closing_mid_call_fails_it_and_closes_our_side():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    service.take_call()
    conn_id = h.current
    h.service_closes()
    assert "UNAVAILABLE: the server closed the connection" in h.logs[-1]
    assert h.closes == [Close(conn_id=conn_id)] and h.agent.link is Link.IDLE
    h.agent.received(conn_id, b"more", h.now_ns, h.wall_s)  # the driver may still report: ignored
    assert h.drain() == []


def test_IdentityAgent_reset_connection_fails_the_call_without_a_close():
    h = Harness()
    h.start()
    h.give_token()
    h.connect()
    h.reset()
    assert "UNAVAILABLE" in h.logs[-1] and "was reset" in h.logs[-1]
    assert h.closes == [] and h.agent.link is Link.IDLE


def test_IdentityAgent_idle_connection_lost_is_reopened_by_the_next_refresh():
    h = Harness()
    certified(h)
    h.reset()
    assert h.logs == [], "no call was in flight: nothing failed"
    h.advance_to_deadline()
    h.give_token()
    assert h.connects == [1, 2]


def test_IdentityAgent_attempt_timeout_while_connecting_abandons_the_connection():
    h = Harness()
    h.start()
    h.give_token()
    [conn_id] = h.connecting
    h.advance(10 * S)  # the attempt's deadline; the connect never completed
    assert h.closes == [Close(conn_id=conn_id, reset=True)] and h.agent.link is Link.IDLE
    assert "no answer within 10 s" in h.logs[-1]
    h.agent.connected(conn_id, h.now_ns)  # the driver's late success: ignored
    assert h.drain() == [] and h.agent.link is Link.IDLE


def test_IdentityAgent_call_gets_what_is_left_of_the_attempt_after_connecting():
    h = Harness()
    h.start()
    h.give_token()
    h.advance(4 * S)  # connecting took 4 s of the attempt's 10
    service = h.connect()
    assert service.take_call().headers[b"grpc-timeout"] == b"6000000u"


def test_IdentityAgent_connected_as_the_attempt_runs_out_sends_no_call_and_keeps_the_connection():
    h = Harness()
    h.start()
    h.give_token()
    h.now_ns += 10 * S  # the driver reports the connection before it fires the timer that is due
    service = h.connect()
    assert service.seen_calls == 0
    h.advance(0)
    assert "no answer within 10 s" in h.logs[-1]
    assert h.agent.link is Link.OPEN and not h.closes, "the new connection is kept for the retry"
    h.advance_to_deadline()
    h.give_token()
    assert service.seen_calls == 1 and h.connects == [1]


def test_IdentityAgent_call_deadline_cancels_the_stream_and_drops_the_connection():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    call = service.take_call()
    conn_id = h.current
    h.advance(10 * S)
    assert call.stream_id in service.reset_streams, "RST_STREAM reached the service before the close"
    assert h.closes == [Close(conn_id=conn_id)] and h.agent.link is Link.IDLE
    assert "DEADLINE_EXCEEDED" in h.logs[-1]
    h.advance_to_deadline()
    h.give_token()
    assert h.connects == [1, 2], "a connection that let a call time out is not reused"


def test_IdentityAgent_goaway_before_the_call_fails_it_and_the_next_attempt_reconnects():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    call = service.take_call()
    service.goaway(last_stream_id=0)  # the service never processed our stream
    h.deliver()
    assert "UNAVAILABLE" in h.logs[-1] and "GOAWAY" in h.logs[-1]
    assert h.agent.link is Link.IDLE and h.closes[-1].conn_id == 1
    assert call.stream_id == 1


def test_IdentityAgent_goaway_after_the_call_lets_it_finish_then_closes():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    call = service.take_call()
    service.goaway(last_stream_id=call.stream_id)
    h.deliver()
    assert h.agent.link is Link.OPEN and not h.closes
    service.certify(call, h.key, wall_s=h.wall_s)
    h.deliver()
    assert h.agent.ready and h.agent.link is Link.IDLE and h.closes == [Close(conn_id=1)]


@pytest.mark.parametrize(
    ("message", "mentions"),
    [
        (b"\x0a\x05abc", "does not decode"),  # a length past the end
        (b"\x0a\x01x", "has no valid_until"),
        (b"\x0a\x01x\x1a\x02\x08\x01", "does not parse as an identity certificate"),
    ],
)
def test_IdentityAgent_unusable_answers_fail_the_attempt(message: bytes, mentions: str):
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    service.answer(service.take_call(), message)
    h.deliver()
    assert mentions in h.logs[-1] and not h.agent.ready and h.agent.link is Link.OPEN


def test_IdentityAgent_response_over_its_limit_fails_the_call():
    h = Harness()
    h.start()
    h.give_token()
    service = h.connect()
    call = service.take_call()
    service.h2.send_headers(call.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    for _ in range(5):  # 5 x 16,000 bytes, each delivered so that the agent reopens the window
        service.h2.send_data(call.stream_id, b"z" * 16_000)
        h.deliver()
        if h.logs:
            break
    assert "RESOURCE_EXHAUSTED: the response is larger than 65536 bytes" in h.logs[-1]
    assert call.stream_id in service.reset_streams


def test_IdentityAgent_passes_the_expiry_through_and_fails_closed():
    h = Harness()
    certified(h)
    for _ in range(100):  # every refresh fails until the certificate runs out (18 min at up to 30 s apart)
        if h.agent.expired:
            break
        h.advance_to_deadline()
        if h.token_requests:
            h.agent.token_unreadable(h.token_requests.pop(), "no such file", h.now_ns)
            h.drain()
    assert h.agent.expired and not h.agent.ready
    assert any(isinstance(effect, CertificateExpired) for effect in h.other)
    assert "cannot read the token: no such file" in h.agent.last_failure


def test_IdentityAgent_refuses_reports_about_connections_it_never_asked_for():
    h = Harness()
    h.start()
    with pytest.raises(IdentityAgentUsageError):
        h.agent.connected(1, 0)
    h.give_token()
    with pytest.raises(IdentityAgentUsageError):
        h.agent.received(1, b"x", 0, EPOCH_S)  # before connected
    with pytest.raises(IdentityAgentUsageError):
        h.agent.closed(5, 0)


def test_IdentityAgent_allocates_connection_ids_from_where_it_is_told():

    agent = IdentityAgent(agent_config(), random.Random(1), first_conn_id=1000)
    agent.start(0, EPOCH_S)
    agent.effects()

    agent.key_issued(new_key(), 0)
    agent.effects()
    agent.token_read(1, b"t", 0)
    [connect] = agent.effects()
    assert connect.conn_id == 1000


@pytest.mark.parametrize("link", list(Link))
@pytest.mark.parametrize("event", list(_LinkInput))
def test_IdentityAgent_link_table_refuses_every_missing_pair(link, event):

    agent = IdentityAgent(agent_config(), random.Random(1))
    agent._link = link  # noqa: SLF001 - every pair of the table
    if (link, event) in _LINK_TRANSITIONS:
        agent._move(event)  # noqa: SLF001
        assert agent.link is _LINK_TRANSITIONS[(link, event)]
    else:
        with pytest.raises(AssertionError):
            agent._move(event)  # noqa: SLF001
