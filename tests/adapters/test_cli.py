"""The `tether` command: help everywhere, clear errors with meaningful exit codes, and the demo."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

TETHER = [sys.executable, "-m", "tether.adapters.cli"]


@pytest.mark.parametrize("args", [[], ["proxy"], ["demo"], ["sim"]])
def test_cli_help_on_every_command(args: list[str]) -> None:
    done = subprocess.run([*TETHER, *args, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout


def test_cli_lists_plugin_sim_command() -> None:
    done = subprocess.run([*TETHER, "--help"], capture_output=True, text=True, timeout=60)
    for command in ("proxy", "demo", "sim"):
        assert f"  {command} " in done.stdout


def test_cli_bad_address_exits_2_naming_the_option() -> None:
    done = subprocess.run(
        [*TETHER, "proxy", "--listen", "127.0.0.1", "--to", "127.0.0.1:1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--listen" in done.stderr and "HOST:PORT" in done.stderr


def test_cli_port_in_use_exits_3() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*TETHER, "proxy", "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.realsocket
def test_demo_runs_with_full_success() -> None:
    done = subprocess.run([*TETHER, "demo", "--duration", "5", "--json"], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["load"]["sent"] > 50 and report["load"]["failed"] == 0
    for name in ("web", "backend"):
        service = report["services"][name]
        assert service["rps"] > 0
        assert service["success_rate"] == 1.0
        assert service["p99_ms"] is not None
    # mTLS is on by default: every request of each meshed hop came over mTLS, from the pod that calls it.
    suffix = ".demo.serviceaccount.identity.linkerd.cluster.local"
    assert report["mtls"] is True
    for name, client in (("web", "loadgen"), ("backend", "web")):
        service = report["services"][name]
        assert service["identity"] == name + suffix
        assert (service["mtls_share"], service["client_ids"]) == (1.0, [client + suffix])


@pytest.mark.realsocket
def test_demo_without_mtls_runs_plaintext_meshed_hops() -> None:
    command = [*TETHER, "demo", "--duration", "2", "--rate", "20", "--json", "--no-mtls"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["mtls"] is False and report["load"]["failed"] == 0
    for service in report["services"].values():
        assert service["success_rate"] == 1.0
        assert (service["identity"], service["mtls_share"], service["client_ids"]) == (None, 0.0, [])


def test_sim_json_has_the_documented_fields() -> None:
    done = subprocess.run(
        [*TETHER, "sim", "basic", "--seed", "5", "--json"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for key in ("seed", "trace_hash", "requests", "responses", "errors", "latency_ms", "virtual_s", "wall_s"):
        assert key in report
    assert report["seed"] == 5 and set(report["latency_ms"]) == {"p50", "p99", "p999"}
