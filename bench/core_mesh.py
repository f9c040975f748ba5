"""Core cost of one request on the meshed path, with no sockets: an outbound and an inbound proxy machine.

    python bench/core_mesh.py [--requests N] [--plaintext] [--profile] [--no-lane]

    client -> outbound Proxy =(mTLS, HTTP/2)=> inbound Proxy -> workload

Both machines run in this process and bytes move between them in memory, so the figure is the CPU the two
machines spend per request (keep-alive client, one pooled HTTP/2 connection between the proxies, a keep-alive
workload answering a small response), without drivers or the kernel. ``--plaintext`` drops mTLS (the meshed
hop still rides HTTP/2); ``--profile`` prints where the time goes, grouped by library, then the top
functions. ``--no-lane`` closes the meshed lane (core/proxy/meshlane.py): the event path on both proxies.
Certificates come from the project's own CA (core/identity/ca.py), made at startup.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import defaultdict

from cryptography.hazmat.primitives.asymmetric import ec

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, Send
from tether.core.identity.ca import build_issuer, build_trust_anchor, certify, check_request
from tether.core.identity.client import build_csr
from tether.core.identity.names import Mesh, WorkloadIdentity
from tether.core.identity.tls import TlsContexts
from tether.core.identity.tokens import TokenAccepted
from tether.core.proxy import Proxy
from tether.core.proxy.event_path import EventPathProxy
from tether.core.proxy.mtls import CertificateUpdate

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: web\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 27 Nov 2026 18:00:00 GMT\r\nContent-Type: text/html\r\n"
    b"Content-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)
MESH = Mesh(control_plane_namespace="linkerd", trust_domain="cluster.local")
WORKLOAD = Address("127.0.0.1", 8080)
INBOUND_PORT = 4143
WALL_S = time.time()


def contexts_for(serviceaccount: str, anchor_and_issuer: tuple) -> TlsContexts:
    """A certificate for ``serviceaccount`` from a throwaway CA, as TLS contexts."""
    anchor, issuer = anchor_and_issuer
    key = ec.generate_private_key(ec.SECP256R1())
    name = WorkloadIdentity(namespace="bench", serviceaccount=serviceaccount, mesh=MESH).name
    request = check_request(identity=name, csr=build_csr(key, name), mesh=MESH)
    verdict = TokenAccepted(namespace="bench", serviceaccount=serviceaccount)
    issued = certify(request, verdict, issuer, wall_time_s=WALL_S, serial=random.randrange(1, 2**64))
    return TlsContexts.build(
        identity=name, leaf_der=issued.leaf_der, intermediates_der=issued.intermediates_der, key=key,
        trust_anchors_pem=anchor,
    )  # fmt: skip


def make_ca() -> tuple:
    from cryptography.hazmat.primitives import serialization

    from tether.core.identity.issuer_config import load_ca

    anchor_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    anchor = build_trust_anchor(anchor_key, MESH, wall_time_s=WALL_S, serial=1)
    issuer = build_issuer(issuer_key, MESH, anchor=anchor, anchor_key=anchor_key, wall_time_s=WALL_S, serial=2)
    pem = serialization.Encoding.PEM
    key_pem = issuer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    loaded = load_ca(
        trust_anchor_pem=anchor.public_bytes(pem),
        issuer_certificate_pem=issuer.public_bytes(pem),
        issuer_key_pem=key_pem,
        wall_time_s=WALL_S,
    )
    return anchor.public_bytes(pem), loaded.issuer


class Pair:
    """Client -> outbound -> inbound -> workload, moving bytes in memory."""

    def __init__(self, *, mtls: bool, lane: bool = True) -> None:
        ca = make_ca() if mtls else None
        server = contexts_for("server", ca) if ca else None
        resolver = StaticResolver(
            by_host={"web": [WORKLOAD]},
            meshed_hosts={"web": INBOUND_PORT},
            identities={"web": server.identity} if server else None,
        )
        kind = Proxy if lane else EventPathProxy
        self.outbound = kind(ProxyConfig(protocol="detect"), resolver, random.Random(1))
        self.inbound = kind(
            ProxyConfig(protocol="detect"), StaticResolver(default=[WORKLOAD]), random.Random(2), direction="inbound"
        )
        if ca is not None and server is not None:
            self.outbound.control(CertificateUpdate(contexts=contexts_for("client", ca), wall_time_s=WALL_S), 0)
            self.inbound.control(CertificateUpdate(contexts=server, wall_time_s=WALL_S), 0)
        self.links: dict[tuple[str, int], tuple[str, int]] = {}
        self.workload: set[int] = set()
        self.now_ns = 1
        self.client = self.outbound.accepted(self.now_ns)
        self.answer = bytearray()  # what the client received for the current request

    def proxy(self, name: str) -> Proxy:
        return self.outbound if name == "out" else self.inbound

    def request(self) -> None:
        self.now_ns += 1000
        self.answer.clear()
        self.outbound.received(self.client, REQUEST, self.now_ns)
        self.run()
        assert self.answer.startswith(b"HTTP/1.1 200 ") and self.answer.endswith(b"hello world\n"), self.answer

    def run(self) -> None:
        moved = True
        while moved:
            moved = False
            for name in ("out", "in"):
                for effect in self.proxy(name).effects():
                    moved = True
                    self.apply(name, effect)

    def apply(self, name: str, effect: object) -> None:
        proxy, now = self.proxy(name), self.now_ns
        if isinstance(effect, Connect):
            if name == "out":
                peer = self.inbound.accepted(now)
                self.links[("out", effect.conn_id)] = ("in", peer)
                self.links[("in", peer)] = ("out", effect.conn_id)
            else:
                self.workload.add(effect.conn_id)
            proxy.connected(effect.conn_id, now)
        elif isinstance(effect, Send):
            proxy.sent(effect.conn_id, len(effect.data), now)
            if name == "out" and effect.conn_id == self.client:
                self.answer += effect.data
            elif (name, effect.conn_id) in self.links:
                other, conn = self.links[(name, effect.conn_id)]
                self.proxy(other).received(conn, effect.data, now)
            elif name == "in" and effect.conn_id in self.workload and effect.data.startswith(b"GET "):
                proxy.received(effect.conn_id, RESPONSE, now)  # once per request head (a body may follow)
        elif isinstance(effect, Close):
            raise AssertionError(f"{name} closed connection {effect.conn_id}")


def run(requests: int, *, mtls: bool, lane: bool = True) -> float:
    pair = Pair(mtls=mtls, lane=lane)
    for _ in range(200):  # the handshake and the HTTP/2 connection are set up here, not measured
        pair.request()
    started = time.process_time()
    for _ in range(requests):
        pair.request()
    return (time.process_time() - started) / requests * 1e6


GROUPS = (
    ("/h2/", "h2 (HTTP/2 library)"),
    ("/hyperframe/", "hyperframe (h2 frames)"),
    ("/hpack/", "hpack"),
    ("/h11/", "h11"),
    ("ssl", "ssl (TLS records)"),
    ("/bench/", "this benchmark's driver"),
)


def profile(requests: int, *, mtls: bool, lane: bool = True) -> None:
    pair = Pair(mtls=mtls, lane=lane)
    for _ in range(200):
        pair.request()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(requests):
        pair.request()
    profiler.disable()
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = defaultdict(float)
    for (filename, _line, function), (_cc, _nc, own_s, _cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        group = next((label for key, label in GROUPS if key in filename or key in function), None)
        if group is None:
            group = "tether core" if "/tether/" in filename or "/core/" in filename else "other (builtins, stdlib)"
        totals[group] += own_s
    whole = sum(totals.values())
    print(f"own time by group over {requests} requests (profiled, so slower than unprofiled):")
    for group, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {group:28} {seconds / requests * 1e6:8.1f} µs/request  {100 * seconds / whole:5.1f} %")
    stats.sort_stats("tottime").print_stats(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--plaintext", action="store_true", help="no mTLS between the proxies")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-lane", action="store_true", help="the event path on both proxies")
    args = parser.parse_args()
    lane = not args.no_lane
    if args.profile:
        profile(args.requests, mtls=not args.plaintext, lane=lane)
        return
    what = ("plaintext HTTP/2" if args.plaintext else "mTLS") + ("" if lane else ", no lane")
    cost = run(args.requests, mtls=not args.plaintext, lane=lane)
    print(f"{cost:.1f} µs of CPU per request in the two proxy machines (meshed hop: {what})")


if __name__ == "__main__":
    main()
