"""The admin server of a real `tether proxy`: Linkerd's metrics, readiness, log level, shutdown."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.realsocket

FAMILIES = {
    "request": "counter",
    "response": "counter",
    "response_latency_ms": "histogram",
    "tcp_open": "counter",
    "tcp_close": "counter",
    "tcp_open_connections": "gauge",
    "tcp_read_bytes": "counter",
    "tcp_write_bytes": "counter",
    "tcp_connection_duration_ms": "histogram",
}


def test_admin_metrics_parse_with_linkerd_names_and_labels(nginx, tether_proxy_to) -> None:
    (nginx.root / "a.txt").write_text("a")
    proxy = tether_proxy_to(nginx.port)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(3):
            assert client.get("/a.txt").status_code == 200
        assert client.get("/missing").status_code == 404
    text = httpx.get(f"{proxy.admin_url}/metrics", timeout=10).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in FAMILIES} == FAMILIES
    requests = [s for s in families["request"].samples if s.name == "request_total"]
    assert sum(s.value for s in requests) == 4
    labels = requests[0].labels
    assert labels["direction"] == "outbound" and labels["target_addr"] == f"127.0.0.1:{nginx.port}"
    assert labels["authority"] == f"127.0.0.1:{proxy.port}" and labels["tls"] == "no_identity"
    responses = {
        (s.labels["status_code"], s.labels["classification"]): s.value
        for s in families["response"].samples
        if s.name == "response_total"
    }
    assert responses == {("200", "success"): 3, ("404", "success"): 1}
    counts = [s for s in families["response_latency_ms"].samples if s.name == "response_latency_ms_count"]
    assert sum(s.value for s in counts) == 4
    open_now = {s.labels["peer"]: s.value for s in families["tcp_open_connections"].samples}
    assert open_now == {"src": 0, "dst": 1}, "the client left; one pooled connection to nginx stays"
    read = {s.labels["peer"]: s.value for s in families["tcp_read_bytes"].samples}
    assert read["src"] > 0 and read["dst"] > 0


def test_admin_ready_live_and_log_level(tether_proxy_to, unused_port: int) -> None:
    proxy = tether_proxy_to(unused_port)
    admin = proxy.admin_url
    assert httpx.get(f"{admin}/ready").text == "ready\n"
    assert httpx.get(f"{admin}/live").status_code == 200
    assert httpx.put(f"{admin}/proxy-log-level", content="debug").status_code == 204
    assert httpx.get(f"{admin}/proxy-log-level").text == "debug\n"
    refused = httpx.put(f"{admin}/proxy-log-level", content="loud")
    assert refused.status_code == 400 and "use one of" in refused.text
    assert httpx.post(f"{admin}/shutdown").status_code == 404, "shutdown is off unless enabled"
    assert httpx.get(f"{admin}/nope").status_code == 404


def test_admin_shutdown_when_enabled_drains_and_exits(tether_proxy_to, unused_port: int) -> None:
    proxy = tether_proxy_to(unused_port, extra=["--shutdown-endpoint"])
    assert httpx.post(f"{proxy.admin_url}/shutdown").status_code == 202
    assert proxy.process.wait(timeout=15) == 0
