"""Scenario fields for identity: the control plane (``identity:``) and each proxy host's ``identity``.

Read by sim/scenario.py; as every scenario field, an error names the file, the field path and the fix.

- ``identity: {host: identity, port: 8080, leaf_lifetime: 24h, trust_domain: cluster.local, namespace:
  default}`` runs the identity service on ``host`` (sim/identity_host.py). Durations are a number of seconds
  or text such as ``90s``, ``10m``, ``24h``, ``2d``;
- ``proxies[].identity``: the host's service account, as ``web`` or ``{serviceaccount: web}``; the host's
  proxies (outbound and inbound) get certificates for ``web.<namespace>.serviceaccount.identity.linkerd.
  <trust_domain>``. ``{serviceaccount: web, certificate_for: other}`` is a misissued host: it answers for
  ``web`` with a certificate for ``other`` (the wrong-identity scenario);
- a route named under ``meshed`` whose endpoint hosts all have one identity is reached over mTLS, expecting
  that identity; its outbound proxy's host then needs an identity of its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from tether.core.address import Address
from tether.core.config_file import ConfigFileError, FieldReader
from tether.core.identity.names import IdentityNameError, check_dns_name, check_label
from tether.sim.identity_host import HostIdentity, IdentitySpec

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*")
LEAF_LIFETIME_S_MIN = 60  # the client refreshes no sooner than 10 s; a shorter leaf would expire between tries
LEAF_LIFETIME_S_MAX = 365 * 86400  # the issuer's own validity
IDENTITY_KEYS = ("host", "port", "leaf_lifetime", "trust_domain", "namespace")
HOST_IDENTITY_KEYS = ("serviceaccount", "certificate_for")


def duration_s(reader: FieldReader, key: str, default: float, *, minimum: float, maximum: float) -> float:
    """Seconds from a number or from text such as ``24h``; out of [minimum, maximum] is an error."""
    value = reader.data.get(key, default)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise reader.fail(key, f"{value!r} is not a duration", "write seconds, or text such as 90s, 10m, 24h, 2d")
        value = float(match.group(1)) * _UNITS_S[match.group(2)]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reader.fail(key, f"{value!r} is not a duration", "write seconds, or text such as 90s, 10m, 24h, 2d")
    if not minimum <= value <= maximum:
        raise reader.fail(key, f"{value:g} s is out of range", f"give {minimum:g} s to {maximum:g} s")
    return float(value)


def read_identity_spec(top: FieldReader) -> IdentitySpec | None:
    """The scenario's ``identity:``, or None when it has none."""
    if "identity" not in top.data:
        return None
    node = top.child("identity")
    node.known(*IDENTITY_KEYS)
    spec = IdentitySpec(
        host=node.text("host", "identity"),
        port=int(node.number("port", 8080, minimum=1, maximum=65535)),
        leaf_lifetime_s=int(
            duration_s(node, "leaf_lifetime", 86400, minimum=LEAF_LIFETIME_S_MIN, maximum=LEAF_LIFETIME_S_MAX)
        ),
        trust_domain=node.text("trust_domain", "cluster.local"),
        namespace=node.text("namespace", "default"),
    )
    try:
        check_dns_name(spec.trust_domain, "trust domain")
        check_label(spec.namespace, "namespace")
    except IdentityNameError as error:
        raise node.fail("trust_domain/namespace", str(error), "use lower-case DNS names") from None
    return spec


def read_host_identity(proxy: FieldReader, spec: IdentitySpec | None) -> HostIdentity | None:
    """A proxy entry's ``identity`` (see the module docstring), or None when it has none."""
    if "identity" not in proxy.data:
        return None
    if spec is None:
        raise proxy.fail("identity", "needs a control plane", "add a top-level identity: {host: identity}")
    value = proxy.data["identity"]
    if isinstance(value, str):
        who = HostIdentity(serviceaccount=proxy.text("identity"))
    else:
        node = proxy.child("identity")
        node.known(*HOST_IDENTITY_KEYS)
        certificate_for = node.text("certificate_for") if "certificate_for" in node.data else None
        who = HostIdentity(serviceaccount=node.text("serviceaccount"), certificate_for=certificate_for)
    for name in filter(None, (who.serviceaccount, who.certificate_for)):
        try:
            spec.identity_of(name)
        except IdentityNameError as error:
            raise proxy.fail("identity", str(error), "name a service account such as web or emoji-svc") from None
    return who


def host_identities(proxies: Sequence[FieldReader], spec: IdentitySpec | None) -> dict[str, HostIdentity]:
    """Every proxy host's identity, read before any proxy is built (routes name their endpoints' identity)."""
    found: dict[str, HostIdentity] = {}
    for proxy in proxies:
        who = read_host_identity(proxy, spec)
        if who is None:
            continue
        host = proxy.text("host")
        if found.get(host, who) != who:
            raise proxy.fail("identity", f"host {host} has another identity already", "give a host one identity")
        found[host] = who
    return found


def route_identities(
    proxy: FieldReader,
    routes: Mapping[str, Sequence[Address]],
    meshed: Mapping[str, int],
    hosts: Mapping[str, HostIdentity],
    spec: IdentitySpec | None,
) -> dict[str, str]:
    """The identity each meshed route's endpoints prove; checks the outbound host can prove its own."""
    if spec is None:
        return {}
    found: dict[str, str] = {}
    for name in meshed:
        claimed = {hosts[address.host].serviceaccount if address.host in hosts else None for address in routes[name]}
        if claimed == {None}:
            continue  # meshed without identity: plaintext between the proxies
        if len(claimed) != 1 or None in claimed:
            raise proxy.fail(
                f"meshed.{name}",
                f"the endpoints of {name} have different identities ({sorted(map(str, claimed))})",
                "give every endpoint host of a route the same identity, or none",
            )
        found[name] = spec.identity_of(str(claimed.pop()))
    if found and proxy.text("host") not in hosts:
        raise proxy.fail(
            "identity", f"routes {sorted(found)} need mTLS but this host has no identity", "give it identity: NAME"
        )
    return found


def check_identity_hosts(spec: IdentitySpec | None, hosts: Mapping[str, HostIdentity], reader: FieldReader) -> None:
    """The control plane runs on a host of its own: no meshed proxy shares it."""
    if spec is not None and spec.host in hosts:
        raise ConfigFileError(
            reader.source, "identity.host", f"{spec.host} also runs a meshed proxy", "give the control plane a host"
        )
