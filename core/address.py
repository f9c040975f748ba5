"""Network addresses as plain values, parsed once with errors that say what to type instead."""

from __future__ import annotations

from dataclasses import dataclass


class AddressError(ValueError):
    """Raised for a HOST:PORT string that cannot be an address."""


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A host (name or IP literal, without brackets) and a TCP port."""

    host: str
    port: int

    def __post_init__(self) -> None:
        assert self.host, "an address needs a host"
        assert 0 <= self.port <= 65535, self.port

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, default_port: int | None = None, listening: bool = False) -> Address:
        """Parse ``host:port``, ``[v6]:port`` or, with ``default_port``, a bare host.

        ``listening`` also accepts port 0: bind to any free port (the actual one is printed at startup).
        """
        text = text.strip()
        if not text:
            raise AddressError("empty address; expected HOST:PORT, for example 127.0.0.1:8080")
        host, port_text = _split_host_port(text)
        if port_text is None:
            if default_port is None:
                raise AddressError(f"{text!r} has no port; expected HOST:PORT, for example {text}:8080")
            return cls(host, default_port)
        lowest = 0 if listening else 1
        if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
            raise AddressError(f"{text!r}: port {port_text!r} is not a number from 1 to 65535")
        if not host:
            raise AddressError(f"{text!r} has no host; expected HOST:PORT, for example 127.0.0.1:{port_text}")
        return cls(host, int(port_text))


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(f"{text!r}: missing ']' after an IPv6 address")
        rest = text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise AddressError(f"{text!r}: expected ':' after ']'")
        return text[1:end], (rest[1:] if rest else None)
    if text.count(":") > 1:
        raise AddressError(f"{text!r}: write IPv6 addresses in brackets, for example [::1]:8080")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def parse_authority(authority: str) -> tuple[str, int | None]:
    """Split an HTTP authority (Host header) into a lowercased host and an optional port.

    Returns the host with an empty string for authorities that cannot be parsed, so routing treats them
    as unknown rather than raising inside the proxy.
    """
    try:
        host, port = _split_host_port(authority.strip())
    except AddressError:
        return "", None
    if port is None or not port.isdigit():
        return host.lower(), None
    return host.lower(), int(port)
