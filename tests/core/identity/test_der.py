"""The DER writer (core/identity/der.py) against encodings cryptography produces for the same values."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from tether.core.identity import der

# Object identifiers: a first arc of 0 or 1 takes a second arc below 40, a first arc of 2 any second arc.
OIDS = st.one_of(
    st.tuples(st.integers(0, 1), st.integers(0, 39)),
    st.tuples(st.just(2), st.integers(0, 2**40)),
).flatmap(lambda head: st.lists(st.integers(0, 2**64), max_size=6).map(lambda tail: [*head, *tail]))


@given(st.integers(0, 2**2100), st.integers(0, 2**70))
def test_integer_and_sequence_match_an_ecdsa_signature_encoding(first: int, second: int) -> None:
    # encode_dss_signature writes SEQUENCE { INTEGER r, INTEGER s }; huge r forces long-form lengths.
    assert der.sequence(der.integer(first), der.integer(second)) == encode_dss_signature(first, second)


@given(OIDS, st.text(min_size=1, max_size=400))
def test_oid_set_and_utf8_string_match_a_name_encoding(arcs: list[int], value: str) -> None:
    dotted = ".".join(map(str, arcs))
    name = x509.Name([x509.NameAttribute(x509.ObjectIdentifier(dotted), value)])
    expected = name.public_bytes()
    assert der.sequence(der.set_of(der.sequence(der.oid(dotted), der.utf8_string(value)))) == expected


@pytest.mark.parametrize(
    ("size", "octets"),
    [(0, b"\x00"), (127, b"\x7f"), (128, b"\x81\x80"), (255, b"\x81\xff"), (256, b"\x82\x01\x00")],
)
def test_length_uses_the_short_form_below_128_and_the_shortest_long_form_above(size: int, octets: bytes) -> None:
    assert der.length(size) == octets


def test_x509_time_switches_to_generalized_time_in_2050() -> None:
    last_utc_time_s, first_generalized_s = 2_524_607_999, 2_524_608_000  # 2049-12-31T23:59:59Z, 2050-01-01
    assert der.x509_time(last_utc_time_s) == b"\x17\x0d491231235959Z"
    assert der.x509_time(first_generalized_s) == b"\x18\x0f20500101000000Z"


def test_boolean_and_strings_follow_der() -> None:
    assert der.boolean(True) == b"\x01\x01\xff" and der.boolean(False) == b"\x01\x01\x00"
    assert der.bit_string(b"\xab") == b"\x03\x02\x00\xab"
    assert der.octet_string(b"") == b"\x04\x00"
    assert der.context(3, b"\x05\x00", constructed=True) == b"\xa3\x02\x05\x00"
    assert der.context(2, b"a", constructed=False) == b"\x82\x01a"
