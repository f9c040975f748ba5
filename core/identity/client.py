"""The proxy's identity client: its key, its CSR, and a certificate from Certify that it keeps fresh.

Theory of operation
-------------------
One ``IdentityClient`` per proxy. It owns no key material of its own making: it asks the driver for an ECDSA
P-256 key once (``RequestKey``, answered by ``key_issued``), builds one CSR from it (exactly one DNS SAN and
the common name, both the identity) and reuses that CSR for every call, as Linkerd's proxy does: the key never
leaves the process and only the certificate rotates.

Each attempt to get a certificate has a number. An attempt first asks for the service-account token
(``ReadToken``, answered by ``token_read``): Kubernetes rotates projected tokens, so it is read afresh every
time. Then it calls Certify (``CallCertify``), answered by ``certify_succeeded`` or ``certify_failed``.
Answers that name an attempt other than the current one are stale (the attempt timed out, or the driver
repeated itself) and are ignored. An attempt that has no answer after ``attempt_timeout_ns`` fails.

Phases (``_TRANSITIONS``; a pair missing from the table is caller misuse, ``IdentityClientUsageError``)::

    IDLE --start--> AWAITING_KEY --key--> AWAITING_TOKEN --token--> CALLING --success--> WAITING (refresh)
                                               ^                       |--failure/timeout--> WAITING (backoff)
                                               +--------attempt due--- WAITING

After a certificate arrives the next attempt is due at 70 % of its remaining validity, clamped to
[10 s, 24 h]. After a failure it is due after an exponential backoff with jitter from the injected RNG:
the n-th consecutive failure waits between d/2 and d, d = min(backoff_max_ns, backoff_base_ns * 2^(n-1)),
by default 0.5-1 s for the first and 15-30 s from the sixth on. Attempts never stop (a proxy without
identity can serve nothing meshed); their rate is bounded instead: one attempt in flight, at least
``backoff_base_ns / 2`` apart while failing.

Certificate state is orthogonal to the phase. ``ready`` turns true with the first certificate (the proxy's
/ready) and false again if the certificate expires with no renewal: the client then emits
``CertificateExpired`` and the proxy fails closed (no mTLS with an expired certificate) until a new one
arrives. Expiry is judged on the wall clock (``wall_time_s``), which is what peers check a certificate
against; the monotonic deadline only wakes the client up, and is re-armed if the wall clock disagrees.

Metrics are plain data (``metrics()``): the certificate's expiration timestamp and the refresh count
(certificates accepted, the first one included), rendered by the admin adapter as
``identity_cert_expiration_timestamp_seconds`` and ``identity_cert_refresh_count``.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tether.core.effects import LogError
from tether.core.identity.leaf import COMMON_NAME_BYTES_MAX

NS_PER_S = 1_000_000_000


class IdentityClientUsageError(Exception):
    """The driver called the client out of order (a key nobody asked for, an answer to no call)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityClientConfig:
    """Who the proxy is and how it paces its calls; the defaults are the documented limits."""

    identity: str
    trust_anchors_pem: bytes
    refresh_percent: int = 70  # integer arithmetic: a schedule that a model can predict to the nanosecond
    refresh_min_ns: int = 10 * NS_PER_S
    refresh_max_ns: int = 24 * 3600 * NS_PER_S
    backoff_base_ns: int = 1 * NS_PER_S
    backoff_max_ns: int = 30 * NS_PER_S
    attempt_timeout_ns: int = 10 * NS_PER_S  # reading the token and the Certify call together

    def __post_init__(self) -> None:
        assert self.identity and self.identity == self.identity.lower(), self.identity
        assert 0 < self.refresh_percent < 100, self.refresh_percent
        assert 0 < self.refresh_min_ns <= self.refresh_max_ns
        assert 0 < self.backoff_base_ns <= self.backoff_max_ns
        assert self.attempt_timeout_ns > 0


# ---------------------------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestKey:
    """Emitted once at ``start``: generate an ECDSA P-256 private key and answer ``key_issued(key)``.
    The adapter uses cryptography's ``ec.generate_private_key(ec.SECP256R1())``; so does the simulator."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadToken:
    """Read the service-account token now and answer ``token_read(attempt, token)`` (or, if it cannot be
    read, ``certify_failed(attempt, reason)``)."""

    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CallCertify:
    """Call Identity/Certify with these fields, giving up after ``timeout_ns`` (the attempt's remaining
    time, for grpc-timeout); answer ``certify_succeeded`` or ``certify_failed`` with the same ``attempt``."""

    attempt: int
    identity: str
    token: bytes
    csr_der: bytes
    timeout_ns: int

    def __repr__(self) -> str:
        return (
            f"CallCertify(attempt={self.attempt}, identity={self.identity!r}, token=<{len(self.token)} bytes>, "
            f"csr_der=<{len(self.csr_der)} bytes>, timeout_ns={self.timeout_ns})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateReady:
    """A new certificate: build new TLS contexts from it (``tls.TlsContexts.build``) for new connections."""

    identity: str
    leaf_der: bytes
    intermediates_der: tuple[bytes, ...]
    key: ec.EllipticCurvePrivateKey
    trust_anchors_pem: bytes
    valid_until_s: float

    def __repr__(self) -> str:
        return (
            f"CertificateReady(identity={self.identity!r}, leaf_der=<{len(self.leaf_der)} bytes>, "
            f"intermediates_der=<{len(self.intermediates_der)} certificates>, key=<hidden>, "
            f"valid_until_s={self.valid_until_s!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CertificateExpired:
    """The certificate expired with no renewal: stop using it (fail closed) until the next CertificateReady."""

    identity: str
    valid_until_s: float


IdentityEffect = RequestKey | ReadToken | CallCertify | CertificateReady | CertificateExpired | LogError


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityMetrics:
    """``expiration_timestamp_s`` of the current certificate (None before the first) and how many
    certificates were accepted; ``failure_count`` counts failed attempts (timeouts included)."""

    expiration_timestamp_s: float | None
    refresh_count: int
    failure_count: int

    def samples(self) -> list[tuple[str, float]]:
        """(Prometheus name, value) pairs; the expiration is absent before the first certificate."""
        out = [("identity_cert_refresh_count", float(self.refresh_count))]
        if self.expiration_timestamp_s is not None:
            out.insert(0, ("identity_cert_expiration_timestamp_seconds", float(self.expiration_timestamp_s)))
        return out


# ---------------------------------------------------------------------------------------------- phases


class Phase(enum.Enum):
    IDLE = "idle"
    AWAITING_KEY = "awaiting key"
    AWAITING_TOKEN = "awaiting token"
    CALLING = "calling"
    WAITING = "waiting"  # for the next attempt: a refresh, or a retry after backoff


class _Input(enum.Enum):
    START = "start"
    KEY_ISSUED = "key issued"
    TOKEN_READ = "token read"
    SUCCEEDED = "certify succeeded"
    FAILED = "attempt failed"  # Certify failed, the token could not be read, the answer was unusable
    TIMED_OUT = "attempt timed out"
    ATTEMPT_DUE = "attempt due"


_TRANSITIONS: dict[tuple[Phase, _Input], Phase] = {
    (Phase.IDLE, _Input.START): Phase.AWAITING_KEY,
    (Phase.AWAITING_KEY, _Input.KEY_ISSUED): Phase.AWAITING_TOKEN,
    (Phase.AWAITING_TOKEN, _Input.TOKEN_READ): Phase.CALLING,
    (Phase.AWAITING_TOKEN, _Input.FAILED): Phase.WAITING,
    (Phase.AWAITING_TOKEN, _Input.TIMED_OUT): Phase.WAITING,
    (Phase.CALLING, _Input.SUCCEEDED): Phase.WAITING,
    (Phase.CALLING, _Input.FAILED): Phase.WAITING,
    (Phase.CALLING, _Input.TIMED_OUT): Phase.WAITING,
    (Phase.WAITING, _Input.ATTEMPT_DUE): Phase.AWAITING_TOKEN,
}


@dataclass(frozen=True, slots=True)
class _Certificate:
    leaf_der: bytes
    valid_until_s: float


# ---------------------------------------------------------------------------------------------- machine


class IdentityClient:
    """See the module docstring."""

    def __init__(self, config: IdentityClientConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._phase = Phase.IDLE
        self._effects: list[IdentityEffect] = []
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._csr_der = b""
        self._attempt = 0
        self._attempt_deadline_ns: int | None = None  # while AWAITING_TOKEN or CALLING
        self._next_attempt_ns: int | None = None  # while WAITING
        self._consecutive_failures = 0
        self._certificate: _Certificate | None = None
        self._expiry_wake_ns: int | None = None  # while a certificate is held and not expired
        self._expired = False
        self._refresh_count = 0
        self._failure_count = 0

    # ---------------------------------------------------------------- state

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def ready(self) -> bool:
        """A certificate is held and has not expired (the proxy's /ready)."""
        return self._certificate is not None and not self._expired

    @property
    def expired(self) -> bool:
        """The certificate expired and no renewal came: fail closed."""
        return self._expired

    @property
    def next_attempt_ns(self) -> int | None:
        """When the next attempt is due (a refresh or a retry), while WAITING; None otherwise."""
        return self._next_attempt_ns

    @property
    def attempt(self) -> int:
        """The number of the current (or last) attempt; 0 before the first."""
        return self._attempt

    def metrics(self) -> IdentityMetrics:
        expiration = self._certificate.valid_until_s if self._certificate is not None else None
        return IdentityMetrics(
            expiration_timestamp_s=expiration, refresh_count=self._refresh_count, failure_count=self._failure_count
        )

    def effects(self) -> list[IdentityEffect]:
        effects, self._effects = self._effects, []
        return effects

    def next_deadline_ns(self) -> int | None:
        deadlines = [self._attempt_deadline_ns, self._next_attempt_ns, self._expiry_wake_ns]
        armed = [deadline for deadline in deadlines if deadline is not None]
        return min(armed) if armed else None

    def _move(self, event: _Input) -> None:
        target = _TRANSITIONS.get((self._phase, event))
        if target is None:
            raise IdentityClientUsageError(f"{event.value} is not expected while {self._phase.value}")
        self._phase = target

    # ---------------------------------------------------------------- inputs

    def start(self, now_ns: int, wall_time_s: float) -> None:
        """Begin: ask for the key. ``now_ns``/``wall_time_s`` only mark when (no deadline is armed)."""
        del now_ns, wall_time_s  # the key request has no timeout: generating a key cannot fail usefully
        self._move(_Input.START)
        self._effects.append(RequestKey())

    def key_issued(self, key: ec.EllipticCurvePrivateKey, now_ns: int) -> None:
        """The key ``RequestKey`` asked for; the first attempt starts at once."""
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise IdentityClientUsageError("the identity key must be an ECDSA P-256 private key")
        self._move(_Input.KEY_ISSUED)
        self._key = key
        self._csr_der = build_csr(key, self.config.identity)
        self._begin_attempt(now_ns)

    def token_read(self, attempt: int, token: bytes, now_ns: int) -> None:
        """The token ``ReadToken(attempt)`` asked for: call Certify with it."""
        if self._is_stale(attempt):
            return
        self._move(_Input.TOKEN_READ)
        assert self._attempt_deadline_ns is not None
        timeout_ns = max(1, self._attempt_deadline_ns - now_ns)
        self._effects.append(
            CallCertify(
                attempt=attempt,
                identity=self.config.identity,
                token=token,
                csr_der=self._csr_der,
                timeout_ns=timeout_ns,
            )
        )

    def certify_succeeded(
        self,
        attempt: int,
        leaf_der: bytes,
        intermediates_der: tuple[bytes, ...] | list[bytes],
        valid_until_s: float,
        now_ns: int,
        wall_time_s: float,
    ) -> None:
        """Certify answered: keep the certificate if it is ours and still valid; otherwise this attempt failed."""
        if self._is_stale(attempt):
            return
        if self._phase is not Phase.CALLING:
            raise IdentityClientUsageError(f"certify_succeeded while {self._phase.value}: no call was made")
        self._check_expiry(now_ns, wall_time_s)
        examined = self._examine(leaf_der, valid_until_s, wall_time_s)
        if isinstance(examined, str):
            self._attempt_failed(_Input.FAILED, f"the identity service's answer is unusable: {examined}", now_ns)
            return
        self._move(_Input.SUCCEEDED)
        self._accept(leaf_der, tuple(intermediates_der), examined)
        lifetime_ns = math.ceil((examined - wall_time_s) * NS_PER_S)
        assert lifetime_ns > 0, "an expired answer is a failure"
        self._attempt_deadline_ns = None
        self._next_attempt_ns = now_ns + refresh_delay_ns(lifetime_ns, self.config)
        self._expiry_wake_ns = now_ns + lifetime_ns

    def certify_failed(self, attempt: int, reason: str, now_ns: int) -> None:
        """The attempt failed (Certify refused or was unreachable, or the token could not be read)."""
        if self._is_stale(attempt):
            return
        self._attempt_failed(_Input.FAILED, reason, now_ns)

    def on_timer(self, now_ns: int, wall_time_s: float) -> None:
        """Call once ``next_deadline_ns()`` has passed: expiry, attempt timeouts and due attempts."""
        self._check_expiry(now_ns, wall_time_s)
        if self._attempt_deadline_ns is not None and now_ns >= self._attempt_deadline_ns:
            timeout_s = self.config.attempt_timeout_ns / NS_PER_S
            self._attempt_failed(_Input.TIMED_OUT, f"no answer within {timeout_s:g} s", now_ns)
        if self._next_attempt_ns is not None and now_ns >= self._next_attempt_ns:
            self._move(_Input.ATTEMPT_DUE)
            self._next_attempt_ns = None
            self._begin_attempt(now_ns)

    # ---------------------------------------------------------------- helpers

    def _is_stale(self, attempt: int) -> bool:
        if attempt > self._attempt:
            raise IdentityClientUsageError(f"an answer for attempt {attempt}, which was never made")
        return attempt != self._attempt or self._phase not in (Phase.AWAITING_TOKEN, Phase.CALLING)

    def _begin_attempt(self, now_ns: int) -> None:
        assert self._phase is Phase.AWAITING_TOKEN and self._key is not None
        self._attempt += 1
        self._attempt_deadline_ns = now_ns + self.config.attempt_timeout_ns
        self._effects.append(ReadToken(attempt=self._attempt))

    def _attempt_failed(self, event: _Input, reason: str, now_ns: int) -> None:
        self._move(event)
        self._consecutive_failures += 1
        self._failure_count += 1
        delay_ns = backoff_delay_ns(self._consecutive_failures, self.config, self._rng)
        self._attempt_deadline_ns = None
        self._next_attempt_ns = now_ns + delay_ns
        self._effects.append(
            LogError(
                conn_id=None,
                message=f"identity: attempt {self._attempt} to certify {self.config.identity} failed: {reason}; "
                f"retrying in {delay_ns / NS_PER_S:.2f} s",
            )
        )

    def _accept(self, leaf_der: bytes, intermediates_der: tuple[bytes, ...], valid_until_s: float) -> None:
        assert self._key is not None
        self._consecutive_failures = 0
        self._refresh_count += 1
        self._certificate = _Certificate(leaf_der, valid_until_s)
        self._expired = False
        self._effects.append(
            CertificateReady(
                identity=self.config.identity,
                leaf_der=leaf_der,
                intermediates_der=intermediates_der,
                key=self._key,
                trust_anchors_pem=self.config.trust_anchors_pem,
                valid_until_s=valid_until_s,
            )
        )

    def _check_expiry(self, now_ns: int, wall_time_s: float) -> None:
        """Expire on the wall clock; if only the monotonic wake-up passed, re-arm it from the wall clock."""
        if self._certificate is None or self._expired:
            return
        remaining_s = self._certificate.valid_until_s - wall_time_s
        if remaining_s <= 0:
            self._expired = True
            self._expiry_wake_ns = None
            self._effects.append(
                CertificateExpired(identity=self.config.identity, valid_until_s=self._certificate.valid_until_s)
            )
        elif self._expiry_wake_ns is not None and now_ns >= self._expiry_wake_ns:
            self._expiry_wake_ns = now_ns + max(1, math.ceil(remaining_s * NS_PER_S))

    def _examine(self, leaf_der: bytes, valid_until_s: float, wall_time_s: float) -> float | str:
        """The certificate's expiry if this answer is usable, else why not. The TLS handshake verifies the
        chain; this catches a confused service early, with a message, instead of failing every connection.
        The expiry is the earlier of the service's valid_until and the leaf's notAfter: a peer hits that one."""
        assert self._key is not None
        try:
            leaf = x509.load_der_x509_certificate(leaf_der)
            names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = names.get_values_for_type(x509.DNSName)
            public_key = leaf.public_key()
        except (ValueError, x509.ExtensionNotFound, x509.DuplicateExtension) as error:
            return f"the leaf certificate does not parse as an identity certificate ({error})"
        if dns_names != [self.config.identity]:
            return f"the leaf certificate names {dns_names}, not [{self.config.identity!r}]"
        if public_key != self._key.public_key():
            return "the leaf certificate is for another key than the one in our CSR"
        expiry_s = min(float(valid_until_s), leaf.not_valid_after_utc.timestamp())
        if expiry_s <= wall_time_s:
            return f"the certificate expired {wall_time_s - expiry_s:.0f} s ago (is a clock wrong?)"
        return expiry_s


# ---------------------------------------------------------------------------------------------- pure parts


def refresh_delay_ns(remaining_ns: int, config: IdentityClientConfig) -> int:
    """When to renew a certificate valid for ``remaining_ns`` more: 70 % of it, within [10 s, 24 h]."""
    share_ns = remaining_ns * config.refresh_percent // 100
    return min(config.refresh_max_ns, max(config.refresh_min_ns, share_ns))


def backoff_delay_ns(failures: int, config: IdentityClientConfig, rng: random.Random) -> int:
    """The wait after the ``failures``-th consecutive failure: uniform in [d/2, d], d = min(max, base * 2^(n-1))."""
    assert failures >= 1, failures
    ceiling = min(config.backoff_max_ns, config.backoff_base_ns << min(failures - 1, 62))
    return ceiling - rng.randrange(ceiling // 2 + 1)


def build_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> bytes:
    """A DER PKCS#10 request: CN = the identity, exactly one DNS SAN = the identity, signed ECDSA-SHA256.

    An identity longer than a common name may be (64 octets) gets no CN, which Certify accepts and which is
    how the CA writes such a leaf (leaf.py); cryptography refuses to write the longer CN."""
    fits = len(identity.encode("utf-8")) <= COMMON_NAME_BYTES_MAX
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, identity)] if fits else []
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)
