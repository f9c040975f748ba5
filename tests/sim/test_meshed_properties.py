"""Whole-mesh invariants for the meshed topology under faults that Hypothesis draws: seeds and fault rates.

Topology: an HTTP/1.1 client and a gRPC client -> outbound proxy -> (HTTP/2, transport header) -> the
inbound proxy beside each app -> the app's HTTP/1.1 server or h2c gRPC server. A crash of an app host takes
its servers and its inbound proxy down together. A failure writes the drawn scenario to .tether-failures/
and prints the command that replays it.

The draws reach the shapes that once broke the core (test_grpc_scenarios.py and test_meshed.py keep one test
each): bodies larger than the 64 KiB HTTP/2 stream window, gRPC responses that outgrow the client's
window, and gRPC on port 50051, whose 35-byte transport header ends exactly at a segment boundary with an
MSS of 7.
"""

from __future__ import annotations

from typing import Any

from fault_draws import faults, report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.sim.scenario import scenario_from_mapping

DURATION_S = 5.0
CRASHABLE = ["out", "app-1", "app-2"]
LINKS = [("client", "out"), ("caller", "out"), ("out", "app-1"), ("out", "app-2")]


def app(draw: st.DrawFn, host: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    latency = {"min": 1, "tail_mean": draw(st.sampled_from([1, 20]))}
    failure_rate = draw(st.sampled_from([0.0, 0.1]))
    http = {"host": host, "port": 8080, "latency_ms": latency, "failure_rate": failure_rate}
    grpc = {"host": host, "port": 50051, "latency_ms": latency, "failure_rate": failure_rate}
    inbound = {"host": host, "inbound": {"port": 4143, "to": 8080, "config": {"response_timeout_ms": 5000}}}
    return http, grpc, inbound


def meshed(draw: st.DrawFn) -> dict[str, Any]:
    big = draw(st.booleans())  # large HTTP bodies with large segments, or small ones cut into tiny segments
    mss = draw(st.sampled_from([1460, 65536] if big else [7, 536]))
    apps = [app(draw, "app-1"), app(draw, "app-2")]
    return {
        "duration_s": DURATION_S,
        "network": {
            "latency_ms": {
                "min": draw(st.sampled_from([0.05, 0.5, 2.0])),
                "tail_mean": draw(st.sampled_from([0.0, 0.5, 5.0])),
            },
            "loss": draw(st.sampled_from([0.0, 0.0, 0.01, 0.05])),
            "mss": mss,
        },
        "servers": [http for http, _, _ in apps],
        "grpc_servers": [grpc for _, grpc, _ in apps],
        "proxies": [
            {
                "host": "out",
                "port": 4140,
                "service": "web",
                "routes": {"web": ["app-1:8080", "app-2:8080"], "echo": ["app-1:50051", "app-2:50051"]},
                "meshed": {"web": 4143, "echo": 4143},
                "config": {
                    "protocol": draw(st.sampled_from(["http1", "detect"])),
                    "connect_timeout_ms": 1000,
                    "response_timeout_ms": draw(st.sampled_from([500, 3000])),
                    "max_buffered_bytes": draw(st.sampled_from([1024, 65536])),
                    "h2_max_concurrent_streams": draw(st.sampled_from([3, 100])),
                },
            },
            *(inbound for _, _, inbound in apps),
        ],
        "clients": [
            {
                "host": "client",
                "target": "out:4140",
                "authority": "web",
                "rate_per_s": draw(st.sampled_from([20, 60])) if mss > 7 else 20,  # 7-byte segments are slow
                "connections": draw(st.sampled_from([1, 4, 16])),
                "request_bytes": [0, draw(st.sampled_from([0, 60000, 200000] if big else [0, 1500]))],
                "response_bytes": [0, draw(st.sampled_from([20000, 200000] if big else [100, 1500]))],
            },
        ],
        "grpc_clients": [
            {
                "host": "caller",
                "target": "out:4140",
                "authority": "echo",
                "rate_per_s": draw(st.sampled_from([10, 30])),
                "connections": draw(st.sampled_from([1, 2])),
                "request_bytes": [0, draw(st.sampled_from([100, 3000, 60000] if mss > 7 else [100, 3000]))],
                "response_bytes": [0, draw(st.sampled_from([100, 4096, 98304] if mss > 7 else [100, 4096]))],
                "connection_window": draw(st.sampled_from([65_535, 1_048_576])),
            },
        ],
        "faults": draw(faults(duration_s=DURATION_S, crashable=CRASHABLE, links=LINKS, most=3, longest_s=5.0)),
    }


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_meshed_invariants_hold_under_drawn_faults(data: st.DataObject, seed: int) -> None:
    mapping = meshed(data.draw)
    scenario = scenario_from_mapping(mapping, "<hypothesis>")
    result = scenario.build(seed).run(scenario.duration_ns)
    assert not result.violations, report(mapping, seed, result.violations, prefix="meshed")
    assert result.requests > 0 and result.grpc_statuses
    if seed % 4 == 0:  # replaying a seed gives the same run
        again = scenario.build(seed).run(scenario.duration_ns)
        assert again.trace_hash == result.trace_hash, report(
            mapping, seed, ["trace hash differs on replay"], prefix="meshed"
        )
