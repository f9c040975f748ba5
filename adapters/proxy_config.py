"""One configuration model for `tether proxy`, from a file, ``TETHER_PROXY_*`` variables and flags.

Later sources win: defaults < ``--config FILE`` < environment < command-line flags. Every error names
where the value came from (the file and field, or the variable) and what to write instead.

    admin: 127.0.0.1:4191            # Linkerd's admin port
    routes: routes.yaml              # HTTPRoute/GRPCRoute/ServiceProfile/rate limits (docs/traffic.md)
    shutdown_endpoint: false
    limits: {connect_timeout_ms: 1000, protocol: detect, ...}   # every role; keys in docs/configuration.md
    outbound:                          # the application's outgoing traffic; default 127.0.0.1:4140
      listen: 127.0.0.1:4140
      routes: {web: [10.0.0.5:8080]}   # authority host -> endpoints; others are dialled as host:port
      meshed: {web: 4143}              # routes whose endpoints are meshed proxies: opaque TCP goes to this
                                       # inbound port with a transport header (transport.l5d.io/v1);
                                       # {web: {port: 4143, identity: NAME}} also opens mTLS to them,
                                       # expecting their certificate to name NAME
      limits: {...}                    # this role only
    inbound:                           # traffic for the local workload; default 0.0.0.0:4143
      listen: 0.0.0.0:4143
      to: 127.0.0.1:8080               # the workload; the inbound role runs only when this is set
    identity: {local_name, svc_addr, trust_anchors, token_file}   # adapters/identity_settings.py

Both roles detect protocols by default (``protocol: detect``), as Linkerd's proxy does. The older form
``--listen A --to B`` runs one HTTP/1.1 role and ignores the two above.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from tether.adapters.identity_settings import EXAMPLE_NAME, IdentitySettings, read_identity
from tether.adapters.identity_settings import VARIABLES as IDENTITY_VARIABLES
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.config_file import (
    PROXY_CONFIG_MS_FIELDS,
    PROXY_CONFIG_PLAIN_FIELDS,
    PROXY_CONFIG_RATIO_FIELDS,
    ConfigFileError,
    FieldReader,
    read_proxy_config,
)
from tether.core.identity.names import IdentityNameError, check_dns_name
from tether.core.traffic.route_config import RouteConfig, load_route_yaml

ENV_PREFIX = "TETHER_PROXY_"
DEFAULT_ADMIN = Address("127.0.0.1", 4191)
DEFAULT_OUTBOUND = Address("127.0.0.1", 4140)
DEFAULT_INBOUND = Address("0.0.0.0", 4143)
LIMIT_KEYS = (
    *PROXY_CONFIG_MS_FIELDS,
    *PROXY_CONFIG_PLAIN_FIELDS,
    *PROXY_CONFIG_RATIO_FIELDS,
    "protocol",
    "balancer",
    "opaque_ports",
)
TEXT_LIMITS = ("protocol", "balancer")


@dataclass(frozen=True, slots=True)
class RoleConfig:
    name: str  # "outbound", "inbound", or "proxy" for the --listen/--to form
    direction: str
    listen: Address
    config: ProxyConfig
    endpoints: tuple[Address, ...] = ()  # every request goes here when set
    h2c_endpoints: tuple[Address, ...] = ()  # with endpoints: HTTP/2 clients' requests go here instead
    routes: Mapping[str, tuple[Address, ...]] = field(default_factory=dict)
    dial_authority: bool = False
    meshed: Mapping[str, int] = field(default_factory=dict)  # route host -> its peers' inbound port
    identities: Mapping[str, str] = field(default_factory=dict)  # meshed route host -> its peers' identity


@dataclass(frozen=True, slots=True)
class ProcessConfig:
    admin: Address
    roles: tuple[RoleConfig, ...]
    shutdown_endpoint: bool = False
    identity: IdentitySettings | None = None
    # HTTPRoute / GRPCRoute / ServiceProfile / HTTPLocalRateLimitPolicy documents (docs/traffic.md): the
    # outbound role routes by them, the inbound role applies the rate limit.
    routes: RouteConfig | None = None
    routes_source: str | None = None


def load(
    *,
    config_path: str | None,
    environ: Mapping[str, str] | None = None,
    flag_limits: Mapping[str, Any] | None = None,
    listen: Address | None = None,
    to: tuple[Address, ...] = (),
    to_h2c: tuple[Address, ...] = (),
    admin: Address | None = None,
    shutdown_endpoint: bool = False,
    identity_flags: Mapping[str, str | None] | None = None,
    routes_path: str | None = None,
) -> ProcessConfig:
    """Merge the sources; raises ConfigFileError naming the source, the field and the fix."""
    data: dict[str, Any] = _read_file(config_path) if config_path else {}
    source = config_path or "defaults"
    env = dict(os.environ if environ is None else environ)
    identity = read_identity(data.get("identity"), source, env, identity_flags or {})
    data = _apply_environment(data, {key: value for key, value in env.items() if key not in IDENTITY_VARIABLES})
    if flag_limits:
        data["limits"] = {**data.get("limits", {}), **flag_limits}
    top = FieldReader(source, "", data)
    top.known("admin", "shutdown_endpoint", "limits", "outbound", "inbound", "identity", "routes")
    routes, routes_source = _routes(top, config_path, routes_path or env.get(f"{ENV_PREFIX}ROUTES"))
    admin_address = admin or (top.address(data["admin"], "admin", listening=True) if "admin" in data else DEFAULT_ADMIN)
    shutdown = shutdown_endpoint or bool(data.get("shutdown_endpoint", False))
    shared = dict(top.child("limits").data)
    if listen is not None:
        limits = read_proxy_config(FieldReader(source, "limits.", shared))
        role = RoleConfig("proxy", "outbound", listen, limits, endpoints=to, h2c_endpoints=to_h2c)
        return ProcessConfig(admin_address, (role,), shutdown, identity, routes, routes_source)
    roles = [_role(top, "outbound", shared), _role(top, "inbound", shared)]
    for role in roles:
        if role is not None and role.identities and identity is None:
            host = sorted(role.identities)[0]
            raise ConfigFileError(
                source,
                f"{role.name}.meshed.{host}.identity",
                "asks for mTLS, which needs a certificate of this proxy's own",
                "give the proxy an identity (identity.local_name, svc_addr, trust_anchors, token_file), or remove "
                "the peers' identity",
            )
    return ProcessConfig(
        admin_address, tuple(role for role in roles if role is not None), shutdown, identity, routes, routes_source
    )


def _routes(top: FieldReader, config_path: str | None, flag_path: str | None) -> tuple[RouteConfig | None, str | None]:
    """The routes file: ``--routes`` or ``TETHER_PROXY_ROUTES`` (relative to the working directory), else
    ``routes:`` in the config file (relative to the config file's folder)."""
    path = flag_path
    if path is None and "routes" in top.data:
        path = top.text("routes")
        if config_path is not None and not Path(path).is_absolute():
            path = str(Path(config_path).parent / path)
    if path is None:
        return None, None
    try:
        text = Path(path).read_text()
    except OSError as error:
        problem = error.strerror or str(error)
        raise ConfigFileError(path, "(file)", problem, "check the path given to --routes or routes:") from None
    return load_route_yaml(text, path), path


def _role(top: FieldReader, name: str, shared: Mapping[str, Any]) -> RoleConfig | None:
    node = top.child(name)
    node.known("listen", "to", "routes", "meshed", "limits")
    limits_data = {"protocol": "detect", **shared, **node.child("limits").data}
    config = read_proxy_config(FieldReader(node.source, f"{name}.limits.", limits_data))
    default = DEFAULT_OUTBOUND if name == "outbound" else DEFAULT_INBOUND
    listen = node.address(node.data["listen"], "listen", listening=True) if "listen" in node.data else default
    if name == "inbound":
        if "to" not in node.data:
            return None  # no local workload named: nothing to forward inbound traffic to
        workload = node.address(node.data["to"], "to")
        if config.protocol == "detect" and workload.port in config.opaque_ports:
            config = replace(config, protocol="opaque")  # the workload speaks first: never wait to detect
        return RoleConfig(name, "inbound", listen, config, endpoints=(workload,))
    routes_node = node.child("routes")
    routes = {
        str(host): tuple(routes_node.address(item, str(host)) for item in _as_list(routes_node, str(host)))
        for host in routes_node.data
    }
    meshed_node = node.child("meshed")
    meshed: dict[str, int] = {}
    identities: dict[str, str] = {}
    for host in map(str, meshed_node.data):
        meshed[host], peer_identity = _meshed_peer(meshed_node, host)
        if peer_identity is not None:
            identities[host] = peer_identity
    for host in meshed:
        if host not in routes:
            raise meshed_node.fail(
                host, "names no route", f"add it under outbound.routes, or remove it from {name}.meshed"
            )
    return RoleConfig(
        name, "outbound", listen, config, routes=routes, dial_authority=True, meshed=meshed, identities=identities
    )


def _meshed_peer(node: FieldReader, host: str) -> tuple[int, str | None]:
    """``web: 4143`` or ``web: {port: 4143, identity: NAME}``: the peers' inbound port and their identity."""
    if not isinstance(node.data.get(host), Mapping):
        return int(node.number(host, minimum=1, maximum=65535)), None
    peer = node.child(host)
    peer.known("port", "identity")
    port = int(peer.number("port", 4143, minimum=1, maximum=65535))
    if "identity" not in peer.data:
        return port, None
    name = peer.text("identity")
    try:
        check_dns_name(name, "identity")
    except IdentityNameError as error:
        raise peer.fail("identity", str(error), f"give the peers' identity, for example {EXAMPLE_NAME}") from None
    return port, name


def _as_list(node: FieldReader, key: str) -> list[object]:
    value = node.data.get(key)
    if not isinstance(value, list) or not value:
        raise node.fail(key, f"{value!r} is not a list of endpoints", "write [HOST:PORT, ...]")
    return value


def _read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as error:
        problem = error.strerror or str(error)
        raise ConfigFileError(path, "(file)", problem, "check the path given to --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigFileError(path, "(file)", f"not valid YAML ({error})", "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(path, "(top level)", "is not a mapping", "start with keys such as 'outbound:'")
    return data


def _apply_environment(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``TETHER_PROXY_ADMIN``, ``TETHER_PROXY_{OUTBOUND,INBOUND}_{LISTEN,TO}`` and one variable per limit,
    named after its key (``TETHER_PROXY_CONNECT_TIMEOUT_MS``)."""
    merged = dict(data)
    for key in ("limits", "outbound", "inbound"):
        value = data.get(key, {})
        if not isinstance(value, Mapping):
            return merged  # the reader will name this field; no variable can be merged into it
        merged[key] = dict(value)
    for variable, value in sorted(env.items()):
        if not variable.startswith(ENV_PREFIX):
            continue
        key = variable[len(ENV_PREFIX) :].lower()
        if key == "admin":
            merged["admin"] = value
        elif key == "routes":
            continue  # read by load(): a path relative to the working directory, not to the config file
        elif key in ("outbound_listen", "inbound_listen", "inbound_to"):
            role, _, field_name = key.partition("_")
            merged[role][field_name] = value
        elif key == "opaque_ports":
            merged["limits"][key] = [int(_number(variable, part)) for part in value.split(",") if part.strip()]
        elif key in LIMIT_KEYS:
            merged["limits"][key] = value if key in TEXT_LIMITS else _number(variable, value)
        else:
            names = ("admin", "routes", "outbound_listen", "inbound_to", *LIMIT_KEYS)
            known = ", ".join(ENV_PREFIX + k.upper() for k in names)
            raise ConfigFileError("environment", variable, "is not a setting", f"use one of {known}")
    for key in ("limits", "outbound", "inbound"):
        if not merged[key]:
            del merged[key]
    return merged


def _number(variable: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigFileError("environment", variable, f"{value!r} is not a number", "give a number") from None


def describe(process: ProcessConfig, bound: list[Address]) -> list[str]:
    """One line per role, for the startup banner, with the addresses actually bound."""
    lines = []
    for role, listen in zip(process.roles, bound, strict=True):
        if role.endpoints:
            target = ", ".join(str(endpoint) for endpoint in role.endpoints)
        else:
            routed = ", ".join(sorted(role.routes))
            target = f"routes for {routed}; others dialled by authority" if routed else "dialled by authority"
        lines.append(f"{role.name} ({role.config.protocol}) listening on {listen} -> {target}")
    if process.identity is not None:
        lines.append(process.identity.describe())
    return lines
