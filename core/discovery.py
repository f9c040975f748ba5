"""Discovery state: which endpoints serve an authority.

The proxy asks a ``Resolver`` for the endpoint set of each request's authority. Today the only resolver
is static (the ``--to`` list, optionally per authority); the control-plane issue will feed the same
interface from the destination service, delivered through ``Proxy.control``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tether.core.address import Address, parse_authority


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """The endpoints of one destination, in a stable order, under a name used in metrics and logs."""

    name: str
    endpoints: tuple[Address, ...]
    # Set when the endpoints are meshed proxies: opaque connections then go to this inbound port of theirs
    # with a transport header (core/proxy/transport_header.py). The destination service will say so later.
    meshed_inbound_port: int | None = None
    # Where requests from HTTP/2 clients go instead, when the workload serves h2c on a port of its own
    # (nginx, for one, cannot serve HTTP/1.1 and h2c with prior knowledge on one port).
    h2c_endpoints: tuple[Address, ...] = ()
    # The identity the meshed endpoints prove with mTLS (their server certificate's name); None: not meshed
    # with identity, so connections to them are plaintext.
    identity: str | None = None


class Resolver(Protocol):
    """Maps an authority (and, later, an original destination) to an endpoint set, or None if unknown."""

    def resolve(self, authority: str) -> EndpointSet | None: ...


class StaticResolver:
    """Resolves from a fixed table of host names, falling back to a default set for any authority.

    The fallback is what ``tether proxy --listen A --to B,C`` means: every request goes to B or C,
    whatever its Host header says. With ``dial_authority`` and no fallback, an authority with no route is
    its own endpoint (``host:port``, port 80 if absent): the outbound proxy's behaviour for destinations
    that discovery does not know, as Linkerd forwards to the original destination.
    """

    def __init__(
        self,
        default: Sequence[Address] | None = None,
        by_host: Mapping[str, Sequence[Address]] | None = None,
        default_name: str = "default",
        *,
        dial_authority: bool = False,
        meshed_hosts: Mapping[str, int] | None = None,
        default_h2c: Sequence[Address] = (),
        identities: Mapping[str, str] | None = None,
    ) -> None:
        meshed = {host.lower(): port for host, port in (meshed_hosts or {}).items()}
        named = {host.lower(): identity.lower() for host, identity in (identities or {}).items()}
        self._default = (
            EndpointSet(default_name, tuple(default), h2c_endpoints=tuple(default_h2c)) if default is not None else None
        )
        self._by_host = {
            host.lower(): EndpointSet(
                host.lower(), tuple(eps), meshed.get(host.lower()), identity=named.get(host.lower())
            )
            for host, eps in (by_host or {}).items()
        }
        self._dial_authority = dial_authority

    def resolve(self, authority: str) -> EndpointSet | None:
        host, port = parse_authority(authority)
        found = self._by_host.get(host)
        if found is not None:
            return found
        if self._default is None and self._dial_authority and host:
            address = Address(host, port if port is not None else 80)
            return EndpointSet(str(address), (address,))
        return self._default
