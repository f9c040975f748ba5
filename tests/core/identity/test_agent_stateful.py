"""``IdentityAgent``'s own state, the connection, against a naive model, with Hypothesis.

The rules play the driver and the identity service: hand over tokens (or fail to read them), let connects
succeed or fail, answer calls (a certificate, a refusal, garbage), send GOAWAY before or after the call,
close or reset the connection, report stale events about earlier connections, and move both clocks (by
any amount or to the next deadline). The model is the link (idle, connecting, open), the current and last
connection ids, whether the open link took a GOAWAY, and where the call is (waiting for the connection, at
the service, or nowhere). After every step the agent must agree with it, and:

- the driver never holds more than one connection, and sends only on a connected one (agent_peers.Harness);
- each attempt of the client opens at most one connection, so the client's backoff paces reconnection;
- a call exists exactly while the client waits for Certify's answer (no orphan at the service, none lost);
- the agent always has a deadline armed: it can never wait forever.

The client's own schedule (backoff bounds, refresh at 70 %, expiry) is tested against its model in
test_identity_client.py; here the client is the real one and only its phase is read.
"""

from __future__ import annotations

from agent_peers import IDENTITY, Harness, S
from cryptography import x509
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tether.core.effects import Close
from tether.core.identity.agent import Link
from tether.core.identity.client import CertificateReady, Phase
from tether.core.identity.grpc_unary import GrpcStatus


class AgentMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(min_value=0, max_value=2**32), certified_first=st.booleans())
    def setup(self, seed: int, certified_first: bool) -> None:
        self.h = Harness(seed=seed)
        self.h.start()
        # The model.
        self.link = Link.IDLE
        self.current: int | None = None
        self.last_conn_id = 0
        self.goaway = False  # the open link took a GOAWAY that let our call finish
        self.call = "none"  # "none" | "waiting" (for the connection) | "at service"
        self.certificates = 0
        if certified_first:  # half the runs start from an open connection and a certificate
            self.give_token()
            self.connect_succeeds()
            self.service_answers("certificate", 3600)

    # ------------------------------------------------------------------ helpers

    @property
    def client_calling(self) -> bool:
        return self.h.agent.client.phase is Phase.CALLING

    def expect_closed(self, before: int, *, reset: bool = False) -> None:
        assert self.h.closes[before:] == [Close(conn_id=self.current, reset=reset)], self.h.closes[before:]
        self.link, self.current, self.goaway, self.call = Link.IDLE, None, False, "none"

    # ------------------------------------------------------------------ the driver

    @precondition(lambda self: self.h.agent.client.phase is Phase.AWAITING_TOKEN)
    @rule(readable=st.sampled_from([True, True, True, False]))
    def token(self, readable: bool) -> None:
        if readable:
            self.give_token()
        else:
            self.token_unreadable()

    def give_token(self) -> None:
        assert self.link is not Link.CONNECTING, "a new attempt never finds a connect of the last one"
        self.h.give_token()
        if self.link is Link.IDLE:
            self.last_conn_id += 1
            assert self.h.connects[-1] == self.last_conn_id and self.h.connecting == {self.last_conn_id}
            self.link, self.current, self.call = Link.CONNECTING, self.last_conn_id, "waiting"
        else:
            assert len(self.h.service.calls) == 1, "the call went out on the open connection"
            self.call = "at service"
            event("a call reused the open connection")

    def token_unreadable(self) -> None:
        self.h.agent.token_unreadable(self.h.token_requests.pop(), "permission denied", self.h.now_ns)
        self.h.drain()
        assert "cannot read the token: permission denied" in self.h.logs[-1]

    @precondition(lambda self: self.link is Link.CONNECTING)
    @rule(succeeds=st.sampled_from([True, True, True, False]))
    def connect_completes(self, succeeds: bool) -> None:
        if succeeds:
            self.connect_succeeds()
        else:
            self.connect_fails()

    def connect_succeeds(self) -> None:
        service = self.h.connect()
        assert len(service.calls) == 1 and service.calls[0].request.identity == IDENTITY
        csr = x509.load_der_x509_csr(service.calls[0].request.certificate_signing_request)
        assert csr.public_key() == self.h.key.public_key()
        self.link, self.call = Link.OPEN, "at service"

    def connect_fails(self) -> None:
        self.h.refuse_connect("Connection refused")
        assert "cannot connect to the identity service" in self.h.logs[-1]
        self.link, self.current, self.call = Link.IDLE, None, "none"
        event("a connect failed")

    # ------------------------------------------------------------------ the service

    @precondition(lambda self: self.call == "at service")
    @rule(
        answer=st.sampled_from(["certificate", "certificate", "refusal", "garbage"]),
        lifetime_s=st.integers(min_value=60, max_value=2 * 3600),
    )
    def service_answers(self, answer: str, lifetime_s: int) -> None:
        service = self.h.service
        call = service.take_call()
        if answer == "certificate":
            service.certify(call, self.h.key, wall_s=self.h.wall_s, lifetime_s=lifetime_s)
        elif answer == "refusal":
            service.refuse(call, GrpcStatus.FAILED_PRECONDITION, "the token proves another identity")
        else:
            service.answer(call, b"\xff\xff")
        before = len(self.h.closes)
        self.h.deliver()
        self.call = "none"
        if answer == "certificate":
            self.certificates += 1
            assert isinstance(self.h.other[-1], CertificateReady) and self.h.agent.ready
            event("a certificate was accepted")
        else:
            assert self.h.logs[-1]
        if self.goaway:
            self.expect_closed(before)
            event("a GOAWAY let the call finish, then the connection closed")

    @precondition(lambda self: self.link is Link.OPEN)
    @rule(how=st.sampled_from(["goaway", "goaway after the call", "eof", "reset"]))
    def connection_ends(self, how: str) -> None:
        """The service goes away (GOAWAY before or after our call), closes, or the connection is reset."""
        if how == "reset":
            self.connection_reset()
        elif how == "eof":
            self.service_closes()
        elif not self.goaway:
            self.service_goes_away(covers_the_call=how == "goaway after the call")

    def service_goes_away(self, covers_the_call: bool) -> None:
        service = self.h.service
        last_stream_id = service.calls[0].stream_id if covers_the_call and service.calls else 0
        service.goaway(last_stream_id)
        before = len(self.h.closes)
        self.h.deliver()
        if self.call == "at service" and last_stream_id:
            event("a GOAWAY covered the call in flight")
            self.goaway = True
            assert self.h.agent.link is Link.OPEN
        else:
            if self.call == "at service":
                assert "GOAWAY" in self.h.logs[-1]
            self.expect_closed(before)

    def service_closes(self) -> None:
        before = len(self.h.closes)
        self.h.service_closes()
        if self.call == "at service":
            assert "UNAVAILABLE" in self.h.logs[-1]
        self.expect_closed(before)

    def connection_reset(self) -> None:
        before = len(self.h.closes)
        self.h.reset()
        assert len(self.h.closes) == before, "the driver already knows: no Close"
        self.link, self.current, self.goaway, self.call = Link.IDLE, None, False, "none"

    @precondition(lambda self: self.last_conn_id >= 2 or (self.last_conn_id == 1 and self.current is None))
    @rule(data=st.data(), kind=st.sampled_from(["connected", "connect_failed", "received", "eof", "closed"]))
    def stale_report(self, data: st.DataObject, kind: str) -> None:
        """The driver reports on a connection the agent already forgot: nothing happens."""
        old = [conn_id for conn_id in range(1, self.last_conn_id + 1) if conn_id != self.current]
        conn_id = data.draw(st.sampled_from(old))
        h = self.h
        if kind == "connected":
            h.agent.connected(conn_id, h.now_ns)
        elif kind == "connect_failed":
            h.agent.connect_failed(conn_id, "late", h.now_ns)
        elif kind == "received":
            h.agent.received(conn_id, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", h.now_ns, h.wall_s)
        elif kind == "eof":
            h.agent.received(conn_id, b"", h.now_ns, h.wall_s)
        else:
            h.agent.closed(conn_id, h.now_ns)
        assert h.drain() == []
        event("a stale report was ignored")

    # ------------------------------------------------------------------ time

    @rule(
        to_the_deadline=st.sampled_from([False, False, True]),
        delta_ns=st.one_of(st.integers(min_value=0, max_value=2 * S), st.integers(min_value=0, max_value=3600 * S)),
        extra_ns=st.sampled_from([0, 0, 1]),
    )
    def advance(self, to_the_deadline: bool, delta_ns: int, extra_ns: int) -> None:
        """Time passes: by any amount, or to the next deadline (plus nothing or 1 ns)."""
        if to_the_deadline:
            deadline = self.h.agent.next_deadline_ns()
            assert deadline is not None
            delta_ns = max(0, deadline - self.h.now_ns) + extra_ns
        self.move_time(delta_ns)

    @precondition(lambda self: self.link is Link.OPEN and self.h.agent.client.phase is Phase.WAITING)
    @rule()
    def next_attempt_comes_due(self) -> None:
        """The refresh (or retry) is due while the connection is open: it should ride that connection."""
        next_attempt_ns = self.h.agent.client.next_attempt_ns
        assert next_attempt_ns is not None
        self.move_time(max(0, next_attempt_ns - self.h.now_ns))

    def move_time(self, delta_ns: int) -> None:
        before = len(self.h.closes)
        service_before = self.h.service if self.link is Link.OPEN else None
        stream = service_before.calls[0].stream_id if service_before and service_before.calls else None
        self.h.advance(delta_ns)
        if self.call == "none" or self.client_calling:
            assert self.h.closes[before:] == []
            return
        # The attempt ended while its call was out: the agent gives up on the connection it was using.
        if self.call == "waiting":
            event("the attempt timed out while connecting")
            self.expect_closed(before, reset=True)
        else:
            event("the call timed out at the service")
            assert service_before is not None and stream in service_before.reset_streams
            self.expect_closed(before)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def agrees_with_the_model(self) -> None:
        agent = self.h.agent
        assert agent.link is self.link and agent.conn_id == self.current
        assert agent.connects == self.last_conn_id == len(self.h.connects)
        assert agent.metrics().refresh_count == self.certificates

    @invariant()
    def one_connection_per_attempt_at_most(self) -> None:
        assert self.h.agent.connects <= self.h.agent.client.attempt

    @invariant()
    def a_call_exists_exactly_while_the_client_waits_for_it(self) -> None:
        at_service = self.h.service.calls if self.link is Link.OPEN else []
        if self.client_calling:
            assert (self.call, len(at_service)) in (("waiting", 0), ("at service", 1))
        else:
            assert self.call == "none" and at_service == []
            assert self.link is not Link.CONNECTING, "no connect without a call that needs it"

    @invariant()
    def a_deadline_is_always_armed(self) -> None:
        assert self.h.agent.next_deadline_ns() is not None


AgentMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_identity_agent_connection_follows_the_model = AgentMachine.TestCase
