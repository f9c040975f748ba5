"""Tokens: how a workload proves which service account it runs as, and the verdicts a verifier returns.

Theory of operation
-------------------
The CA signs for an identity only when a token proves it. A ``TokenVerifier`` turns the token bytes of
one Certify request into a ``TokenVerdict``:

- ``TokenAccepted(namespace, serviceaccount)``: the token is good and names that service account;
- ``TokenRejected(reason)``: the token is bad (malformed, forged, expired, for another audience, not a
  service account): the caller must get another token (UNAUTHENTICATED);
- ``VerifierUnavailable(reason)``: the verifier could not decide now (the Kubernetes API did not answer):
  the caller should retry (UNAVAILABLE).

The CA (ca.py) then compares an accepted verdict with the requested identity. Two verifiers exist:
Kubernetes TokenReview (adapters/identity_k8s.py, for meshes on a cluster; its username rule lives here
in ``verdict_for_review``) and the embedded one below, for meshes without a cluster.

Embedded tokens
---------------
``tether identity init`` writes a 32-byte secret key; ``tether identity token`` mints, and the identity
service verifies, offline, with that key. A token is ASCII:

    tether1.<key id>.<payload>.<mac>

where the payload is base64url (unpadded) canonical JSON ``{"aud","exp","iat","ns","sa"}``, the key id is the
first 8 bytes of SHA-256(key) in hex (so a token from another mesh's key is named as such, not merely
"invalid"), and the MAC is HMAC-SHA256 over everything before the last dot. HMAC rather than a signature:
the only party that verifies is the identity service, which already holds the issuer key and so could issue
any certificate anyway; an asymmetric token key would not take power away from it, and HMAC costs about a
microsecond per verification where ECDSA costs about a hundred (Certify's budget is a few hundred).
Expiry is checked against the ``wall_time_s`` the caller passes; nothing here reads a clock.

A proxy sends the same token on every refresh, so the verifier remembers the tokens it accepted (the exact
bytes, with their expiry) in a bounded LRU of ``TOKEN_CACHE_ENTRIES_DEFAULT``: a repeated token costs a dict
lookup instead of a MAC and a JSON parse (about 15 us of a Certify call). A cached verdict is the one a
fresh verification would give: every check but the expiry depends only on the bytes and the key, and the
expiry is checked on every hit. Rejections are not cached, so garbage cannot evict good tokens. The limit
bounds memory: at most that many tokens of at most ``TOKEN_BYTES_MAX`` each (tether tokens are ~200 bytes).
Threads may share a verifier (the threaded grpcio server does): each step is one dict operation under the
GIL, and a race costs at most one repeated verification.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Protocol

from tether.core.identity.names import IdentityNameError, check_dns_name, check_label, parse_username

AUDIENCE = "identity.l5d.io"
# Kubernetes service account tokens are 1-2 KB; 16 KiB admits long claims and refuses floods.
TOKEN_BYTES_MAX = 16384
TOKEN_KEY_BYTES = 32
TOKEN_PREFIX = "tether1"
# A mesh without a cluster has no kubelet to rotate tokens, so an operator hands them out by hand: 30 days
# gives a monthly rotation chore while bounding how long a leaked token proves an identity.
EMBEDDED_TOKEN_VALIDITY_S_DEFAULT = 30 * 86400
EMBEDDED_TOKEN_VALIDITY_S_MAX = 366 * 86400
# One entry per workload that refreshes; 4096 covers a large mesh's service accounts at ~1 MB.
TOKEN_CACHE_ENTRIES_DEFAULT = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenAccepted:
    """The token is valid and proves ``system:serviceaccount:<namespace>:<serviceaccount>``."""

    namespace: str
    serviceaccount: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRejected:
    """The token proves nothing; ``reason`` says why (never echoing the token itself)."""

    reason: str


def token_text(token: bytes, *, missing: str, not_ascii: str) -> str | TokenRejected:
    """The checks every verifier makes first: a token is there, within ``TOKEN_BYTES_MAX``, and ASCII (both
    kinds of token are). Returns its text, or the rejection, with the verifier's own hints for the two
    mistakes a caller can make with it."""
    if not token:
        return TokenRejected(reason=f"no token; {missing}")
    if len(token) > TOKEN_BYTES_MAX:
        return TokenRejected(reason=f"the token is {len(token)} bytes, more than {TOKEN_BYTES_MAX}")
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        return TokenRejected(reason=f"the token is not ASCII; {not_ascii}")


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifierUnavailable:
    """The verifier could not decide now (for example the Kubernetes API failed); a retry may succeed."""

    reason: str


TokenVerdict = TokenAccepted | TokenRejected | VerifierUnavailable


class TokenVerifier(Protocol):
    """Anything that judges a token. May block (TokenReview is a network call); the core never calls it."""

    def verify(self, token: bytes, wall_time_s: float) -> TokenVerdict: ...


def verdict_for_review(
    *, authenticated: bool, username: str | None, audiences: list[str] | None, error: str | None
) -> TokenVerdict:
    """The verdict for a TokenReview status: authenticated, for our audience, and a service account user."""
    if not authenticated:
        return TokenRejected(reason=f"the Kubernetes API did not authenticate the token: {error or 'no reason given'}")
    if audiences is not None and AUDIENCE not in audiences:
        return TokenRejected(
            reason=f"the token is for audiences {audiences!r}, not {AUDIENCE!r}; project a service account token "
            f"with audience {AUDIENCE}"
        )
    parsed = parse_username(username or "")
    if parsed is None:
        return TokenRejected(
            reason=f"the token belongs to {username!r}, not to a service account (system:serviceaccount:NS:SA)"
        )
    return TokenAccepted(namespace=parsed[0], serviceaccount=parsed[1])


@dataclass(frozen=True, slots=True)
class TokenKey:
    """The embedded verifier's secret: 32 bytes, stored as one base64 line in the mesh directory."""

    secret: bytes

    def __post_init__(self) -> None:
        assert len(self.secret) == TOKEN_KEY_BYTES, "token keys are 32 bytes"

    def __repr__(self) -> str:
        return f"TokenKey(key_id={self.key_id!r})"  # never print the secret

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:16]

    def to_text(self) -> str:
        return base64.b64encode(self.secret).decode("ascii") + "\n"

    @classmethod
    def from_text(cls, text: str) -> TokenKey:
        """Parse the file's contents; ValueError says what is wrong."""
        try:
            secret = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the token key is not base64; write it with `tether identity init`") from None
        if len(secret) != TOKEN_KEY_BYTES:
            raise ValueError(f"the token key is {len(secret)} bytes, expected {TOKEN_KEY_BYTES}")
        return cls(secret)


def mint_token(
    key: TokenKey,
    *,
    namespace: str,
    serviceaccount: str,
    wall_time_s: float,
    valid_for_s: int = EMBEDDED_TOKEN_VALIDITY_S_DEFAULT,
    audience: str = AUDIENCE,
) -> str:
    """A token proving ``namespace``/``serviceaccount`` until ``wall_time_s + valid_for_s``.

    Raises IdentityNameError for names that could never be an identity, and ValueError for a validity
    outside 1 s .. 366 days.
    """
    check_label(namespace, "namespace")
    check_dns_name(serviceaccount, "service account")
    if not 0 < valid_for_s <= EMBEDDED_TOKEN_VALIDITY_S_MAX:
        raise ValueError(f"token validity {valid_for_s} s is outside 1 .. {EMBEDDED_TOKEN_VALIDITY_S_MAX} s")
    issued_at = int(wall_time_s)
    claims = {"aud": audience, "exp": issued_at + valid_for_s, "iat": issued_at, "ns": namespace, "sa": serviceaccount}
    payload = _b64encode(json.dumps(claims, sort_keys=True, separators=(",", ":")).encode())
    signed = f"{TOKEN_PREFIX}.{key.key_id}.{payload}"
    return f"{signed}.{_b64encode(_mac(key, signed))}"


class EmbeddedTokenVerifier:
    """Verifies tokens from ``mint_token`` with the mesh's key; pure, so the simulator can use it as is."""

    def __init__(
        self, key: TokenKey, *, audience: str = AUDIENCE, cache_entries_max: int = TOKEN_CACHE_ENTRIES_DEFAULT
    ) -> None:
        assert cache_entries_max >= 0, cache_entries_max
        self._key = key
        self._audience = audience
        self._cache_entries_max = cache_entries_max
        # Accepted tokens -> (verdict, expiry), least recently used first (dicts keep insertion order).
        self._accepted: dict[bytes, tuple[TokenAccepted, int]] = {}

    def verify(self, token: bytes, wall_time_s: float) -> TokenVerdict:
        cached = self._accepted.pop(token, None)
        if cached is not None and wall_time_s < cached[1]:
            self._accepted[token] = cached  # now the most recently used
            return cached[0]
        verdict, expiry = self._verify(token, wall_time_s)
        if isinstance(verdict, TokenAccepted) and self._cache_entries_max:
            assert expiry is not None, "an accepted token has an expiry"
            if len(self._accepted) >= self._cache_entries_max:  # evict the least recently used
                self._accepted.pop(next(iter(self._accepted), b""), None)
            self._accepted[token] = (verdict, expiry)
        return verdict

    def _verify(self, token: bytes, wall_time_s: float) -> tuple[TokenVerdict, int | None]:
        """The verdict on ``token`` from its bytes alone, and the expiry of an accepted one."""
        text = token_text(
            token, missing="mint one with `tether identity token` and send it", not_ascii="it is not a tether token"
        )
        if isinstance(text, TokenRejected):
            return text, None
        parts = text.split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            return TokenRejected(
                reason=f"the token is not a {TOKEN_PREFIX}.<key id>.<payload>.<mac> tether token"
            ), None
        if parts[1] != self._key.key_id:
            return TokenRejected(
                reason=f"the token was minted with key {parts[1][:16]!r}, this mesh's key is {self._key.key_id!r}; "
                "mint a new one with `tether identity token --dir` pointing at this mesh"
            ), None
        mac = _b64decode(parts[3])
        if mac is None or not hmac.compare_digest(mac, _mac(self._key, text[: text.rfind(".")])):
            return TokenRejected(reason="the token's MAC does not verify; it was altered or forged"), None
        return self._check_claims(_b64decode(parts[2]), wall_time_s)

    def _check_claims(self, payload: bytes | None, wall_time_s: float) -> tuple[TokenVerdict, int | None]:
        # The MAC verified, so the payload came from mint_token; a failure here means a bug or a leaked key.
        try:
            claims = json.loads(payload or b"")
            audience, expiry, namespace, serviceaccount = claims["aud"], claims["exp"], claims["ns"], claims["sa"]
            if not (isinstance(expiry, int) and isinstance(namespace, str) and isinstance(serviceaccount, str)):
                raise TypeError("claim types")
            check_label(namespace, "namespace")
            check_dns_name(serviceaccount, "service account")
        except (ValueError, KeyError, TypeError, IdentityNameError):
            return TokenRejected(reason="the token's claims are malformed"), None
        if audience != self._audience:
            return TokenRejected(reason=f"the token is for audience {audience!r}, not {self._audience!r}"), None
        if wall_time_s >= expiry:
            return TokenRejected(
                reason=f"the token expired {int(wall_time_s - expiry)} s ago; "
                "mint a new one with `tether identity token`"
            ), None
        return TokenAccepted(namespace=namespace, serviceaccount=serviceaccount), expiry


def _mac(key: TokenKey, signed: str) -> bytes:
    return hmac.new(key.secret, signed.encode("ascii"), hashlib.sha256).digest()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded base64url: a non-canonical spelling (stray bits in the last character) is refused, so
    no two token strings carry the same MAC."""
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64encode(data) == text else None
