"""Reading routes from YAML shaped like Kubernetes HTTPRoute / GRPCRoute and Linkerd ServiceProfile.

Pure: ``load_route_yaml(text, source)`` parses the text (no file access), ``read_route_documents(documents,
source)`` takes documents already parsed. Both return a ``RouteConfig`` or raise ``ConfigFileError`` naming
the file, the document, the field as a path (``spec.rules[2].matches[0].path.type``) and the fix.

What is read (everything else in ``spec`` is refused as unknown, so a typo never passes silently):

- ``HTTPRoute`` and ``GRPCRoute`` (gateway.networking.k8s.io or policy.linkerd.io), with Linkerd's retry
  and timeout annotations: read by gateway_routes.py, which also holds the small field readers.
- ``ServiceProfile`` (linkerd.io/v1alpha2): routes (condition with method, pathRegex, all, any;
  isRetryable; timeout; responseClasses with status ranges), retryBudget and dstOverrides.
- ``HTTPLocalRateLimitPolicy`` (policy.linkerd.io): total, identity and overrides per Server.

This module reads the last two and dispatches each document by kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import yaml

from tether.core.config_file import ConfigFileError, FieldReader
from tether.core.traffic.budget import TTL_NS_MAX, TTL_NS_MIN, RetryBudgetConfig
from tether.core.traffic.gateway_routes import (
    MAX_LIST,
    MAX_MATCHES_PER_RULE,
    METHODS,
    compiled,
    read_boolean,
    read_duration,
    read_integer,
    read_items,
    read_metadata,
    read_ratio,
    read_route,
)
from tether.core.traffic.ratelimit import LocalRateLimitConfig, RateLimit
from tether.core.traffic.retry import SERVER_ERRORS, RetryConditions, RetryPolicy, StatusRange
from tether.core.traffic.routes import (
    BackendRef,
    HttpRouteMatch,
    ParentRef,
    PathMatch,
    PathMatchKind,
    Route,
    RouteKind,
    RouteRule,
    RouteTable,
)
from tether.core.traffic.timeouts import RouteTimeouts

MAX_DOCUMENTS = 1000
_PROFILE_NAME = re.compile(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.[a-z0-9.-]+")
ROUTE_GROUPS = ("gateway.networking.k8s.io/", "policy.linkerd.io/")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceProfile:
    """A Linkerd ServiceProfile: ordered routes and the service's retry budget."""

    service: ParentRef
    routes: tuple[Route, ...]
    budget: RetryBudgetConfig | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """Everything one file (or the control plane) says about routes, budgets and rate limits."""

    routes: tuple[Route, ...] = ()
    profiles: tuple[ServiceProfile, ...] = ()
    rate_limits: tuple[tuple[str, str, LocalRateLimitConfig], ...] = ()  # (namespace, Server name, limits)

    def table_for(self, name: str, namespace: str = "default", port: int | None = None) -> RouteTable:
        """The routes for Service ``namespace/name`` (port ``port``).

        A ServiceProfile for the service wins over routes, as in Linkerd; otherwise the HTTPRoutes and
        GRPCRoutes whose parentRefs name the service (any port, or ``port``), plus routes without parents.
        """
        profile = self._profile(name, namespace)
        if profile is not None:
            return RouteTable(profile.routes, first_match=True)
        return RouteTable([route for route in self.routes if _attached(route, name, namespace, port)])

    def budget_for(self, name: str, namespace: str = "default") -> RetryBudgetConfig | None:
        """The service's budget from its ServiceProfile, or None (use the default)."""
        profile = self._profile(name, namespace)
        return profile.budget if profile is not None else None

    def _profile(self, name: str, namespace: str) -> ServiceProfile | None:
        for profile in self.profiles:
            if (profile.service.name, profile.service.namespace) == (name, namespace):
                return profile
        return None


def _attached(route: Route, name: str, namespace: str, port: int | None) -> bool:
    if not route.parents:
        return True
    return any(
        (p.name, p.namespace) == (name, namespace) and (p.port is None or port is None or p.port == port)
        for p in route.parents
    )


def load_route_yaml(text: str, source: str) -> RouteConfig:
    """Parse ``text`` (one or more YAML documents) read from ``source``."""
    try:
        documents = [document for document in yaml.safe_load_all(text) if document is not None]
    except RecursionError:
        raise ConfigFileError(source, "file", "nests too deeply", "flatten the YAML") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "file"
        raise ConfigFileError(source, where, "is not valid YAML", "fix the YAML syntax") from None
    return read_route_documents(documents, source)


def read_route_documents(documents: Sequence[object], source: str) -> RouteConfig:
    if len(documents) > MAX_DOCUMENTS:
        raise ConfigFileError(source, "file", f"holds {len(documents)} documents", f"split it ({MAX_DOCUMENTS} max)")
    routes: list[Route] = []
    profiles: list[ServiceProfile] = []
    limits: list[tuple[str, str, LocalRateLimitConfig]] = []
    for index, document in enumerate(documents):
        where = f"{source} (document {index + 1})" if len(documents) > 1 else source
        if not isinstance(document, Mapping):
            raise ConfigFileError(
                where, "document", "is not a mapping", "write a Kubernetes object (kind, metadata, spec)"
            )
        top = FieldReader(where, "", document)
        top.known("apiVersion", "kind", "metadata", "spec", "status")
        kind = top.text("kind")
        if kind in ("HTTPRoute", "GRPCRoute"):
            _check_api(top, ROUTE_GROUPS)
            routes.append(read_route(top, RouteKind(kind)))
        elif kind == "ServiceProfile":
            _check_api(top, ("linkerd.io/",))
            profiles.append(_read_profile(top))
        elif kind == "HTTPLocalRateLimitPolicy":
            _check_api(top, ("policy.linkerd.io/",))
            limits.append(_read_rate_limit(top))
        else:
            raise top.fail(
                "kind",
                f"{kind!r} is not supported",
                "use HTTPRoute, GRPCRoute, ServiceProfile or HTTPLocalRateLimitPolicy",
            )
    return RouteConfig(routes=tuple(routes), profiles=tuple(profiles), rate_limits=tuple(limits))


def _check_api(top: FieldReader, groups: tuple[str, ...]) -> None:
    api = top.text("apiVersion")
    if not api.startswith(groups):
        raise top.fail("apiVersion", f"{api!r} does not go with kind {top.data['kind']}", f"use {groups[0]}...")


# ------------------------------------------------------------------ ServiceProfile and rate limits


def _read_profile(top: FieldReader) -> ServiceProfile:
    name, namespace, _annotations = read_metadata(top)
    found = _PROFILE_NAME.fullmatch(name)
    if found is None:
        raise top.child("metadata").fail(
            "name", f"{name!r} is not a service FQDN", "name it SERVICE.NAMESPACE.svc.cluster.local"
        )
    spec = top.child("spec")
    spec.known("routes", "retryBudget", "dstOverrides", "opaquePorts")
    backends = tuple(_override(entry) for entry in read_items(spec, "dstOverrides", MAX_LIST))
    routes = tuple(_profile_route(entry, namespace, backends) for entry in read_items(spec, "routes", 256))
    budget = _budget(spec.child("retryBudget")) if "retryBudget" in spec.data else None
    return ServiceProfile(service=ParentRef(found.group(1), found.group(2)), routes=routes, budget=budget)


def _profile_route(entry: FieldReader, namespace: str, backends: tuple[BackendRef, ...]) -> Route:
    entry.known("name", "condition", "responseClasses", "isRetryable", "timeout")
    name = entry.text("name")
    matches = _profile_condition(entry.child("condition"))
    failures = []
    for response_class in read_items(entry, "responseClasses", MAX_LIST):
        response_class.known("condition", "isFailure")
        if response_class.data.get("isFailure") is True:
            failures.append(_status_condition(response_class.child("condition")))
    retry = None
    if read_boolean(entry, "isRetryable"):
        retry = RetryPolicy(conditions=RetryConditions(http=tuple(failures) or (SERVER_ERRORS,)))
    timeout = read_duration(entry, "timeout") if "timeout" in entry.data else 0
    rule = RouteRule(
        name=name, matches=matches, backends=backends, retry=retry, timeouts=RouteTimeouts(request_ns=timeout or None)
    )
    return Route(kind=RouteKind.PROFILE, name=name, namespace=namespace, rules=(rule,))


def _profile_condition(node: FieldReader, nested: bool = False) -> tuple[HttpRouteMatch, ...]:
    node.known("method", "pathRegex", "all", "any", "not")
    if "not" in node.data:
        raise node.fail("not", "is not supported", "rewrite the condition with method, pathRegex, all and any")
    if "any" in node.data:
        if len(node.data) > 1 or nested:
            raise node.fail("any", "is nested or combined with other fields", "write one any of simple conditions")
        entries = read_items(node, "any", MAX_MATCHES_PER_RULE)
        return tuple(match for entry in entries for match in _profile_condition(entry, nested=True))
    leaves = [node, *read_items(node, "all", MAX_LIST)]
    method = regex = None
    for leaf in leaves:
        if leaf is not node:
            leaf.known("method", "pathRegex")
        for key in ("method", "pathRegex"):
            if key in leaf.data and (method if key == "method" else regex) is not None:
                raise leaf.fail(key, "is given twice in one all", "split the route in two")
        method = leaf.data.get("method", method)
        regex = leaf.text("pathRegex") if "pathRegex" in leaf.data else regex
    if method is not None and method not in METHODS:
        raise node.fail("method", f"{method!r} is not an HTTP method", f"use one of {', '.join(METHODS)}")
    if method is None and regex is None:
        raise node.fail("pathRegex", "and method are both missing", "give a pathRegex, a method or both")
    path = compiled(node, "pathRegex", lambda: PathMatch(PathMatchKind.REGEX, regex)) if regex else None
    return (HttpRouteMatch(method=method, **({"path": path} if path else {})),)


def _status_condition(node: FieldReader) -> StatusRange:
    node.known("status")
    status = node.child("status")
    status.known("min", "max")
    low = read_integer(status, "min", 100, 599, default=100)
    return StatusRange(low, read_integer(status, "max", low, 599, default=599))


def _override(entry: FieldReader) -> BackendRef:
    entry.known("authority", "weight")
    authority = entry.text("authority")
    host, _, port = authority.partition(":")
    weight = entry.data.get("weight", 1)
    milli = _quantity_milli(weight)
    if milli is None:
        raise entry.fail("weight", f"{weight!r} is not a weight", 'write a whole number or milli units such as "500m"')
    parts = host.split(".")
    port_number = int(port) if port.isascii() and port.isdigit() and 0 < int(port) < 65536 else None
    return BackendRef(name=parts[0], namespace=parts[1] if len(parts) > 2 else None, port=port_number, weight=milli)


def _quantity_milli(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1000:
        return value * 1000
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,6}m?", value):
        milli = int(value[:-1]) if value.endswith("m") else int(value) * 1000
        return milli if milli <= 1_000_000 else None
    return None


def _budget(node: FieldReader) -> RetryBudgetConfig:
    node.known("retryRatio", "minRetriesPerSecond", "ttl")
    ttl = read_duration(node, "ttl") if "ttl" in node.data else 10 * 10**9
    if not TTL_NS_MIN <= ttl <= TTL_NS_MAX:
        raise node.fail("ttl", "is out of range", "give 1s to 60s")
    return RetryBudgetConfig(
        retry_ratio=read_ratio(node, "retryRatio", 0.2, maximum=1000.0),
        min_retries_per_s=read_integer(node, "minRetriesPerSecond", 0, 1_000_000, default=10),
        ttl_ns=ttl,
    )


def _read_rate_limit(top: FieldReader) -> tuple[str, str, LocalRateLimitConfig]:
    _name, namespace, _annotations = read_metadata(top)
    spec = top.child("spec")
    spec.known("targetRef", "total", "identity", "overrides")
    target = spec.child("targetRef")
    target.known("group", "kind", "name")
    overrides = []
    for entry in read_items(spec, "overrides", MAX_LIST):
        entry.known("requestsPerSecond", "clientRefs")
        clients = []
        for ref in read_items(entry, "clientRefs", MAX_LIST):
            ref.known("kind", "name", "namespace")
            ns = ref.text("namespace", namespace)
            clients.append(f"{ref.text('name')}.{ns}.serviceaccount.identity.linkerd.cluster.local")
        overrides.append(
            (tuple(clients), RateLimit(requests_per_s=read_integer(entry, "requestsPerSecond", 1, 10_000_000)))
        )
    config = LocalRateLimitConfig(
        total=_rate(spec, "total"), identity=_rate(spec, "identity"), overrides=tuple(overrides)
    )
    return namespace, target.text("name"), config


def _rate(spec: FieldReader, key: str) -> RateLimit | None:
    if key not in spec.data:
        return None
    node = spec.child(key)
    node.known("requestsPerSecond")
    return RateLimit(requests_per_s=read_integer(node, "requestsPerSecond", 1, 10_000_000))
