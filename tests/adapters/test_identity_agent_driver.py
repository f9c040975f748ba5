"""The identity agent on real sockets (adapters/identity_agent.py) against the grpcio identity service in process.

The agent's schedule is shortened through its config (refreshes every 0.2 s, backoff from 50 ms) so that a
refresh, a lost service and a reconnection all happen within a second or two of real time; the assertions
are about what happened, never about how fast.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from identity_mesh import HANG_GUARD_S, Mesh, identity_of
from net_helpers import free_port

from tether.adapters.identity_agent import ControlUpdate, IdentityAgentDriver
from tether.adapters.identity_service import IdentityService, load_mesh, start_server
from tether.core.address import Address
from tether.core.identity.agent import IdentityAgent, IdentityAgentConfig
from tether.core.identity.client import IdentityClientConfig
from tether.core.identity.tokens import EmbeddedTokenVerifier
from tether.core.proxy.mtls import CertificateUpdate

pytestmark = pytest.mark.realsocket

MS = 1_000_000
WEB = identity_of("shop", "web")


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh.create(tmp_path / "mesh")


class Service:
    """The grpcio identity service of ``mesh`` on a fixed port, which the test can stop and start again."""

    def __init__(self, mesh: Mesh) -> None:
        loaded, key = load_mesh(mesh.files, time.time())
        self.service = IdentityService(loaded.issuer, EmbeddedTokenVerifier(key))
        self.port = free_port()
        self.server = None

    def start(self) -> None:
        self.server, _port = start_server(self.service, Address("127.0.0.1", self.port), workers=2)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None)
            self.server = None


@pytest.fixture
def service(mesh: Mesh) -> Iterator[Service]:
    running = Service(mesh)
    yield running
    running.stop()


def agent_for(mesh: Mesh, port: int, **schedule: int) -> IdentityAgent:
    client = IdentityClientConfig(
        identity=WEB, trust_anchors_pem=mesh.trust_anchors.read_bytes(), backoff_base_ns=50 * MS, **schedule
    )
    config = IdentityAgentConfig(client=client, service_address=Address("127.0.0.1", port))
    return IdentityAgent(config, random.Random(1))


def run_until(driver: IdentityAgentDriver, *steps: tuple[Callable[[], bool], Callable[[], None]]) -> None:
    """Run the driver; for each (condition, then) in turn, wait for the condition and do ``then``."""

    async def main() -> None:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(driver.run)
            with anyio.fail_after(HANG_GUARD_S):
                for condition, then in steps:
                    while not condition():
                        await anyio.sleep(0.01)
                    then()
            task_group.cancel_scope.cancel()

    anyio.run(main)


def nothing() -> None:
    return None


def test_agent_driver_gets_a_certificate_and_hands_every_proxy_the_contexts(mesh: Mesh, service: Service):
    service.start()
    agent = agent_for(mesh, service.port)
    updates: list[ControlUpdate] = []
    driver = IdentityAgentDriver(agent, token_file=mesh.token("shop", "web"), apply=updates.append)
    run_until(driver, (lambda: agent.ready, nothing))
    [update] = updates
    assert isinstance(update, CertificateUpdate) and update.contexts.identity == WEB
    assert abs(update.wall_time_s - time.time()) < HANG_GUARD_S
    assert agent.metrics().refresh_count == 1 and agent.connects == 1


def test_agent_driver_retries_until_the_token_file_appears(mesh: Mesh, service: Service, tmp_path: Path):
    service.start()
    token_file = tmp_path / "token"
    agent = agent_for(mesh, service.port)
    driver = IdentityAgentDriver(agent, token_file=token_file, apply=lambda update: None)

    def write_token() -> None:
        token_file.write_bytes(mesh.token("shop", "web").read_bytes())

    run_until(driver, (lambda: "No such file" in agent.last_failure, write_token), (lambda: agent.ready, nothing))
    assert str(token_file) in agent.last_failure and agent.metrics().failure_count >= 1


def test_agent_driver_reconnects_with_backoff_after_the_service_went_away(mesh: Mesh, service: Service):
    service.start()
    agent = agent_for(mesh, service.port, refresh_min_ns=200 * MS, refresh_max_ns=200 * MS)
    updates: list[ControlUpdate] = []
    driver = IdentityAgentDriver(agent, token_file=mesh.token("shop", "web"), apply=updates.append)
    failures_seen: list[int] = []

    def lost() -> bool:
        return "cannot connect" in agent.last_failure

    def restart() -> None:
        failures_seen.append(agent.metrics().failure_count)
        service.start()

    run_until(
        driver,
        (lambda: agent.ready, service.stop),  # certified, then the service goes away
        (lost, restart),  # a refresh finds nothing listening: the attempt fails, the client backs off
        (lambda: agent.metrics().refresh_count >= 2, nothing),  # and a later attempt reconnects
    )
    assert agent.connects >= 2, "the refresh after the restart opened a new connection"
    assert failures_seen[0] >= 1 and agent.ready
    assert len(updates) == agent.metrics().refresh_count, "every certificate reached the proxies"
