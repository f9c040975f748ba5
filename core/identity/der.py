"""A small DER writer: just the ASN.1 types a leaf certificate needs (leaf.py).

Why our own: cryptography's ``CertificateBuilder`` re-validates and re-encodes every field of every leaf,
about 100 us per certificate on top of the ECDSA signature, while all but five fields of a leaf are the
same for every leaf of one issuer. leaf.py encodes the constant parts once with these functions and the
per-call parts (serial, validity, names, public key) on each call. The writer covers definite-length
encodings only (DER never uses indefinite lengths) and asserts its inputs rather than validating them: every
value comes from the CA itself, never from a peer. tests/core/identity/test_der.py checks each function
against cryptography's own encodings.
"""

from __future__ import annotations

import datetime

TAG_BOOLEAN = 0x01
TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_UTC_TIME = 0x17
TAG_GENERALIZED_TIME = 0x18
TAG_SEQUENCE = 0x30
TAG_SET = 0x31
LENGTH_MAX = (1 << 32) - 1  # four length octets; a certificate is a few hundred bytes
# RFC 5280 4.1.2.5: UTCTime for 1950 through 2049, GeneralizedTime otherwise.
UTC_TIME_YEARS = range(1950, 2050)


def length(size: int) -> bytes:
    """The DER length octets for ``size`` content bytes: short form below 128, else the shortest long form."""
    assert 0 <= size <= LENGTH_MAX, size
    if size < 0x80:
        return bytes((size,))
    octets = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(octets),)) + octets


def tlv(tag: int, content: bytes) -> bytes:
    """One element: a single-octet tag (every tag here is below 31), its length, its content."""
    assert 0 <= tag <= 0xFF and tag & 0x1F != 0x1F, "single-octet tags only"
    return bytes((tag,)) + length(len(content)) + content


def sequence(*elements: bytes) -> bytes:
    return tlv(TAG_SEQUENCE, b"".join(elements))


def set_of(*elements: bytes) -> bytes:
    # DER sorts SET OF members by encoding; every set written here has one member.
    assert len(elements) == 1, "single-member sets only (DER would require sorting more)"
    return tlv(TAG_SET, elements[0])


def integer(value: int) -> bytes:
    """A non-negative INTEGER in the fewest octets; a leading 0x00 keeps a high first bit from reading as a sign."""
    assert value >= 0, "only non-negative integers are written"
    return tlv(TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def boolean(value: bool) -> bytes:
    return tlv(TAG_BOOLEAN, b"\xff" if value else b"\x00")  # DER: TRUE is 0xFF


def octet_string(content: bytes) -> bytes:
    return tlv(TAG_OCTET_STRING, content)


def bit_string(content: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), as signatures and keys are."""
    return tlv(TAG_BIT_STRING, b"\x00" + content)


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form, for example ``2.5.4.3``."""
    arcs = [int(arc) for arc in dotted.split(".")]
    assert len(arcs) >= 2 and arcs[0] <= 2 and (arcs[0] == 2 or arcs[1] < 40), dotted
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(TAG_OID, bytes(body))


def utf8_string(text: str) -> bytes:
    return tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def context(number: int, content: bytes, *, constructed: bool) -> bytes:
    """A context-specific tag ``[number]``: explicit (constructed, wrapping an element) or implicit (primitive)."""
    assert 0 <= number < 31, number
    return tlv((0xA0 if constructed else 0x80) | number, content)


def x509_time(seconds: int) -> bytes:
    """An instant as X.509 Time (RFC 5280 4.1.2.5): UTCTime before 2050, GeneralizedTime from then on."""
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)  # a conversion, not a clock read
    if moment.year in UTC_TIME_YEARS:
        return tlv(TAG_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return tlv(TAG_GENERALIZED_TIME, f"{moment.year:04d}{moment.strftime('%m%d%H%M%SZ')}".encode("ascii"))
