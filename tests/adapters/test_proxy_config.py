"""`tether proxy` configuration: file < environment < flags, errors that name source, field and fix,
and both roles running from one file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from click.testing import CliRunner
from net_helpers import free_port, wait_for_port

from tether.adapters.cli import cli
from tether.adapters.proxy_config import LIMIT_KEYS, load
from tether.core.address import Address
from tether.core.config_file import ConfigFileError

FILE = """
admin: 127.0.0.1:5191
limits: {connect_timeout_ms: 250}
outbound:
  listen: 127.0.0.1:5140
  routes: {web: ["10.0.0.5:8080", "10.0.0.6:8080"]}
inbound:
  to: 127.0.0.1:8080
  limits: {protocol: opaque}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return str(path)


def test_config_file_builds_both_roles(tmp_path: Path) -> None:
    process = load(config_path=write(tmp_path, FILE), environ={})
    assert process.admin == Address("127.0.0.1", 5191)
    outbound, inbound = process.roles
    assert (outbound.name, outbound.listen, outbound.config.protocol) == (
        "outbound",
        Address("127.0.0.1", 5140),
        "detect",
    )
    assert outbound.routes["web"] == (Address("10.0.0.5", 8080), Address("10.0.0.6", 8080)) and outbound.dial_authority
    assert (inbound.listen, inbound.endpoints, inbound.config.protocol) == (
        Address("0.0.0.0", 4143),
        (Address("127.0.0.1", 8080),),
        "opaque",
    )
    assert outbound.config.connect_timeout_ns == inbound.config.connect_timeout_ns == 250_000_000


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    environ = {"TETHER_PROXY_CONNECT_TIMEOUT_MS": "500", "TETHER_PROXY_OUTBOUND_LISTEN": "127.0.0.1:6140"}
    process = load(config_path=write(tmp_path, FILE), environ=environ)
    assert process.roles[0].listen == Address("127.0.0.1", 6140)
    assert process.roles[0].config.connect_timeout_ns == 500_000_000
    flagged = load(config_path=write(tmp_path, FILE), environ=environ, flag_limits={"connect_timeout_ms": 700})
    assert flagged.roles[0].config.connect_timeout_ns == 700_000_000


def test_without_inbound_workload_only_outbound_runs() -> None:
    (only,) = load(config_path=None, environ={}).roles
    assert (only.name, only.listen) == ("outbound", Address("127.0.0.1", 4140))


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        (FILE.replace("127.0.0.1:5140", "nowhere"), {}, ["proxy.yaml", "outbound.listen", "HOST:PORT"]),
        (FILE + "colour: red\n", {}, ["proxy.yaml", "colour", "use one of"]),
        (FILE.replace("protocol: opaque", "protocol: carrier-pigeon"), {}, ["inbound.limits.protocol", "use one of"]),
        (
            FILE,
            {"TETHER_PROXY_CONNECT_TIMEOUT_MS": "soon"},
            ["environment", "TETHER_PROXY_CONNECT_TIMEOUT_MS", "number"],
        ),
        (FILE, {"TETHER_PROXY_COLOUR": "red"}, ["environment", "TETHER_PROXY_COLOUR", "use one of"]),
        ("outbound: [1, 2]\n", {}, ["outbound", "mapping"]),
    ],
)
def test_config_errors_name_source_field_and_fix(
    tmp_path: Path, text: str, environ: dict[str, str], expected: list[str]
) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load(config_path=write(tmp_path, text), environ=environ)
    for part in expected:
        assert part in str(caught.value)


def test_cli_bad_config_exits_2_with_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, FILE.replace("connect_timeout_ms: 250", "connect_timeout_ms: -3"))
    done = subprocess.run(
        [sys.executable, "-m", "tether.adapters.cli", "proxy", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "limits.connect_timeout_ms" in done.stderr and "proxy.yaml" in done.stderr


@pytest.mark.realsocket
def test_outbound_and_inbound_roles_from_one_file(tmp_path: Path, nginx) -> None:
    (nginx.root / "r.txt").write_text("routed\n")
    outbound, inbound, admin = free_port(), free_port(), free_port()
    path = write(
        tmp_path,
        f"""
admin: 127.0.0.1:{admin}
outbound:
  listen: 127.0.0.1:{outbound}
  routes: {{site: ["127.0.0.1:{nginx.port}"]}}
inbound:
  listen: 127.0.0.1:{inbound}
  to: 127.0.0.1:{nginx.port}
""",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tether.adapters.cli", "proxy", "--config", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(admin)
        routed = httpx.get(f"http://127.0.0.1:{outbound}/r.txt", headers={"host": "site"}, timeout=10)
        dialled = httpx.get(
            f"http://127.0.0.1:{outbound}/r.txt", headers={"host": f"127.0.0.1:{nginx.port}"}, timeout=10
        )
        inbound_reply = httpx.get(f"http://127.0.0.1:{inbound}/r.txt", timeout=10)
        assert routed.text == dialled.text == inbound_reply.text == "routed\n"
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
        assert 'request_total{direction="outbound",authority="site"' in metrics
        assert 'request_total{direction="inbound"' in metrics
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0


def test_inbound_workload_on_an_opaque_port_is_tunnelled(tmp_path: Path) -> None:
    process = load(config_path=write(tmp_path, "inbound: {to: 127.0.0.1:3306}\n"), environ={})
    inbound = next(role for role in process.roles if role.name == "inbound")
    assert inbound.config.protocol == "opaque"
    custom = load(
        config_path=write(tmp_path, "limits: {opaque_ports: [7000]}\ninbound: {to: 127.0.0.1:3306}\n"), environ={}
    )
    assert next(role for role in custom.roles if role.name == "inbound").config.protocol == "detect"


ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  rules: [{backendRefs: [{name: web-v1, weight: 9}, {name: web-v2, weight: 1}]}]
"""


def test_routes_file_from_the_config_file_the_environment_or_the_flag(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "other.yaml").write_text(ROUTES.replace("name: web}", "name: other}"))
    from_file = load(config_path=write(tmp_path, "routes: routes.yaml\n"), environ={})
    assert from_file.routes is not None and from_file.routes.routes[0].name == "web"
    assert from_file.routes_source == str(tmp_path / "routes.yaml")  # relative to the config file
    environ = {"TETHER_PROXY_ROUTES": str(tmp_path / "other.yaml")}
    from_env = load(config_path=write(tmp_path, "routes: routes.yaml\n"), environ=environ)
    assert from_env.routes is not None and from_env.routes.routes[0].name == "other"
    flagged = load(config_path=None, environ=environ, routes_path=str(tmp_path / "routes.yaml"))
    assert flagged.routes is not None and flagged.routes.routes[0].name == "web"
    assert load(config_path=None, environ={}).routes is None


def test_routes_errors_name_the_routes_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES.replace("weight: 9", "weight: nine"))
    with pytest.raises(ConfigFileError) as caught:
        load(config_path=None, environ={}, routes_path=str(tmp_path / "routes.yaml"))
    assert "routes.yaml" in str(caught.value) and "weight" in str(caught.value)
    with pytest.raises(ConfigFileError) as missing:
        load(config_path=None, environ={}, routes_path=str(tmp_path / "absent.yaml"))
    assert "absent.yaml" in str(missing.value)


def test_balancer_and_breaker_settings_from_file_and_environment(tmp_path: Path) -> None:
    text = "limits: {balancer: round-robin, breaker_consecutive_failures: 3, failfast_timeout_ms: 500}\n"
    process = load(config_path=write(tmp_path, text), environ={"TETHER_PROXY_FAILFAST_QUEUE_CAPACITY": "10"})
    config = process.roles[0].config
    assert (config.balancer, config.breaker_consecutive_failures) == ("round-robin", 3)
    assert (config.failfast_timeout_ns, config.failfast_queue_capacity) == (500_000_000, 10)
    with pytest.raises(ConfigFileError) as caught:
        load(config_path=None, environ={"TETHER_PROXY_BALANCER": "random"})
    assert "balancer" in str(caught.value) and "p2c-ewma" in str(caught.value)


BREAKER_FILE = """
limits:
  breaker_consecutive_failures: 0
  breaker_success_rate_min: 0.8
  breaker_success_rate_window_ms: 5000
  breaker_backoff_max_ms: 20000
outbound:
  limits: {breaker_backoff_jitter_ratio: 0.2}
"""


def test_breaker_success_rate_from_file_environment_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, BREAKER_FILE)
    from_file = load(config_path=path, environ={}).roles[0].config.breaker_config()
    assert from_file is not None and from_file.success_rate is not None
    assert (from_file.consecutive_failures_max, from_file.success_rate.success_rate_min) == (0, 0.8)
    assert (from_file.backoff_max_ns, from_file.jitter_ratio) == (20 * 10**9, 0.2)
    assert from_file.success_rate.bucket_ns * from_file.success_rate.buckets == 5 * 10**9
    environ = {"TETHER_PROXY_BREAKER_SUCCESS_RATE_MIN": "0.9", "TETHER_PROXY_BREAKER_SUCCESS_RATE_BUCKETS": "5"}
    from_env = load(config_path=path, environ=environ).roles[0].config
    assert (from_env.breaker_success_rate_min, from_env.breaker_success_rate_buckets) == (0.9, 5)
    flags = {"breaker_success_rate_min": 0.95, "breaker_backoff_min_ms": 100}
    flagged = load(config_path=path, environ=environ, flag_limits=flags).roles[0].config
    assert (flagged.breaker_success_rate_min, flagged.breaker_backoff_min_ns) == (0.95, 100_000_000)
    assert flagged.breaker_success_rate_buckets == 5  # the environment's, where no flag says otherwise


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"TETHER_PROXY_BREAKER_SUCCESS_RATE_MIN": "often"}, ["environment", "BREAKER_SUCCESS_RATE_MIN", "number"]),
        ({"TETHER_PROXY_BREAKER_SUCCESS_RATE_MIN": "1.5"}, ["limits.breaker_success_rate_min", "at most 1.0"]),
        ({"TETHER_PROXY_BREAKER_BACKOFF_MAX_MS": "500"}, ["limits.breaker_backoff_max_ms", "breaker_backoff_min"]),
        ({"TETHER_PROXY_BREAKER_SUCCESS_RATE_BUCKETS": "0"}, ["limits.breaker_success_rate_buckets", "at least 1"]),
        ({"TETHER_PROXY_BREAKER_JITTER": "0.1"}, ["TETHER_PROXY_BREAKER_BACKOFF_JITTER_RATIO", "use one of"]),
    ],
)
def test_breaker_environment_errors_name_the_setting_and_fix(environ: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigFileError) as caught:
        load(config_path=None, environ=environ)
    for part in expected:
        assert part in str(caught.value)


def test_cli_breaker_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr(anyio, "run", lambda _run, process, **_options: started.append(process))
    for variable in [name for name in os.environ if name.startswith("TETHER_PROXY_")]:
        monkeypatch.delenv(variable)
    flags = ["--breaker-success-rate-min", "0.7", "--breaker-success-rate-window-ms", "3000"]
    flags += ["--breaker-success-rate-ready-endpoints-min", "2", "--breaker-consecutive-failures", "0"]
    done = CliRunner().invoke(cli, ["proxy", *flags])
    assert done.exit_code == 0, done.output
    (process,) = started
    breaker = process.roles[0].config.breaker_config()  # type: ignore[attr-defined]
    assert breaker is not None and breaker.success_rate is not None
    assert (breaker.consecutive_failures_max, breaker.success_rate.success_rate_min) == (0, 0.7)
    assert (breaker.success_rate.ready_endpoints_min, breaker.success_rate.bucket_ns) == (2, 300_000_000)


def test_cli_breaker_flag_out_of_range_exits_2_naming_the_flag() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tether.adapters.cli", "proxy", "--breaker-success-rate-min", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--breaker-success-rate-min" in done.stderr and "0.0<=x<=1.0" in done.stderr


def test_every_limit_key_and_breaker_flag_is_documented() -> None:
    reference = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert [key for key in LIMIT_KEYS if f"`{key}`" not in reference] == []
    flags = [param.opts[0] for param in cli.commands["proxy"].params if param.name and "breaker" in param.name]
    assert len(flags) == 10 and [flag for flag in flags if f"`{flag}`" not in reference] == []
