"""The traffic families in the admin server's exposition: parsed by prometheus_client, with Linkerd's
names and labels, and values that add up to what the proxy did."""

from __future__ import annotations

import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tether.adapters.prometheus import render
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.traffic.route_config import load_route_yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from traffic_world import MS, Behaviour, World  # noqa: E402

A, B, C = Address("10.7.0.1", 80), Address("10.7.0.2", 80), Address("10.7.0.3", 80)
ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default, annotations: {retry.linkerd.io/http: 5xx}}
spec:
  parentRefs: [{name: web, port: 80}]
  rules:
    - name: split
      backendRefs: [{name: web-v1, weight: 1}, {name: web-v2, weight: 1}]
"""


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_route_backend_retry_and_balancer_families_parse_and_add_up() -> None:
    world = World({"web": [A], "web-v1": [B], "web-v2": [C]}, routes=load_route_yaml(ROUTES, "r.yaml"))
    world.behaviour[C] = Behaviour(failures_left=3)
    for index in range(40):
        world.at(index * MS, lambda: world.send("web:80"))
    world.run()
    parsed = families(render(world.proxy.telemetry))
    statuses = parsed["outbound_http_route_request_statuses"]
    (sample,) = [s for s in statuses.samples if s.name.endswith("_total")]
    assert sample.value == 40 and sample.labels["http_status"] == "200" and sample.labels["error"] == ""
    labels = sample.labels
    assert (labels["parent_name"], labels["parent_port"], labels["route_name"], labels["route_rule"]) == (
        "web",
        "80",
        "web",
        "split",
    )
    backend_requests = {
        s.labels["backend_name"]: s.value for s in parsed["outbound_http_route_backend_requests"].samples
    }
    retries = sum(s.value for s in parsed["outbound_http_route_retry_requests"].samples)
    assert sum(backend_requests.values()) == 40 + retries and retries == 3
    answers = {
        (s.labels["backend_name"], s.labels["http_status"]): s.value
        for s in parsed["outbound_http_route_backend_response_statuses"].samples
    }
    assert answers[("web-v2", "503")] == 3
    assert parsed["outbound_http_route_request_duration_seconds"].type == "histogram"
    endpoints = {
        (s.labels["backend_name"], s.labels["endpoint_state"]): s.value
        for s in parsed["outbound_http_balancer_endpoints"].samples
    }
    assert endpoints[("web-v1", "ready")] == 1 and endpoints[("web-v2", "pending")] == 0


def test_an_ejected_endpoint_shows_as_pending_and_as_ejected() -> None:
    world = World({"web": [A, B]}, config=ProxyConfig(balancer="round-robin"))
    world.behaviour[B] = Behaviour(status=500)
    for index in range(30):
        world.at(index * MS, lambda: world.send("web"))
    world.run(until_ns=100 * MS)
    parsed = families(render(world.proxy.telemetry))
    linkerd = {s.labels["endpoint_state"]: s.value for s in parsed["outbound_http_balancer_endpoints"].samples}
    ours = {s.labels["endpoint_state"]: s.value for s in parsed["outbound_balancer_endpoint_states"].samples}
    assert linkerd == {"ready": 1, "pending": 1}
    assert ours == {"ready": 1, "pending": 0, "probing": 0, "ejected": 1, "draining": 0}
