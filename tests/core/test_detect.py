"""Protocol detection against its rules, whole and split at every point."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.core.proxy.detect import DETECT_MAX_BYTES, H2_PREFACE, Protocol, detect

GET = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (GET, Protocol.HTTP1),
        (b"OPTIONS * HTTP/1.0\n", Protocol.HTTP1),
        (H2_PREFACE + b"\x00\x00\x00\x04", Protocol.HTTP2),
        (b"\x16\x03\x01\x02\x00\x01", Protocol.OPAQUE),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2\r\n", Protocol.OPAQUE),
        (b"GET / HTTP/2.0\r\n", Protocol.OPAQUE),
        (b"get  / HTTP/1.1\r\n", Protocol.OPAQUE),
    ],
)
def test_detect_decides_from_whole_first_bytes(data: bytes, expected: Protocol) -> None:
    assert detect(data, final=False) is expected


def test_detect_waits_on_every_prefix_of_http_and_h2() -> None:
    for whole in (GET.split(b"\n")[0] + b"\n", H2_PREFACE):
        for cut in range(len(whole)):
            assert detect(whole[:cut], final=False) is None, whole[:cut]


def test_detect_gives_up_at_the_limit_or_when_final() -> None:
    assert detect(b"GET /" + b"a" * DETECT_MAX_BYTES, final=False) is Protocol.OPAQUE
    assert detect(b"GET /partial", final=True) is Protocol.OPAQUE
    assert detect(b"", final=True) is Protocol.OPAQUE
    assert detect(b"", final=False) is None


@given(st.binary(max_size=64), st.booleans())
def test_detect_is_stable_once_decided(data: bytes, final: bool) -> None:
    decided = detect(data, final=final)
    if decided is not None:
        assert detect(data + b"more bytes\r\n", final=final) is decided
