"""The mesh ``tether demo`` runs: pods of an application and its proxies, and (with mTLS) an identity service.

    load generator -> [loadgen outbound] =mTLS=> [web inbound] -> web API -> [web outbound] =mTLS=> [backend
    inbound] -> backend

A pod is what Kubernetes would run as one: an application (none for the load generator), an inbound proxy in
front of it, an outbound proxy for what it calls, and, with mTLS, one identity agent that certifies the pod's
service account and hands every certificate to both of its proxies. Everything runs in this process on
loopback ports picked by the kernel.

The identity service is the real one (adapters/identity_service.py on grpcio, in this process): its mesh is
made with ``identity init``'s code in a temporary directory that is deleted at the end, and each pod's token
is minted with the embedded token code, written to a file the pod's agent reads, as ``tether proxy`` does.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from tether.adapters.driver import ProxyDriver
from tether.adapters.http_server import Handler, serve_http
from tether.adapters.identity_agent import ControlUpdate, IdentityAgentDriver
from tether.adapters.identity_cli import write_mesh
from tether.adapters.identity_service import IdentityService, MeshFiles, load_mesh, start_server
from tether.adapters.proxy_config import RoleConfig
from tether.adapters.serve import build_role_proxy
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.identity.agent import IdentityAgent, IdentityAgentConfig
from tether.core.identity.client import IdentityClientConfig
from tether.core.identity.names import Mesh, WorkloadIdentity
from tether.core.identity.tokens import EmbeddedTokenVerifier, TokenKey, mint_token
from tether.core.proxy import Proxy

NAMESPACE = "demo"
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
CERTIFIED_WITHIN_S = 15.0  # the three pods' first certificates; each takes a few ms on an idle machine


@dataclass(slots=True)
class IdentityPlane:
    """The demo's identity service and what pods need from it."""

    files: MeshFiles
    address: Address
    token_key: TokenKey

    def identity(self, serviceaccount: str) -> str:
        return WorkloadIdentity(namespace=NAMESPACE, serviceaccount=serviceaccount, mesh=MESH).name

    def token_file(self, serviceaccount: str) -> Path:
        path = self.files.directory / f"{serviceaccount}.token"
        path.write_text(
            mint_token(self.token_key, namespace=NAMESPACE, serviceaccount=serviceaccount, wall_time_s=time.time())
        )
        return path


@contextmanager
def identity_plane() -> Iterator[IdentityPlane]:
    """A new mesh in a temporary directory and its identity service on a free loopback port, for the run."""
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as directory:
        files = MeshFiles(Path(directory) / "mesh")
        write_mesh(files, MESH, wall_time_s=time.time())
        loaded, token_key = load_mesh(files, time.time())
        service = IdentityService(loaded.issuer, EmbeddedTokenVerifier(token_key))
        server, port = start_server(service, Address("127.0.0.1", 0), workers=2)
        try:
            yield IdentityPlane(files, Address("127.0.0.1", port), token_key)
        finally:
            server.stop(None)


@dataclass(slots=True)
class Peer:
    """What a caller's outbound proxy needs to reach a pod: its application's address, its inbound proxy's
    port, and its identity (None without mTLS)."""

    name: str
    app: Address
    inbound_port: int
    identity: str | None


@dataclass(slots=True)
class Pod:
    name: str
    inbound: Proxy | None = None
    inbound_address: Address | None = None
    outbound_address: Address | None = None
    app_address: Address | None = None
    agent: IdentityAgent | None = None
    drivers: list[ProxyDriver] = field(default_factory=list)

    @property
    def identity(self) -> str | None:
        return self.agent.identity if self.agent is not None else None

    def as_peer(self) -> Peer:
        assert self.app_address is not None and self.inbound_address is not None
        return Peer(self.name, self.app_address, self.inbound_address.port, self.identity)


async def _listen() -> tuple[anyio.abc.SocketListener, Address]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    host, port = listener.extra(anyio.abc.SocketAttribute.local_address)[:2]
    return listener, Address(str(host), int(port))


async def start_pod(
    task_group: anyio.abc.TaskGroup,
    name: str,
    *,
    app: Callable[[Pod], Handler] | None,
    calls: Peer | None,
    identity: IdentityPlane | None,
    stop: anyio.Event,
) -> Pod:
    """One pod: its outbound proxy (when it ``calls`` someone), its application (``app(pod)``, which may use
    the outbound proxy's address) behind an inbound proxy, and its identity agent (with ``identity``)."""
    pod = Pod(name)
    if calls is not None:
        role = RoleConfig(
            f"{name}-outbound",
            "outbound",
            Address("127.0.0.1", 0),
            ProxyConfig(protocol="detect"),
            routes={calls.name: (calls.app,)},
            dial_authority=True,
            meshed={calls.name: calls.inbound_port},
            identities={calls.name: calls.identity} if calls.identity else {},
        )
        pod.outbound_address = await _serve(task_group, pod, build_role_proxy(role), role.name, stop)
    if app is not None:
        app_listener, pod.app_address = await _listen()
        task_group.start_soon(serve_http, app_listener, app(pod))
        role = RoleConfig(name, "inbound", Address("127.0.0.1", 0), ProxyConfig(protocol="detect"), (pod.app_address,))
        pod.inbound = build_role_proxy(role)
        pod.inbound_address = await _serve(task_group, pod, pod.inbound, name, stop)
    if identity is not None:
        pod.agent = _start_agent(task_group, pod, identity)
    return pod


async def _serve(task_group: anyio.abc.TaskGroup, pod: Pod, proxy: Proxy, name: str, stop: anyio.Event) -> Address:
    listener, address = await _listen()
    driver = ProxyDriver(proxy, name=name)
    pod.drivers.append(driver)
    task_group.start_soon(partial(driver.serve, listener, stop=stop))
    return address


def _start_agent(task_group: anyio.abc.TaskGroup, pod: Pod, plane: IdentityPlane) -> IdentityAgent:
    client = IdentityClientConfig(
        identity=plane.identity(pod.name), trust_anchors_pem=plane.files.trust_anchor.read_bytes()
    )
    rng = random.Random(random.SystemRandom().getrandbits(64))
    agent = IdentityAgent(IdentityAgentConfig(client=client, service_address=plane.address), rng)

    def apply(update: ControlUpdate) -> None:
        for driver in pod.drivers:
            driver.control(update)

    task_group.start_soon(IdentityAgentDriver(agent, token_file=plane.token_file(pod.name), apply=apply).run)
    return agent


async def wait_certified(pods: list[Pod]) -> str | None:
    """Wait until every pod's agent holds a certificate; None, or why not after ``CERTIFIED_WITHIN_S``."""
    agents = [pod.agent for pod in pods if pod.agent is not None]
    with anyio.move_on_after(CERTIFIED_WITHIN_S):
        while not all(agent.ready for agent in agents):
            await anyio.sleep(0.01)
        return None
    waiting = [agent for agent in agents if not agent.ready]
    return "; ".join(f"{agent.identity}: {agent.last_failure or 'no answer yet'}" for agent in waiting)
