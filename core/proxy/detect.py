"""Protocol detection: what a client speaks, decided from its first bytes.

As Linkerd's proxy does: the HTTP/2 connection preface means HTTP/2; a valid HTTP/1 request line means
HTTP/1.1; anything else (or nothing before the detect timeout, for protocols where the server speaks
first) means opaque TCP. Detection reads at most ``DETECT_MAX_BYTES``; it never consumes what it reads
(the bytes go on to whichever protocol wins).
"""

from __future__ import annotations

import enum
import re

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DETECT_MAX_BYTES = 1024

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(_TOKEN + rb"+ [^ \r\n]+ HTTP/1\.[01]\r?\n")
# Every prefix of a request line: a method so far, then a target so far, then part of the version.
_REQUEST_LINE_PREFIX = re.compile(
    _TOKEN + rb"*(?: [^ \r\n]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?)?)?"
)


class Protocol(enum.Enum):
    HTTP1 = "http/1.1"
    HTTP2 = "h2"
    OPAQUE = "opaque"


def detect(data: bytes, *, final: bool) -> Protocol | None:
    """The protocol of a connection whose first bytes are ``data``, or None to wait for more.

    ``final`` means no more bytes will help: the client closed its side, or the detect timeout passed.
    """
    head = data[:DETECT_MAX_BYTES]
    if not head:
        return Protocol.OPAQUE if final else None
    if head.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if H2_PREFACE.startswith(head):
        return Protocol.OPAQUE if final else None  # still could be the preface
    newline = head.find(b"\n")
    if newline >= 0:
        return Protocol.HTTP1 if _REQUEST_LINE.fullmatch(head[: newline + 1]) else Protocol.OPAQUE
    if final or len(head) >= DETECT_MAX_BYTES:
        return Protocol.OPAQUE
    return None if _REQUEST_LINE_PREFIX.fullmatch(head) else Protocol.OPAQUE


def detect_http(data: bytes, *, final: bool) -> Protocol | None:
    """For a listener that speaks only HTTP: the HTTP/2 preface means HTTP/2, anything else HTTP/1.1.

    Only a prefix of the preface is waited on, so an HTTP/1.1 request is never delayed by detection.
    """
    if data.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if data and H2_PREFACE.startswith(data) and not final:
        return None
    if not data and not final:
        return None
    return Protocol.HTTP1
