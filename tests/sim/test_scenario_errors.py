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
