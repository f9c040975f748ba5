"""Embedded tokens (mint, verify offline, expiry, forgery) and the TokenReview username rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.core.identity.names import IdentityNameError
from tether.core.identity.tokens import (
    AUDIENCE,
    TOKEN_BYTES_MAX,
    EmbeddedTokenVerifier,
    TokenAccepted,
    TokenKey,
    TokenRejected,
    mint_token,
    verdict_for_review,
)

T0 = 1_750_000_000
KEY = TokenKey(bytes(range(32)))
OTHER_KEY = TokenKey(bytes(range(1, 33)))
VERIFIER = EmbeddedTokenVerifier(KEY)
LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)


def token(
    namespace: str = "emojivoto", serviceaccount: str = "web", valid_for_s: int = 3600, key: TokenKey = KEY
) -> bytes:
    return mint_token(
        key, namespace=namespace, serviceaccount=serviceaccount, wall_time_s=T0, valid_for_s=valid_for_s
    ).encode()


def rejection(verdict: object) -> str:
    assert isinstance(verdict, TokenRejected), verdict
    return verdict.reason


@settings(max_examples=100, deadline=None)
@given(
    namespace=LABELS,
    serviceaccount=st.lists(LABELS, min_size=1, max_size=3).map(".".join),
    valid_for_s=st.integers(1, 366 * 86400),
    elapsed_s=st.floats(0, 400 * 86400),
)
def test_embedded_token_proves_its_service_account_until_it_expires(
    namespace: str, serviceaccount: str, valid_for_s: int, elapsed_s: float
) -> None:
    verdict = VERIFIER.verify(token(namespace, serviceaccount, valid_for_s), T0 + elapsed_s)
    if elapsed_s < valid_for_s:
        assert verdict == TokenAccepted(namespace=namespace, serviceaccount=serviceaccount)
    else:
        assert "expired" in rejection(verdict)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 400), replacement=st.sampled_from("A_-.aZ09x="))
def test_embedded_token_with_any_character_changed_is_rejected(position: int, replacement: str) -> None:
    good = token().decode()
    position %= len(good)
    if good[position] == replacement:
        return
    altered = good[:position] + replacement + good[position + 1 :]
    assert isinstance(VERIFIER.verify(altered.encode(), T0), TokenRejected)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=120).map(str.encode))
def test_embedded_verifier_rejects_garbage(data: bytes) -> None:
    assert isinstance(VERIFIER.verify(data, T0), TokenRejected)


def test_embedded_token_from_another_mesh_is_named_as_such() -> None:
    reason = rejection(VERIFIER.verify(token(key=OTHER_KEY), T0))
    assert OTHER_KEY.key_id in reason and KEY.key_id in reason


def test_embedded_token_for_another_audience_is_rejected() -> None:
    other = mint_token(KEY, namespace="a", serviceaccount="b", wall_time_s=T0, audience="other.example")
    assert "audience" in rejection(VERIFIER.verify(other.encode(), T0))


def test_embedded_verifier_rejects_empty_and_oversized_tokens() -> None:
    assert "no token" in rejection(VERIFIER.verify(b"", T0))
    assert str(TOKEN_BYTES_MAX) in rejection(VERIFIER.verify(b"t" * (TOKEN_BYTES_MAX + 1), T0))


def test_embedded_token_expires_at_exactly_its_end() -> None:
    minted = token(valid_for_s=60)
    assert isinstance(VERIFIER.verify(minted, T0 + 59.999), TokenAccepted)
    assert isinstance(VERIFIER.verify(minted, T0 + 60), TokenRejected)


def test_mint_refuses_names_that_cannot_be_identities() -> None:
    with pytest.raises(IdentityNameError):
        token(namespace="Emojivoto")
    with pytest.raises(ValueError, match="validity"):
        token(valid_for_s=0)


def test_token_key_round_trips_through_its_file_text_and_never_prints_the_secret() -> None:
    assert TokenKey.from_text(KEY.to_text()) == KEY
    assert KEY.to_text().strip() not in repr(KEY)
    with pytest.raises(ValueError, match="bytes"):
        TokenKey.from_text("c2hvcnQ=")
    with pytest.raises(ValueError, match="base64"):
        TokenKey.from_text("not base64!")


@pytest.mark.parametrize(
    ("review", "expected"),
    [
        (
            {"authenticated": True, "username": "system:serviceaccount:emojivoto:web", "audiences": [AUDIENCE]},
            ("emojivoto", "web"),
        ),
        (
            {"authenticated": True, "username": "system:serviceaccount:emojivoto:web", "audiences": None},
            ("emojivoto", "web"),
        ),
        ({"authenticated": False, "username": None, "audiences": None, "error": "token expired"}, "token expired"),
        ({"authenticated": True, "username": "system:serviceaccount:emojivoto:web", "audiences": ["api"]}, "audiences"),
        ({"authenticated": True, "username": "alice", "audiences": [AUDIENCE]}, "not to a service account"),
        ({"authenticated": True, "username": "system:node:n1", "audiences": [AUDIENCE]}, "not to a service account"),
    ],
)
def test_verdict_for_review_accepts_only_authenticated_service_accounts_for_our_audience(
    review: dict[str, object], expected: object
) -> None:
    verdict = verdict_for_review(**{"error": None, **review})  # type: ignore[arg-type]
    if isinstance(expected, tuple):
        assert verdict == TokenAccepted(namespace=expected[0], serviceaccount=expected[1])
    else:
        assert isinstance(expected, str) and expected in rejection(verdict)


def test_embedded_token_mac_has_exactly_one_spelling() -> None:
    # The MAC's last base64url character carries 2 unused bits; another spelling of the same bytes is refused.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    good = token().decode()
    index = alphabet.index(good[-1])
    for low_bits in range(1, 4):
        twin = good[:-1] + alphabet[(index & ~3) | ((index + low_bits) & 3)]
        assert isinstance(VERIFIER.verify(twin.encode(), T0), TokenRejected), twin


# The token cache: a cached verifier answers exactly as one that verifies every token afresh.
CACHE_POOL = [
    token(valid_for_s=60),
    token(serviceaccount="vote", valid_for_s=3600),
    token(namespace="books", valid_for_s=1),
    token(key=OTHER_KEY),
    token()[:-2] + b"AA",  # a forged MAC
    b"garbage",
]


@settings(max_examples=300)
@given(
    st.integers(0, 3),
    st.lists(st.tuples(st.sampled_from(range(len(CACHE_POOL))), st.integers(T0 - 100, T0 + 4000)), max_size=40),
)
def test_embedded_verifier_cache_answers_as_a_fresh_verification(
    entries_max: int, calls: list[tuple[int, int]]
) -> None:
    cached, fresh = (
        EmbeddedTokenVerifier(KEY, cache_entries_max=entries_max),
        EmbeddedTokenVerifier(KEY, cache_entries_max=0),
    )
    for index, wall_time_s in calls:  # times in any order: a wall clock may step back
        assert cached.verify(CACHE_POOL[index], wall_time_s) == fresh.verify(CACHE_POOL[index], wall_time_s)
        assert len(cached._accepted) <= entries_max


def test_embedded_verifier_cache_honours_expiry_after_a_hit() -> None:
    verifier = EmbeddedTokenVerifier(KEY, cache_entries_max=8)
    short = token(valid_for_s=10)
    assert (
        verifier.verify(short, T0)
        == verifier.verify(short, T0 + 9)
        == TokenAccepted(namespace="emojivoto", serviceaccount="web")
    )
    assert "expired" in rejection(verifier.verify(short, T0 + 10))


def test_embedded_verifier_cache_evicts_the_least_recently_used_token() -> None:
    verifier = EmbeddedTokenVerifier(KEY, cache_entries_max=2)
    first, second, third = token(serviceaccount="a"), token(serviceaccount="b"), token(serviceaccount="c")
    for each in (first, second, first, third):  # the second is now the least recently used
        verifier.verify(each, T0)
    assert list(verifier._accepted) == [first, third]
