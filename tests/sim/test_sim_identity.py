"""Identity in the simulator: rotation with zero failures, a cut-off proxy failing closed at expiry, a peer
with the wrong identity refused, and one seed giving one trace hash although TLS bytes differ between runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tether.core.config_file import ConfigFileError
from tether.sim.cli import sim_command
from tether.sim.scenario import load_scenario, scenario_from_mapping

SCENARIOS = Path(__file__).parents[2] / "sim" / "scenarios"
WEB = "web.default.serviceaccount.identity.linkerd.cluster.local"
CLIENT = "client.default.serviceaccount.identity.linkerd.cluster.local"


def run(name: str, *, seed: int | None = None, duration_s: float | None = None) -> dict:
    scenario = load_scenario(SCENARIOS / f"{name}.yaml")
    if duration_s is not None:
        scenario = scenario.shortened(duration_s)
    return scenario.build(scenario.default_seed if seed is None else seed).run(scenario.duration_ns).as_json()


def test_certificates_rotate_for_ten_days_with_zero_failed_requests() -> None:
    result = run("mtls-rotation")
    assert result["violations"] == []
    assert result["virtual_s"] >= 864_000
    assert result["requests"] > 500 and result["responses"] == {"200": result["requests"]}
    by_peer = result["identity"]["requests_by_peer"]
    assert set(by_peer["out"]) == {WEB} and by_peer["out"][WEB] >= result["requests"], "every request over mTLS"
    for inbound in ("web-1/inbound", "web-2/inbound"):
        assert set(by_peer[inbound]) == {CLIENT} and by_peer[inbound][CLIENT] > 0, by_peer
    hosts = result["identity"]["hosts"]
    assert set(hosts) == {"out", "web-1", "web-2"}
    for report in hosts.values():
        # 24 h leaves renewed at 70%: a new certificate every 16.8 h, 14 rotations in 10 days.
        assert report["rotations"] >= 13 and report["expiries"] == 0 and report["failed_attempts"] == 0


def test_a_cut_off_proxy_serves_until_expiry_then_fails_closed_naming_it() -> None:
    result = run("mtls-cutoff")
    assert result["violations"] == []
    timeline = result["timeline"]
    # Partitioned from 300 s; its certificate (issued at ~0 s, renewal failing from 420 s) lives until 600 s.
    before_expiry = timeline[2:599]
    assert all(row["ok"] == row["requests"] for row in before_expiry)
    # Expiry refuses new mTLS connections; the HTTP/2 connection opened before it serves on until it idles out
    # (core/proxy/mtls.py: each connection keeps the contexts it started with). From the first failure on,
    # every request fails until the partition heals.
    first_failure = next(row["t"] for row in timeline if row["ok"] < row["requests"])
    assert 600 <= first_failure < 700
    after_expiry = timeline[first_failure:900]
    assert sum(row["requests"] for row in after_expiry) > 50
    assert all(row["ok"] == 0 for row in after_expiry)
    # Failed closed: nothing reached the workload, and every failure is the proxy's own answer; the first ones
    # name the expiry. (Behind the proxy's failfast queue, requests waiting on the refused connections may end by
    # the response timeout instead, whose text does not name the expiry.)
    assert sum(result["endpoint_timeline"]["web-1"][first_failure:900]) == 0
    reasons = result["identity"]["proxy_error_reasons"]
    failed = sum(row["requests"] - row["ok"] for row in timeline)
    assert sum(reasons.values()) == failed
    expiry = f"mTLS to {WEB}: this proxy's certificate expired (valid until 2026-01-01T00:10:00Z, not renewed)"
    assert reasons.get(expiry, 0) > 0, reasons
    out = result["identity"]["hosts"]["out"]
    assert out["expiries"] == 1 and out["failed_attempts"] > 0
    # The partition heals at 900 s: the next retry certifies (by 930 s: the backoff is at most 30 s) and serving
    # resumes, once the proxy tries the endpoint again (its own backoff after the refused connects).
    assert all(row["ok"] == row["requests"] for row in timeline[1000:])
    assert out["certificates"] == 2
    assert result["identity"]["hosts"]["web-1"]["expiries"] == 0


def test_a_peer_presenting_the_wrong_identity_is_refused() -> None:
    result = run("mtls-wrong-identity")
    assert result["violations"] == []
    assert result["endpoint_requests"]["web-2"] == 0, "the impostor's workload must never be reached"
    assert result["endpoint_requests"]["web-1"] > 100
    refused = result["identity"]["refused_peers"]["web-2"]
    assert refused["expected"] == WEB
    assert refused["presented"] == "billing.default.serviceaccount.identity.linkerd.cluster.local"
    assert refused["refusals"] > 0
    assert all(
        "mTLS handshake failed" in reason and WEB in reason for reason in result["identity"]["proxy_error_reasons"]
    )


SHORTENED_S = {"mtls-wrong-identity": 20.0, "mtls-rotation": 2 * 86400.0, "mtls-cutoff": None}


@pytest.mark.parametrize("name", sorted(SHORTENED_S))
def test_identity_runs_same_seed_same_trace_hash(name: str) -> None:
    """Real TLS: ciphertext, signatures and handshake sizes differ between the two runs; the trace must not."""
    duration = SHORTENED_S[name]
    first, second = run(name, seed=5, duration_s=duration), run(name, seed=5, duration_s=duration)
    assert first["trace_hash"] == second["trace_hash"]
    assert first["identity"] == second["identity"]
    assert run(name, seed=6, duration_s=duration)["trace_hash"] != first["trace_hash"]


def test_tether_sim_prints_the_identity_report() -> None:
    done = CliRunner().invoke(sim_command, [str(SCENARIOS / "mtls-wrong-identity.yaml")])
    assert done.exit_code == 0, done.output
    output = " ".join(done.output.split())
    assert "rotations" in output and "all invariants held" in output
    assert "presented billing.default.serviceaccount" in output and f"expected {WEB}" in output


BASE = {
    "duration_s": 5,
    "identity": {"host": "identity"},
    "servers": [{"host": "web-1", "port": 8080}],
    "proxies": [
        {"host": "out", "identity": "client", "routes": {"web": ["web-1:8080"]}, "meshed": {"web": 4143}},
        {"host": "web-1", "identity": "web", "inbound": {"port": 4143, "to": 8080}},
    ],
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"identity": {"leaf_lifetime": "1 fortnight"}}, "identity.leaf_lifetime"),
        ({"identity": {"leaf_lifetime": "5s"}}, "identity.leaf_lifetime"),
        ({"identity": {"colour": "blue"}}, "identity.colour"),
        ({"proxies": [{**BASE["proxies"][0], "identity": "Not_A_Name"}, BASE["proxies"][1]]}, "proxies[0].identity"),
        (
            {"proxies": [{**BASE["proxies"][0]}, {**BASE["proxies"][1], "identity": {"who": "web"}}]},
            "proxies[1].identity.who",
        ),
        (
            {"proxies": [{k: v for k, v in BASE["proxies"][0].items() if k != "identity"}, BASE["proxies"][1]]},
            "proxies[0].identity",
        ),
    ],
)
def test_identity_fields_are_validated(change: dict, field: str) -> None:
    data = {**BASE, **change}
    if "identity" in change and isinstance(change["identity"], dict):
        data["identity"] = {"host": "identity", **change["identity"]}
    with pytest.raises(ConfigFileError) as raised:
        scenario_from_mapping(data, "test.yaml")
    assert raised.value.field == field, str(raised.value)


def test_a_proxy_identity_without_a_control_plane_is_an_error() -> None:
    data = {key: value for key, value in BASE.items() if key != "identity"}
    with pytest.raises(ConfigFileError, match="needs a control plane"):
        scenario_from_mapping(data, "test.yaml")


def test_a_crashed_host_and_control_plane_come_back_with_fresh_certificates() -> None:
    """web-1 (workload, inbound proxy and agent) crashes at 10 s and restarts at 13 s, while the control plane
    is down (12 s to 15 s): web-1's new agent retries until the control plane is back, then certifies."""
    data = {
        **BASE,
        "duration_s": 30,
        "clients": [{"host": "client", "target": "out:4140", "authority": "web", "start_s": 1, "rate_per_s": 5}],
        "faults": [
            {"kind": "crash", "at_s": 10, "duration_s": 3, "hosts": ["web-1"]},
            {"kind": "crash", "at_s": 12, "duration_s": 3, "hosts": ["identity"]},
        ],
    }
    data["proxies"] = [{**BASE["proxies"][0], "port": 4140, "service": "web"}, BASE["proxies"][1]]
    scenario = scenario_from_mapping(data, "crash.yaml")
    result = scenario.build(3).run(scenario.duration_ns).as_json()
    assert result["violations"] == []
    hosts = result["identity"]["hosts"]
    assert hosts["web-1"]["certificates"] == 2, "the restarted host certifies again"
    # Its new agent's connection waited (SYN retries) for the control plane: issued at 15 s or later.
    assert hosts["web-1"]["valid_until"] >= "2026-01-02T00:00:15Z", hosts["web-1"]
    assert hosts["out"]["certificates"] == 1 and hosts["out"]["expiries"] == 0
    timeline = result["timeline"]
    assert all(row["ok"] == row["requests"] for row in timeline[2:10] + timeline[20:29])
