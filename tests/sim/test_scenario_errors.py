"""A bad scenario file gets an error naming the file, the field and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tether.sim.scenario import ScenarioError, load_scenario

GOOD = """
duration_s: 5
servers: [{host: b, port: 8080}]
proxies: [{host: p, port: 4140, to: ["b:8080"]}]
clients: [{host: c, target: "p:4140", rate_per_s: 10}]
"""


@pytest.mark.parametrize(
    ("old", "new", "field", "fix"),
    [
        ("rate_per_s: 10", "rate_per_s: lots", "clients[0].rate_per_s", "give a number"),
        ("rate_per_s: 10", "rate_per_s: 10, colour: red", "clients[0].colour", "use one of"),
        ('to: ["b:8080"]', 'to: ["b"]', "proxies[0].to", "HOST:PORT"),
        ("duration_s: 5", "duration_s: -1", "duration_s", "at least"),
        ("port: 4140", "port: 4140, config: {connect_timeout_ms: 0}", "config.connect_timeout_ms", "at least"),
    ],
)
def test_scenario_error_names_file_field_and_fix(tmp_path: Path, old: str, new: str, field: str, fix: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert str(path) in message
    assert field in message
    assert fix in message


def test_scenario_fault_with_unknown_host_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fault.yaml"
    path.write_text(GOOD + "faults: [{kind: crash, at_s: 1, duration_s: 1, hosts: [nowhere]}]\n")
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.hosts.*known host"):
        load_scenario(path)


def test_tether_sim_exits_2_on_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("duration_s: [1, 2]\n")
    done = subprocess.run(
        [sys.executable, "-m", "tether.adapters.cli", "sim", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "duration_s" in done.stderr and "bad.yaml" in done.stderr


MESHED = """
duration_s: 5
servers: [{host: b, port: 8080}]
grpc_servers: [{host: b, port: 50051}]
proxies:
  - {host: p, port: 4140, routes: {web: ["b:8080"]}, meshed: {web: 4143}}
  - {host: b, inbound: {port: 4143, to: 8080}}
clients: [{host: c, target: "p:4140", authority: web}]
grpc_clients: [{host: g, target: "p:4140", authority: web}]
"""


@pytest.mark.parametrize(
    ("old", "new", "field", "fix"),
    [
        ("meshed: {web: 4143}", "meshed: {api: 4143}", "proxies[0].meshed.api", "add it under routes"),
        ("meshed: {web: 4143}", "meshed: {web: none}", "proxies[0].meshed.web", "give a number"),
        ("inbound: {port: 4143, to: 8080}", "inbound: {port: 4143}", "proxies[1].inbound.to", "give a number"),
        ("inbound: {port: 4143, to: 8080}", "inbound: {port: 8080, to: 8080}", "proxies[1].inbound.port", "own port"),
        ("to: 8080}", "to: 8080, config: {protocol: tcp}}", "proxies[1].inbound.config.protocol", "use one of"),
        (
            '{host: g, target: "p:4140"',
            '{host: g, colour: red, target: "p:4140"',
            "grpc_clients[0].colour",
            "use one of",
        ),
        ("grpc_servers: [{host: b, port: 50051}]", "grpc_servers: [{host: b, port: 8080}]", "grpc_servers", "own port"),
    ],
)
def test_meshed_and_grpc_fields_name_file_field_and_fix(
    tmp_path: Path, old: str, new: str, field: str, fix: str
) -> None:
    path = tmp_path / "meshed.yaml"
    assert old in MESHED
    path.write_text(MESHED.replace(old, new))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    message = str(caught.value)
    assert str(path) in message and field in message and fix in message, message


def test_meshed_scenario_loads(tmp_path: Path) -> None:
    path = tmp_path / "meshed.yaml"
    path.write_text(MESHED)
    assert load_scenario(path).duration_ns == 5_000_000_000
