"""Reading HTTPRoute and GRPCRoute documents, and the field readers every route document shares.

Part of reading a routes file (route_config.py dispatches each document by kind). ``read_route`` reads
one HTTPRoute (gateway.networking.k8s.io or policy.linkerd.io) or GRPCRoute into a ``Route``:

- hostnames, parentRefs, and rules with matches (path Exact / PathPrefix / RegularExpression, headers and
  queryParams Exact / RegularExpression, method; for gRPC, service / method Exact and headers), filters
  (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, and Tether's ``Fault``), backendRefs with
  weights, timeouts (request, backendRequest) and retry (codes, attempts, backoff);
- Linkerd's annotations: ``retry.linkerd.io/http|grpc|limit|timeout`` and
  ``timeout.linkerd.io/request|response|idle``, which override the rule fields (as Linkerd has it), and
  Tether's ``tether.io/allow-l5d-request-headers: "true"``, which lets requests carry ``l5d-retry-*``.

Gateway API list limits (16 rules, 64 matches per rule and 128 per route, 16 hostnames, filters, backends
and header matches) are enforced, so a hostile file cannot make matching arbitrarily slow. Every error
names the field as a path (``spec.rules[2].matches[0].path.type``) and the fix. The ``read_*`` helpers at
the end (and ``compiled``) are the small readers the ServiceProfile and rate-limit readers use too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.core.config_file import FieldReader
from tether.core.traffic.retry import (
    MAX_RETRY_LIMIT,
    SERVER_ERRORS,
    Backoff,
    RetryConditions,
    RetryConfigError,
    RetryPolicy,
    StatusRange,
    parse_grpc_conditions,
    parse_http_conditions,
    parse_retry_limit,
)
from tether.core.traffic.routes import (
    MAX_HEADER_VALUE_LENGTH,
    MAX_PATH_LENGTH,
    BackendRef,
    FaultAbort,
    FaultDelay,
    FaultInjection,
    GrpcRouteMatch,
    HeaderModifier,
    HttpRouteMatch,
    MirrorPolicy,
    ParentRef,
    PathMatch,
    PathMatchKind,
    Route,
    RouteKind,
    RouteRule,
    ValueMatch,
)
from tether.core.traffic.timeouts import DurationError, GrpcCode, RouteTimeouts, parse_duration_ns

MAX_RULES, MAX_MATCHES_PER_RULE, MAX_MATCHES_PER_ROUTE = 16, 64, 128
MAX_LIST = 16  # hostnames, filters, backendRefs, header and query matches, header modifier entries
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_GRPC_SERVICE = re.compile(r"(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
ALLOW_HEADERS_ANNOTATION = "tether.io/allow-l5d-request-headers"
RETRY_ANNOTATIONS = (
    "retry.linkerd.io/http",
    "retry.linkerd.io/grpc",
    "retry.linkerd.io/limit",
    "retry.linkerd.io/timeout",
)
TIMEOUT_ANNOTATIONS = {
    "timeout.linkerd.io/request": "request_ns",
    "timeout.linkerd.io/response": "response_ns",
    "timeout.linkerd.io/idle": "idle_ns",
}


def read_route(top: FieldReader, kind: RouteKind) -> Route:
    name, namespace, annotations = read_metadata(top)
    spec = top.child("spec")
    spec.known("parentRefs", "hostnames", "rules")
    rules_in = read_items(spec, "rules", MAX_RULES)
    defaults = _annotation_defaults(top, annotations, kind)
    rules = tuple(_read_rule(rule, kind, defaults) for rule in rules_in) or (_default_rule(defaults),)
    total = sum(len(rule.matches) for rule in rules)
    if total > MAX_MATCHES_PER_ROUTE:
        raise spec.fail("rules", f"hold {total} matches in all", f"use at most {MAX_MATCHES_PER_ROUTE} per route")
    return Route(
        kind=kind,
        name=name,
        namespace=namespace,
        hostnames=tuple(_hostname(spec, f"hostnames[{i}]", h) for i, h in enumerate(_strings(spec, "hostnames"))),
        rules=rules,
        parents=tuple(_parent(ref, namespace) for ref in read_items(spec, "parentRefs", 32)),
    )


def read_metadata(top: FieldReader) -> tuple[str, str, Mapping[str, Any]]:
    metadata = top.child("metadata")
    annotations = metadata.child("annotations")
    for key, value in annotations.data.items():
        if not isinstance(value, str):
            raise annotations.fail(str(key), f"{value!r} is not a string", 'quote annotation values, e.g. "3"')
    return metadata.text("name"), metadata.text("namespace", "default"), annotations.data


def _parent(ref: FieldReader, namespace: str) -> ParentRef:
    ref.known("group", "kind", "name", "namespace", "port", "sectionName")
    return ParentRef(ref.text("name"), ref.text("namespace", namespace), _port(ref, "port"))


@dataclass(frozen=True, slots=True)
class _RuleDefaults:
    """What a route's annotations impose on every rule (None: leave the rule's own setting)."""

    retry: RetryPolicy | None
    timeouts: dict[str, int | None]
    allow_headers: bool


def _annotation_defaults(top: FieldReader, annotations: Mapping[str, Any], kind: RouteKind) -> _RuleDefaults:
    node = FieldReader(top.source, "metadata.annotations.", annotations)
    timeouts = {  # "0s" disables the timeout: None overrides the rule's own value
        field: _duration_value(node, key, annotations[key]) or None
        for key, field in TIMEOUT_ANNOTATIONS.items()
        if key in annotations
    }
    allow = annotations.get(ALLOW_HEADERS_ANNOTATION, "false")
    if allow not in ("true", "false"):
        raise node.fail(ALLOW_HEADERS_ANNOTATION, f"{allow!r} is not a boolean", 'write "true" or "false"')
    return _RuleDefaults(_annotation_retry(node, annotations, kind), timeouts, allow == "true")


def _annotation_retry(node: FieldReader, annotations: Mapping[str, Any], kind: RouteKind) -> RetryPolicy | None:
    keys = [key for key in annotations if str(key).startswith("retry.linkerd.io/")]
    if not keys:
        return None
    wrong = "retry.linkerd.io/grpc" if kind is RouteKind.HTTP else "retry.linkerd.io/http"
    if wrong in annotations:
        raise node.fail(wrong, f"is not valid on a {kind.value}", "use /http on HTTPRoutes and /grpc on GRPCRoutes")
    http: tuple[StatusRange, ...] = ()
    grpc: frozenset[GrpcCode] = frozenset()
    limit = 1
    for key in keys:
        if key not in RETRY_ANNOTATIONS:
            raise node.fail(key, "is not a retry annotation", f"use one of {', '.join(RETRY_ANNOTATIONS)}")
        try:
            if key == "retry.linkerd.io/http":
                http = parse_http_conditions(annotations[key])
            elif key == "retry.linkerd.io/grpc":
                grpc = parse_grpc_conditions(annotations[key])
            elif key == "retry.linkerd.io/limit":
                limit = parse_retry_limit(annotations[key])
        except RetryConfigError as error:
            raise node.fail(key, str(error), "see docs/traffic.md") from None
    if not http and not grpc:  # limit or timeout alone: retry what the route kind usually fails with
        http, grpc = (
            ((SERVER_ERRORS,), frozenset()) if kind is RouteKind.HTTP else ((), frozenset({GrpcCode.UNAVAILABLE}))
        )
    timeout = annotations.get("retry.linkerd.io/timeout")
    attempt_timeout = _duration_value(node, "retry.linkerd.io/timeout", timeout) if timeout is not None else 0
    return RetryPolicy(
        limit=limit, conditions=RetryConditions(http=http, grpc=grpc), attempt_timeout_ns=attempt_timeout or None
    )


def _default_rule(defaults: _RuleDefaults) -> RouteRule:
    return RouteRule(
        retry=defaults.retry,
        timeouts=RouteTimeouts(**defaults.timeouts),
        allow_l5d_request_headers=defaults.allow_headers,
    )


def _read_rule(rule: FieldReader, kind: RouteKind, defaults: _RuleDefaults) -> RouteRule:
    fields = ["name", "matches", "filters", "backendRefs"]
    if kind is RouteKind.HTTP:
        fields += ["timeouts", "retry"]
    rule.known(*fields)
    read_match = _http_match if kind is RouteKind.HTTP else _grpc_match
    matches = tuple(read_match(match) for match in read_items(rule, "matches", MAX_MATCHES_PER_RULE))
    filters = _filters(rule)
    timeouts = _rule_timeouts(rule) if kind is RouteKind.HTTP else {}
    timeouts.update(defaults.timeouts)
    retry = defaults.retry if defaults.retry is not None else (_rule_retry(rule) if kind is RouteKind.HTTP else None)
    return RouteRule(
        name=rule.text("name") if "name" in rule.data else None,
        matches=matches,  # type: ignore[arg-type]
        backends=tuple(_backend(ref) for ref in read_items(rule, "backendRefs", MAX_LIST)),
        timeouts=RouteTimeouts(**timeouts),
        retry=retry,
        allow_l5d_request_headers=defaults.allow_headers,
        **filters,
    )


def _http_match(match: FieldReader) -> HttpRouteMatch:
    match.known("path", "headers", "queryParams", "method")
    path = match.child("path")
    path.known("type", "value")
    path_kind = _choice(path, "type", {k.value: k for k in PathMatchKind}, PathMatchKind.PREFIX)
    value = path.text("value", "/")
    if len(value) > MAX_PATH_LENGTH:
        raise path.fail("value", f"has {len(value)} characters", f"use at most {MAX_PATH_LENGTH}")
    if path_kind is not PathMatchKind.REGEX and (not value.startswith("/") or "//" in value):
        raise path.fail("value", f"{value!r} is not an absolute path", "start with '/' and never repeat '/'")
    method = match.data.get("method")
    if method is not None and method not in METHODS:
        raise match.fail("method", f"{method!r} is not an HTTP method", f"use one of {', '.join(METHODS)}")
    return HttpRouteMatch(
        path=compiled(path, "value", lambda: PathMatch(path_kind, value)),
        headers=_value_matches(match, "headers", header=True),
        query_params=_value_matches(match, "queryParams", header=False),
        method=method,
    )


def _grpc_match(match: FieldReader) -> GrpcRouteMatch:
    match.known("method", "headers")
    method = match.child("method")
    method.known("type", "service", "method")
    if method.data.get("type", "Exact") != "Exact":
        raise method.fail(
            "type", f"{method.data['type']!r} is not supported", "use Exact (Tether has no gRPC regex match)"
        )
    service, name = method.data.get("service"), method.data.get("method")
    if "method" in match.data and service is None and name is None:
        raise method.fail("service", "and method are both missing", "give a service, a method or both")
    if service is not None and not (isinstance(service, str) and _GRPC_SERVICE.fullmatch(service)):
        raise method.fail(
            "service", f"{service!r} is not a gRPC service name", "write package.Service, e.g. grpc.health.v1.Health"
        )
    if name is not None and not (isinstance(name, str) and _GRPC_METHOD.fullmatch(name)):
        raise method.fail("method", f"{name!r} is not a gRPC method name", "write a name such as Check")
    return GrpcRouteMatch(service=service, method=name, headers=_value_matches(match, "headers", header=True))


def _value_matches(node: FieldReader, key: str, *, header: bool) -> tuple[ValueMatch, ...]:
    seen: set[str] = set()
    out = []
    for entry in read_items(node, key, MAX_LIST):
        entry.known("type", "name", "value")
        kind = _choice(entry, "type", {"Exact": False, "RegularExpression": True}, False)
        name = entry.text("name")
        if header and not _HEADER_NAME.fullmatch(name):
            raise entry.fail("name", f"{name!r} is not a header name", "use letters, digits and -")
        name = name.lower() if header else name
        value = entry.text("value")
        if len(value) > MAX_HEADER_VALUE_LENGTH:
            raise entry.fail("value", f"has {len(value)} characters", f"use at most {MAX_HEADER_VALUE_LENGTH}")
        if name in seen:
            continue  # Gateway API: only the first entry for a name counts
        seen.add(name)
        out.append(compiled(entry, "value", lambda n=name, v=value, k=kind: ValueMatch(n, v, k)))
    return tuple(out)


def compiled(node: FieldReader, key: str, build: Callable[[], Any]) -> Any:
    try:
        return build()
    except re.error as error:
        raise node.fail(key, f"is not a valid regular expression ({error})", "write a Python re pattern") from None


def _filters(rule: FieldReader) -> dict[str, Any]:
    out: dict[str, Any] = {"mirrors": ()}
    mirrors = []
    readers = {
        "RequestHeaderModifier": "request_headers",
        "ResponseHeaderModifier": "response_headers",
        "Fault": "fault",
    }
    for entry in read_items(rule, "filters", MAX_LIST):
        kind = entry.text("type")
        if kind == "RequestMirror":
            entry.known("type", "requestMirror")
            mirrors.append(_mirror(entry.child("requestMirror")))
            continue
        if kind not in readers:
            raise entry.fail(
                "type", f"{kind!r} is not supported", f"use one of {', '.join([*readers, 'RequestMirror'])}"
            )
        field = readers[kind]
        key = "fault" if kind == "Fault" else kind[0].lower() + kind[1:]
        entry.known("type", key)
        if field in out:
            raise entry.fail("type", f"{kind} appears twice in this rule", "merge them into one filter")
        out[field] = _fault(entry.child(key)) if kind == "Fault" else _header_modifier(entry.child(key))
    out["mirrors"] = tuple(mirrors)
    return out


def _header_modifier(node: FieldReader) -> HeaderModifier:
    node.known("set", "add", "remove")
    seen: dict[str, str] = {}
    pairs = {}
    for action in ("set", "add"):
        entries = []
        for entry in read_items(node, action, MAX_LIST):
            entry.known("name", "value")
            entries.append((_modified_name(entry, "name", entry.text("name"), action, seen), entry.text("value")))
        pairs[action] = tuple(entries)
    removed = tuple(
        _modified_name(node, f"remove[{i}]", name, "remove", seen) for i, name in enumerate(_strings(node, "remove"))
    )
    return HeaderModifier(set=pairs["set"], add=pairs["add"], remove=removed)


def _modified_name(node: FieldReader, key: str, name: str, action: str, seen: dict[str, str]) -> str:
    if not _HEADER_NAME.fullmatch(name):
        raise node.fail(key, f"{name!r} is not a header name", "use letters, digits and -")
    lowered = name.lower()
    if lowered in seen:
        raise node.fail(key, f"{name!r} is already in {seen[lowered]}", "give each header one action")
    seen[lowered] = action
    return lowered


def _mirror(node: FieldReader) -> MirrorPolicy:
    node.known("backendRef", "percent", "fraction")
    if "percent" in node.data and "fraction" in node.data:
        raise node.fail("fraction", "is given with percent", "give one of percent or fraction")
    ratio = 1.0
    if "percent" in node.data:
        ratio = read_integer(node, "percent", 0, 100) / 100
    elif "fraction" in node.data:
        fraction = node.child("fraction")
        fraction.known("numerator", "denominator")
        denominator = read_integer(fraction, "denominator", 1, 1_000_000, default=100)
        ratio = read_integer(fraction, "numerator", 0, denominator) / denominator
    return MirrorPolicy(backend=_backend(node.child("backendRef"), weighted=False), ratio=ratio)


def _fault(node: FieldReader) -> FaultInjection:
    node.known("abort", "delay")
    if not node.data:
        raise node.fail("abort", "and delay are both missing", "give abort, delay or both")
    abort = delay = None
    if "abort" in node.data:
        spec = node.child("abort")
        spec.known("httpStatus", "grpcStatus", "ratio")
        grpc = spec.data.get("grpcStatus")
        if grpc is not None and (not isinstance(grpc, str) or grpc not in GrpcCode.__members__):
            raise spec.fail("grpcStatus", f"{grpc!r} is not a gRPC code name", "write e.g. UNAVAILABLE")
        abort = FaultAbort(
            http_status=read_integer(spec, "httpStatus", 200, 599),
            grpc_status=GrpcCode[grpc] if grpc is not None else None,
            ratio=read_ratio(spec, "ratio", 1.0),
        )
    if "delay" in node.data:
        spec = node.child("delay")
        spec.known("duration", "ratio")
        duration = read_duration(spec, "duration")
        if duration == 0:
            raise spec.fail("duration", "is 0", "give a positive duration such as 100ms")
        delay = FaultDelay(duration_ns=duration, ratio=read_ratio(spec, "ratio", 1.0))
    return FaultInjection(abort=abort, delay=delay)


def _backend(ref: FieldReader, *, weighted: bool = True) -> BackendRef:
    ref.known("group", "kind", "name", "namespace", "port", *(("weight",) if weighted else ()))
    kind = ref.data.get("kind", "Service")
    if kind != "Service":
        raise ref.fail("kind", f"{kind!r} is not supported", "refer to a Service")
    namespace = ref.text("namespace") if "namespace" in ref.data else None
    weight = read_integer(ref, "weight", 0, 1_000_000, default=1) if weighted else 1
    return BackendRef(name=ref.text("name"), namespace=namespace, port=_port(ref, "port"), weight=weight)


def _rule_timeouts(rule: FieldReader) -> dict[str, int]:
    node = rule.child("timeouts")
    node.known("request", "backendRequest")
    out = {}
    for key, field in (("request", "request_ns"), ("backendRequest", "response_ns")):
        if key in node.data and (value := read_duration(node, key)):
            out[field] = value  # 0s disables the timeout, as the Gateway API says
    if out.get("response_ns", 0) > out.get("request_ns", out.get("response_ns", 0)):
        raise node.fail("backendRequest", "is longer than request", "make backendRequest at most the request timeout")
    return out


def _rule_retry(rule: FieldReader) -> RetryPolicy | None:
    if "retry" not in rule.data:
        return None
    node = rule.child("retry")
    node.known("codes", "attempts", "backoff")
    codes = node.data.get("codes", [500, 502, 503, 504])
    if not isinstance(codes, list) or not all(isinstance(c, int) and 400 <= c <= 599 for c in codes):
        raise node.fail("codes", f"{codes!r} is not a list of statuses", "write e.g. [500, 503], each 400-599")
    backoff = Backoff()
    if "backoff" in node.data:
        base = read_duration(node, "backoff")
        if not 1_000_000 <= base <= 1_000_000_000:
            raise node.fail("backoff", "is out of range", "give 1ms to 1s")
        backoff = Backoff(min_ns=base, max_ns=10 * base)  # the default's shape: 25 ms to 250 ms
    return RetryPolicy(
        limit=read_integer(node, "attempts", 0, MAX_RETRY_LIMIT, default=1),
        conditions=RetryConditions(http=tuple(StatusRange(c, c) for c in codes)),
        backoff=backoff,
    )


# ------------------------------------------------------------------ small readers, shared


def read_items(node: FieldReader, key: str, maximum: int) -> list[FieldReader]:
    items = node.items(key)
    if len(items) > maximum:
        raise node.fail(key, f"has {len(items)} entries", f"use at most {maximum}")
    return items


def _strings(node: FieldReader, key: str) -> list[str]:
    values = node.data.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise node.fail(key, f"{values!r} is not a list of names", "write one '- name' per entry")
    if len(values) > MAX_LIST:
        raise node.fail(key, f"has {len(values)} entries", f"use at most {MAX_LIST}")
    return values


def _hostname(node: FieldReader, key: str, value: str) -> str:
    if len(value) > 253 or not _HOSTNAME.fullmatch(value):
        raise node.fail(key, f"{value!r} is not a hostname", "write lower-case DNS names, optionally *.example.com")
    return value


def _choice(node: FieldReader, key: str, choices: Mapping[str, Any], default: Any) -> Any:
    value = node.data.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or value not in choices:
        raise node.fail(key, f"{value!r} is not supported", f"use one of {', '.join(choices)}")
    return choices[value]


def read_integer(node: FieldReader, key: str, low: int, high: int, *, default: int | None = None) -> int:
    value = node.data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise node.fail(key, f"{value!r} is not a whole number from {low} to {high}", f"give {low} to {high}")
    return value


def _port(node: FieldReader, key: str) -> int | None:
    return read_integer(node, key, 1, 65535) if key in node.data else None


def read_boolean(node: FieldReader, key: str) -> bool:
    value = node.data.get(key, False)
    if not isinstance(value, bool):
        raise node.fail(key, f"{value!r} is not a boolean", "write true or false")
    return value


def read_ratio(node: FieldReader, key: str, default: float, *, maximum: float = 1.0) -> float:
    value = node.number(key, default, maximum=maximum)
    if not math.isfinite(value):  # YAML's .nan passes every comparison
        raise node.fail(key, f"{value} is not a number", f"give 0 to {maximum}")
    return value


def read_duration(node: FieldReader, key: str) -> int:
    return _duration_value(node, key, node.data.get(key))


def _duration_value(node: FieldReader, key: str, value: object) -> int:
    if not isinstance(value, str):
        raise node.fail(key, f"{value!r} is not a duration", 'write a quoted duration such as "500ms" or "10s"')
    try:
        return parse_duration_ns(value)
    except DurationError as error:
        raise node.fail(key, str(error), "for example 500ms, 10s or 1m30s") from None
