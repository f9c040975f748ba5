"""The proxy's identity client against a naive model of its schedule.

``IdentityClientMachine`` is a Hypothesis rule-based state machine: it plays the driver (issues the key,
reads tokens, answers Certify with real certificates, with failures, with certificates for another key, with
stale answers) and moves two clocks: the monotonic one forward by any amount, the wall clock with it or by
jumps either way. The model is a handful of numbers: the phase, the attempt number, the attempt's deadline,
when the next attempt is due (exactly, after a success; within [d/2, d] after the n-th consecutive failure,
d = min(30 s, 1 s * 2^(n-1))), the certificate's expiry and whether it expired. After every step the
machine's phase, ``ready``, ``expired``, metrics and ``next_deadline_ns()`` must equal the model's, and the
effects of every input must be exactly the ones the model expects.
"""

from __future__ import annotations

import math
import random

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from tls_certs import EPOCH_S, Pki, new_key

from tether.core.effects import LogError
from tether.core.identity.client import (
    _TRANSITIONS,
    CallCertify,
    CertificateExpired,
    CertificateReady,
    IdentityClient,
    IdentityClientConfig,
    IdentityClientUsageError,
    IdentityMetrics,
    Phase,
    ReadToken,
    RequestKey,
    _Input,
    backoff_delay_ns,
    build_csr,
    refresh_delay_ns,
)
from tether.core.identity.csr import validate_csr

S = 1_000_000_000
HOUR_S = 3600
IDENTITY = "web.shop.serviceaccount.identity.tether.cluster.local"
PKI = Pki.create("root.client-tests.test")
CONFIG = IdentityClientConfig(identity=IDENTITY, trust_anchors_pem=PKI.root.pem)


def backoff_ceiling_ns(failures: int) -> int:
    return min(30 * S, S * 2 ** (failures - 1))


def expected_refresh_ns(lifetime_ns: int) -> int:
    return min(24 * HOUR_S * S, max(10 * S, lifetime_ns * 70 // 100))


class IdentityClientMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(min_value=0, max_value=2**32))
    def setup(self, seed: int) -> None:
        self.client = IdentityClient(CONFIG, random.Random(seed))
        self.now_ns = 7 * S
        self.wall_s = float(EPOCH_S)
        self.key = None
        # The model.
        self.phase = Phase.IDLE
        self.attempt = 0
        self.attempt_deadline_ns: int | None = None
        self.next_attempt_ns: int | None = None
        self.failures_in_a_row = 0
        self.valid_until_s: float | None = None
        self.expiry_wake_ns: int | None = None
        self.expired = False
        self.refresh_count = 0
        self.failure_count = 0

        # Start and key issuance are over in one step each (the plain tests below cover their misuse).
        self.client.start(self.now_ns, self.wall_s)
        assert self.client.effects() == [RequestKey()]
        self.phase = Phase.AWAITING_KEY
        self.key = new_key()
        self.client.key_issued(self.key, self.now_ns)
        self.expect_attempt_begins()

    # ------------------------------------------------------------------ driver rules

    @precondition(lambda self: self.phase is Phase.AWAITING_TOKEN)
    @rule(token=st.binary(min_size=1, max_size=64))
    def read_token(self, token: bytes) -> None:
        self.client.token_read(self.attempt, token, self.now_ns)
        [call] = self.client.effects()
        assert isinstance(call, CallCertify)
        assert (call.attempt, call.identity, call.token) == (self.attempt, IDENTITY, token)
        assert call.timeout_ns == self.attempt_deadline_ns - self.now_ns
        assert_csr_is_ours(call.csr_der, self.key)
        self.phase = Phase.CALLING

    @precondition(lambda self: self.phase in (Phase.AWAITING_TOKEN, Phase.CALLING))
    @rule(
        outcome=st.sampled_from(["success", "success", "success", "failure", "another key"]),
        lifetime_s=st.one_of(
            st.integers(min_value=1, max_value=60),
            st.integers(min_value=60, max_value=3 * 24 * HOUR_S),
            st.sampled_from([24 * HOUR_S, 10 * 24 * HOUR_S]),
        ),
        valid_until_early_s=st.sampled_from([0, 0, 0, 1]),
    )
    def answer(self, outcome: str, lifetime_s: int, valid_until_early_s: int) -> None:
        """Certify answers: a real leaf for our key (valid_until may be a second before the leaf's notAfter),
        a failure, or a leaf for another key. The token is read first if it was not yet."""
        if self.phase is Phase.AWAITING_TOKEN:
            self.read_token(b"token")
        if outcome == "failure":
            self.client.certify_failed(self.attempt, "UNAVAILABLE: connection refused", self.now_ns)
            self.expect_failure(self.client.effects(), [], mentions="UNAVAILABLE: connection refused")
            return
        if outcome == "another key":
            self.answer_with_a_certificate_for_another_key()
            return
        not_after_s = math.floor(self.wall_s) + lifetime_s
        leaf = PKI.leaf(
            IDENTITY, key=self.key, not_before_s=self.wall_s - 60, lifetime_s=not_after_s - self.wall_s + 60
        )
        valid_until_s = min(float(not_after_s - valid_until_early_s), leaf.certificate.not_valid_after_utc.timestamp())
        self.client.certify_succeeded(self.attempt, leaf.der, leaf.chain_der, valid_until_s, self.now_ns, self.wall_s)
        expected = self.expect_expiry_check()
        if valid_until_s <= self.wall_s:  # a one-second lifetime made earlier by a second: unusable
            self.expect_failure(self.client.effects(), expected)
            return
        lifetime_ns = math.ceil((valid_until_s - self.wall_s) * S)
        event("a certificate was accepted")
        self.phase = Phase.WAITING
        self.failures_in_a_row = 0
        self.refresh_count += 1
        self.valid_until_s = valid_until_s
        self.expired = False
        self.attempt_deadline_ns = None
        self.next_attempt_ns = self.now_ns + expected_refresh_ns(lifetime_ns)
        self.expiry_wake_ns = self.now_ns + lifetime_ns
        expected.append(
            CertificateReady(
                identity=IDENTITY,
                leaf_der=leaf.der,
                intermediates_der=leaf.chain_der,
                key=self.key,
                trust_anchors_pem=PKI.root.pem,
                valid_until_s=valid_until_s,
            )
        )
        assert self.client.effects() == expected

    def answer_with_a_certificate_for_another_key(self) -> None:
        leaf = PKI.leaf(IDENTITY, not_before_s=self.wall_s - 60, lifetime_s=HOUR_S)
        valid_until_s = leaf.certificate.not_valid_after_utc.timestamp()
        self.client.certify_succeeded(self.attempt, leaf.der, leaf.chain_der, valid_until_s, self.now_ns, self.wall_s)
        expected = self.expect_expiry_check()
        self.expect_failure(self.client.effects(), expected, mentions="another key")

    @precondition(lambda self: self.phase is Phase.AWAITING_TOKEN)
    @rule()
    def token_unreadable(self) -> None:
        self.client.certify_failed(self.attempt, "cannot read the token file", self.now_ns)
        self.expect_failure(self.client.effects(), [], mentions="cannot read the token file")

    @precondition(lambda self: self.attempt >= 2 or (self.attempt == 1 and self.phase is Phase.WAITING))
    @rule(data=st.data(), kind=st.sampled_from(["token", "success", "failure"]))
    def stale_answer(self, data: st.DataObject, kind: str) -> None:
        """An answer for an attempt that is over (it timed out or failed) changes nothing."""
        newest_stale = self.attempt if self.phase is Phase.WAITING else self.attempt - 1
        stale = data.draw(st.integers(min_value=1, max_value=newest_stale))
        if kind == "token":
            self.client.token_read(stale, b"late token", self.now_ns)
        elif kind == "failure":
            self.client.certify_failed(stale, "late failure", self.now_ns)
        else:
            leaf = PKI.leaf(IDENTITY, key=self.key, not_before_s=self.wall_s - 60, lifetime_s=HOUR_S)
            valid_until_s = leaf.certificate.not_valid_after_utc.timestamp()
            self.client.certify_succeeded(stale, leaf.der, leaf.chain_der, valid_until_s, self.now_ns, self.wall_s)
        assert self.client.effects() == []
        event("a stale answer was ignored")

    @rule(
        delta_ns=st.one_of(
            st.integers(min_value=0, max_value=2 * S),
            st.integers(min_value=0, max_value=120 * S),
            st.integers(min_value=0, max_value=3 * 24 * HOUR_S * S),
        )
    )
    def advance(self, delta_ns: int) -> None:
        self.move_clocks(delta_ns)

    @precondition(lambda self: self.client.next_deadline_ns() is not None)
    @rule(extra_ns=st.sampled_from([0, 0, 1, 1000]))
    def advance_to_next_deadline(self, extra_ns: int) -> None:
        deadline = self.client.next_deadline_ns()
        assert deadline is not None
        self.move_clocks(max(0, deadline - self.now_ns) + extra_ns)

    @rule(jump_s=st.one_of(st.integers(min_value=-2 * HOUR_S, max_value=2 * HOUR_S), st.just(3 * 24 * HOUR_S)))
    def jump_wall_clock(self, jump_s: int) -> None:
        """NTP steps the wall clock; the machine hears of it with the next input that carries wall time."""
        self.wall_s += jump_s

    # ------------------------------------------------------------------ the model's schedule

    def move_clocks(self, delta_ns: int) -> None:
        self.now_ns += delta_ns
        self.wall_s += delta_ns / S
        deadline = self.client.next_deadline_ns()
        if deadline is None or deadline > self.now_ns:
            return
        self.client.on_timer(self.now_ns, self.wall_s)
        effects = self.client.effects()
        expected = self.expect_expiry_check()
        if self.attempt_deadline_ns is not None and self.now_ns >= self.attempt_deadline_ns:
            event("an attempt timed out")
            self.expect_failure(effects[: len(expected) + 1], expected, mentions="no answer within 10 s")
            expected = list(effects[: len(expected) + 1])
        if self.next_attempt_ns is not None and self.now_ns >= self.next_attempt_ns:
            event("a refresh began" if self.failures_in_a_row == 0 else "a retry began")
            expected.append(ReadToken(attempt=self.attempt + 1))
            self.expect_attempt_begins(effects=False)
        assert effects == expected

    def expect_attempt_begins(self, *, effects: bool = True) -> None:
        self.attempt += 1
        self.phase = Phase.AWAITING_TOKEN
        self.next_attempt_ns = None
        self.attempt_deadline_ns = self.now_ns + 10 * S
        if effects:
            assert self.client.effects() == [ReadToken(attempt=self.attempt)]

    def expect_expiry_check(self) -> list:
        """What any input with a wall time does first: expire, or re-arm the wake-up from the wall clock."""
        if self.valid_until_s is None or self.expired:
            return []
        remaining_s = self.valid_until_s - self.wall_s
        if remaining_s <= 0:
            self.expired = True
            self.expiry_wake_ns = None
            event("the certificate expired")
            return [CertificateExpired(identity=IDENTITY, valid_until_s=self.valid_until_s)]
        if self.now_ns >= self.expiry_wake_ns:
            event("the wall clock disagreed with the expiry wake-up")
            self.expiry_wake_ns = self.now_ns + max(1, math.ceil(remaining_s * S))
        return []

    def expect_failure(self, effects: list, before: list, mentions: str = "") -> None:
        """The attempt failed: one log line, and a retry within the backoff bounds."""
        assert effects[: len(before)] == before
        [log] = effects[len(before) :]
        assert isinstance(log, LogError) and IDENTITY in log.message and mentions in log.message
        self.phase = Phase.WAITING
        self.failures_in_a_row += 1
        self.failure_count += 1
        event(f"failures in a row: {min(self.failures_in_a_row, 6)}")
        self.attempt_deadline_ns = None
        ceiling = backoff_ceiling_ns(self.failures_in_a_row)
        retry_ns = self.client.next_attempt_ns
        assert retry_ns is not None
        assert self.now_ns + (ceiling + 1) // 2 <= retry_ns <= self.now_ns + ceiling, (self.failures_in_a_row, retry_ns)
        self.next_attempt_ns = retry_ns

    # ------------------------------------------------------------------ invariants

    @invariant()
    def matches_the_model(self) -> None:
        client = self.client
        assert client.phase is self.phase
        assert client.attempt == self.attempt
        assert client.expired == self.expired
        assert client.ready == (self.valid_until_s is not None and not self.expired)
        assert client.metrics() == IdentityMetrics(
            expiration_timestamp_s=self.valid_until_s,
            refresh_count=self.refresh_count,
            failure_count=self.failure_count,
        )
        armed = [d for d in (self.attempt_deadline_ns, self.next_attempt_ns, self.expiry_wake_ns) if d is not None]
        assert client.next_deadline_ns() == (min(armed) if armed else None)

    @invariant()
    def one_attempt_at_a_time_and_always_a_next_one(self) -> None:
        if self.phase in (Phase.AWAITING_TOKEN, Phase.CALLING):
            assert self.attempt_deadline_ns is not None and self.next_attempt_ns is None
        if self.phase is Phase.WAITING:
            assert self.next_attempt_ns is not None and self.attempt_deadline_ns is None


IdentityClientMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_identity_client_follows_its_schedule = IdentityClientMachine.TestCase


def assert_csr_is_ours(csr_der: bytes, key) -> None:
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [IDENTITY] and len(list(names)) == 1
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [IDENTITY]


# ------------------------------------------------------------------------------------------- plain tests


@settings(max_examples=200, deadline=None)
@given(failures=st.integers(min_value=1, max_value=200), seed=st.integers(min_value=0, max_value=2**32))
def test_backoff_delay_ns_stays_within_its_bounds(failures: int, seed: int):
    delay = backoff_delay_ns(failures, CONFIG, random.Random(seed))
    ceiling = backoff_ceiling_ns(failures)
    assert (ceiling + 1) // 2 <= delay <= ceiling <= 30 * S


@pytest.mark.parametrize(
    ("remaining_s", "refresh_s"),
    [(1, 10), (14, 10), (100, 70), (24 * HOUR_S, 60_480), (10 * 24 * HOUR_S, 24 * HOUR_S)],
)
def test_refresh_delay_ns_is_70_percent_clamped_to_10s_and_24h(remaining_s, refresh_s):
    assert refresh_delay_ns(remaining_s * S, CONFIG) == int(refresh_s * S)


def test_build_csr_names_the_identity_once():
    key = new_key()
    assert_csr_is_ours(build_csr(key, IDENTITY), key)


def test_build_csr_leaves_out_a_common_name_too_long_for_one_and_the_ca_accepts_it():
    long_identity = "a-service-account-with-a-long-name.shop.serviceaccount.identity.tether.cluster.local"
    assert len(long_identity) > 64
    key = new_key()
    csr_der = build_csr(key, long_identity)
    assert x509.load_der_x509_csr(csr_der).subject == x509.Name([])
    assert validate_csr(csr_der, long_identity) == key.public_key()


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(_Input))
def test_IdentityClient_transition_table_refuses_every_missing_pair(phase, event):
    client = IdentityClient(CONFIG, random.Random(1))
    client._phase = phase  # noqa: SLF001 - every pair of the table, as h2's test_state_machines does
    if (phase, event) in _TRANSITIONS:
        client._move(event)  # noqa: SLF001
        assert client.phase is _TRANSITIONS[(phase, event)]
    else:
        with pytest.raises(IdentityClientUsageError):
            client._move(event)  # noqa: SLF001


def test_IdentityClient_refuses_answers_nobody_asked_for():
    client = IdentityClient(CONFIG, random.Random(1))
    with pytest.raises(IdentityClientUsageError):
        client.key_issued(new_key(), 0)  # before start
    client.start(0, EPOCH_S)
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(IdentityClientUsageError):
        client.key_issued(ec.generate_private_key(ec.SECP384R1()), 0)
    client.key_issued(new_key(), 0)
    with pytest.raises(IdentityClientUsageError):
        client.certify_failed(2, "an attempt that was never made", 0)
    with pytest.raises(IdentityClientUsageError):
        client.certify_succeeded(1, b"", (), EPOCH_S + 60, 0, EPOCH_S)  # attempt 1 has not called Certify yet


def test_IdentityClient_is_ready_only_after_its_first_certificate_and_fails_closed_at_expiry():
    client = IdentityClient(CONFIG, random.Random(1))
    key = new_key()
    client.start(0, EPOCH_S)
    client.key_issued(key, 0)
    client.token_read(1, b"token", 0)
    assert not client.ready and client.metrics().samples() == [("identity_cert_refresh_count", 0.0)]
    leaf = PKI.leaf(IDENTITY, key=key, not_before_s=EPOCH_S - 60, lifetime_s=160)  # 100 s left
    client.certify_succeeded(1, leaf.der, leaf.chain_der, EPOCH_S + 100, 0, EPOCH_S)
    assert client.ready and not client.expired
    assert client.next_deadline_ns() == 70 * S  # the refresh
    client.effects()
    client.on_timer(70 * S, EPOCH_S + 70)
    assert client.effects() == [ReadToken(attempt=2)]
    client.certify_failed(2, "UNAVAILABLE", 71 * S)
    client.on_timer(100 * S, EPOCH_S + 100)
    effects = client.effects()
    assert CertificateExpired(identity=IDENTITY, valid_until_s=EPOCH_S + 100) in effects
    assert client.expired and not client.ready
    assert client.metrics().samples() == [
        ("identity_cert_expiration_timestamp_seconds", EPOCH_S + 100.0),
        ("identity_cert_refresh_count", 1.0),
    ]


def test_IdentityClient_rearms_its_expiry_wake_up_when_the_wall_clock_went_back():
    client = IdentityClient(
        IdentityClientConfig(identity=IDENTITY, trust_anchors_pem=b"", refresh_min_ns=200 * S), random.Random(1)
    )
    key = new_key()
    client.start(0, EPOCH_S)
    client.key_issued(key, 0)
    client.token_read(1, b"token", 0)
    leaf = PKI.leaf(IDENTITY, key=key, not_before_s=EPOCH_S - 60, lifetime_s=160)
    client.certify_succeeded(1, leaf.der, leaf.chain_der, EPOCH_S + 100, 0, EPOCH_S)
    assert client.next_deadline_ns() == 100 * S  # the expiry wake-up comes before the 200 s refresh
    client.on_timer(100 * S, EPOCH_S + 50)  # NTP stepped the wall clock back 50 s meanwhile
    assert not client.expired and client.next_deadline_ns() == 150 * S
    client.on_timer(150 * S, EPOCH_S + 100)
    assert client.expired and not client.ready
