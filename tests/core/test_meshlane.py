"""The meshed lane (meshlane.py) against the event path it stands for, on both proxies of the meshed hop.

Two pairs of proxies (client -> outbound =HTTP/2=> inbound -> workload) get the same inputs: one pair as
shipped, one with the meshed lane closed (h11 events on both sides, h2flows.py and h2h1sink.py). The
traffic mixes the common case the lane takes (whole keep-alive requests and Content-Length responses in
one read) with what it must decline (split reads, chunked and 1xx and 204 answers, HEAD, pipelining,
hostile bytes, oversized heads), with workload connects that fail, timeouts that fire and client writes
acknowledged late. After every input the effects of both proxies (with their bytes) and their next
deadlines must be equal; at the end, the metrics and the balancers' view of every endpoint.

TETHER_MESHLANE_EXAMPLES raises the example count for a longer local run.
"""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_h1lane import COMMON_REQUESTS, COMMON_RESPONSES, proxy_outcome, round_of_traffic

from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.discovery import StaticResolver
from tether.core.effects import Close, Connect, Effect, Send
from tether.core.proxy import Proxy
from tether.core.proxy.connections import Upstream
from tether.core.proxy.event_path import EventPathProxy
from tether.core.proxy.streams import StreamExchange
from tether.core.traffic.route_config import RouteConfig, load_route_yaml

WORKLOAD = Address("127.0.0.1", 8080)
HOSTS = ["bench", "a", "b", "example.com"]  # the hosts of COMMON_REQUESTS and test_h1fast's messages
OUTBOUND_RESOLVER = StaticResolver(
    by_host={host: [Address("10.0.0.9", 8080)] for host in HOSTS}, meshed_hosts={host: 4143 for host in HOSTS}
)
MS = 1_000_000
# A route on the outbound proxy (retries with replay, a timeout): the lane's requests take the route hooks.
RETRYING_ROUTE = load_route_yaml(
    """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bench
  annotations:
    retry.linkerd.io/http: 5xx
    retry.linkerd.io/limit: "2"
    timeout.linkerd.io/request: 30s
spec:
  parentRefs: [{name: bench}]
  rules: [{name: all}]
""",
    "route.yaml",
)
EXAMPLES = int(os.environ.get("TETHER_MESHLANE_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class LaneProxy(Proxy):
    """The proxy as shipped, counting what the meshed lane took whole."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.whole_requests = self.whole_responses = self.written_heads = 0

    def _mesh_lane_request(self, *args: Any) -> bool:
        taken = super()._mesh_lane_request(*args)
        self.whole_requests += taken
        return taken

    def _sink_lane_whole(self, *args: Any) -> None:
        self.whole_responses += 1
        super()._sink_lane_whole(*args)

    def _sink_request_head_bytes(self, exchange: StreamExchange, upstream: Upstream, *, has_body: bool) -> bytes:
        self.written_heads += 1
        return super()._sink_request_head_bytes(exchange, upstream, has_body=has_body)


def _described(effect: Effect) -> Any:
    return ("Send", effect.conn_id, effect.data) if type(effect) is Send else effect


class MeshRun:
    """Client -> outbound -> inbound -> workload, driven by a script of actions; ``log`` is everything both
    proxies did, in order. Bytes between the proxies move (and are acknowledged) at once."""

    def __init__(self, kind: type[Proxy], config: ProxyConfig, seed: int, routes: RouteConfig | None = None) -> None:
        self.proxies = {
            "out": kind(config, OUTBOUND_RESOLVER, random.Random(seed), routes=routes),
            "in": kind(config, StaticResolver(default=[WORKLOAD]), random.Random(seed + 1), direction="inbound"),
        }
        self.now_ns = 1
        self.log: list[Any] = []
        self.links: dict[tuple[str, int], tuple[str, int]] = {}
        self.unacked: dict[tuple[str, int], int] = {}
        self.connecting: list[int] = []  # the inbound proxy's connects to the workload, not yet answered
        self.workload: list[int] = []  # its workload connections, the one written to last at the end
        self.closed: set[tuple[str, int]] = set()
        self.client = self.proxies["out"].accepted(self.now_ns)
        self.client_eof = False
        self._settle()

    def _settle(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, proxy in self.proxies.items():
                for effect in proxy.effects():
                    moved = True
                    self.log.append((name, _described(effect)))
                    self._apply(name, effect)
        self.log.append(("deadlines", [proxy.next_deadline_ns() for proxy in self.proxies.values()]))

    def _apply(self, name: str, effect: Effect) -> None:
        proxy, now = self.proxies[name], self.now_ns
        if type(effect) is Connect and name == "out":
            peer = self.proxies["in"].accepted(now)
            self.links[("out", effect.conn_id)], self.links[("in", peer)] = ("in", peer), ("out", effect.conn_id)
            proxy.connected(effect.conn_id, now)
        elif type(effect) is Connect:
            self.connecting.append(effect.conn_id)
        elif type(effect) is Send and (name, effect.conn_id) in self.links:
            proxy.sent(effect.conn_id, len(effect.data), now)
            other, conn_id = self.links[(name, effect.conn_id)]
            if (other, conn_id) not in self.closed:
                self.proxies[other].received(conn_id, effect.data, now)
        elif type(effect) is Send:
            key = (name, effect.conn_id)
            self.unacked[key] = self.unacked.get(key, 0) + len(effect.data)
            if effect.conn_id in self.workload:  # the one written to last is the one that answers
                self.workload.remove(effect.conn_id)
                self.workload.append(effect.conn_id)
        elif type(effect) is Close:
            self.closed.add((name, effect.conn_id))
            link = self.links.get((name, effect.conn_id))
            if link is not None and link not in self.closed:
                self.proxies[link[0]].received(link[1], b"", now)

    def act(self, action: tuple[Any, ...]) -> None:
        kind, outbound, inbound = action[0], self.proxies["out"], self.proxies["in"]
        if kind == "client" and ("out", self.client) not in self.closed and not self.client_eof:
            self.client_eof = not action[1]  # a half-closed client sends nothing more
            outbound.received(self.client, action[1], self.now_ns)
        elif kind == "connect" and self.connecting:
            conn_id = self.connecting.pop(0)
            if action[1]:
                inbound.connected(conn_id, self.now_ns)
                self.workload.append(conn_id)
            else:
                inbound.connect_failed(conn_id, "refused", self.now_ns)
        elif kind == "workload":
            live = [conn_id for conn_id in self.workload if ("in", conn_id) not in self.closed]
            if live:
                inbound.received(live[-1], action[1], self.now_ns)
        elif kind == "ack":
            for (name, conn_id), count in sorted(self.unacked.items()):
                if (name, conn_id) not in self.closed:
                    self.proxies[name].sent(conn_id, count, self.now_ns)
            self.unacked.clear()
        elif kind == "advance":
            self.now_ns += action[1] * MS
            for proxy in self.proxies.values():
                deadline = proxy.next_deadline_ns()
                if deadline is not None and deadline <= self.now_ns:
                    proxy.on_timer(self.now_ns)
        self._settle()

    def outcome(self) -> Any:
        return self.log, [proxy_outcome(proxy, self.now_ns) for proxy in self.proxies.values()]


# One request's worth of actions, as test_h1lane.py draws them, answered by the workload; one round in ten
# half-closes the client before the answer (it then goes with Connection: close).
ROUND_OF_TRAFFIC = round_of_traffic(answerer="workload", before_answer=("client", b""), before_answer_odds=10)


@SETTINGS
@given(
    rounds=st.lists(ROUND_OF_TRAFFIC, min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    limits=st.sampled_from([(16 * 1024, 64 * 1024), (1024, 64 * 1024), (16 * 1024, 1024)]),
    ending=st.sampled_from([[], [("client", b"")], [("workload", b"")]]),
    routes=st.sampled_from([None, RETRYING_ROUTE]),
)
def test_meshlane_matches_the_event_path(
    rounds: list[list[tuple[Any, ...]]],
    seed: int,
    limits: tuple[int, int],
    ending: list[tuple[Any, ...]],
    routes: RouteConfig | None,
) -> None:
    max_header_bytes, max_buffered_bytes = limits
    config = ProxyConfig(protocol="detect", max_header_bytes=max_header_bytes, max_buffered_bytes=max_buffered_bytes)
    runs = [MeshRun(kind, config, seed, routes) for kind in (LaneProxy, EventPathProxy)]
    for action in [action for actions in rounds for action in actions] + ending + [("ack",)]:
        for run in runs:
            run.act(action)
        assert runs[0].log == runs[1].log, action
    assert runs[0].outcome() == runs[1].outcome()


def test_meshlane_takes_the_common_exchange_whole() -> None:
    """The point of the lane: a plain keep-alive exchange crosses both proxies without h11 events, with
    the same bytes out (the workload sees the request as the client wrote it, less hop-by-hop headers)."""
    config = ProxyConfig(protocol="detect")
    runs = [MeshRun(kind, config, 1) for kind in (LaneProxy, EventPathProxy)]
    script = [("client", COMMON_REQUESTS[0]), ("connect", True), ("workload", COMMON_RESPONSES[0]), ("ack",)]
    for _ in range(3):
        for action in script:
            for run in runs:
                run.act(action)
    outbound, inbound = runs[0].proxies["out"], runs[0].proxies["in"]
    assert isinstance(outbound, LaneProxy) and isinstance(inbound, LaneProxy)
    # The first request too: protocol detection (tunnel.py) hands a whole HTTP/1.1 request to the lane.
    assert outbound.whole_requests == 3
    assert (inbound.written_heads, inbound.whole_responses) == (3, 3)
    assert runs[0].outcome() == runs[1].outcome()
    restored = b"GET /index.html HTTP/1.1\r\nhost: bench\r\nuser-agent: wrk\r\naccept: */*\r\n\r\n"
    sent = [(entry[0], *entry[1][1:]) for entry in runs[0].log if isinstance(entry[1], tuple) and entry[1][0] == "Send"]
    assert sum(data == restored for name, _, data in sent if name == "in") == 3
    client = runs[0].client
    answered = b"".join(data for name, conn_id, data in sent if (name, conn_id) == ("out", client))
    assert answered.count(b"HTTP/1.1 200 OK\r\n") == 3 and answered.endswith(b"\r\n\r\nhello world\n")
