"""Traffic mirroring (Gateway API ``RequestMirror``): copies of routed requests to a shadow backend.

Theory of operation
-------------------
A rule's mirrors are drawn when its request is routed (h1traffic.py, h2traffic.py). ``_admit_mirror``, shared
by both protocols, asks the proxy's ``MirrorGate`` (faults.py: at most 100 copies in flight, bodies up to
64 KiB, 64 KiB the shadow has not taken), counts the decision on the rule, and resolves the mirror backend;
a backend with no endpoints gives its ticket back at once. An admitted copy is a request of the same kind
as its primary whose client connection does not exist (a fresh id that no connection holds): every write
towards that client is skipped, so the shadow's response vanishes, while everything else runs through the
ordinary machinery: the mirror backend's own balancer, the pools, the response timeout, the metrics (its
requests are counted under the shadow's authority).

- An HTTP/1.1 exchange's copy is an ``Exchange`` (h1traffic.py).
- A StreamExchange's copy (``StreamMirrors``) is a ``StreamExchange``, dispatched by h2upstream.py as its
  primary would be: an HTTP/2 stream to a meshed peer's inbound port (an HTTP/1.1 client's request with
  ``l5d-orig-proto``), or HTTP/2 to the endpoint; an HTTP/1.1 client's copy to a backend outside the mesh
  goes as HTTP/1.1, the protocol it arrived in.

Body bytes are copied as they arrive from the primary's client; ``_mirror_keeps`` counts each piece against
the gate, and a copy whose body or backlog (bytes queued for the shadow's window or pool, plus its
connection's unsent bytes) outgrows the gate is abandoned: reset, its ticket released as abandoned. Nothing
of a copy holds the primary back: the primary's client window reopens as the primary's own bytes leave
(h2flows.py ``_settle`` looks at the primary's sink only), so a shadow that reads nothing only loses its
copy. A copy's response bytes are acknowledged as they arrive, since no client will read them, so a
shadow's stream never holds a shared connection's window.

A stream copy's request ends when its primary's does (trailers included). A primary that ends before its
request did (its client reset the stream, or the endpoint answered early) abandons its copies whose request
had not ended, so that a shadow never takes a truncated body for a whole one. A copy's failure (a refused
connect, a reset, a timeout) ends only the copy. Whatever ends a copy releases its ticket
(``_release_mirror``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from tether.core.discovery import EndpointSet
from tether.core.proxy.routing import RouteState, Routing, backend_authority
from tether.core.proxy.streams import StreamExchange
from tether.core.traffic.faults import MirrorGate
from tether.core.traffic.routes import MirrorPolicy

if TYPE_CHECKING:
    from tether.core.proxy.connections import Upstream


@dataclass(frozen=True, slots=True)
class MirrorStart:
    """An admitted copy: its gate ticket, the mirror backend's authority and its endpoints (never empty)."""

    ticket: int
    authority: str
    endpoint_set: EndpointSet


class Mirrors(Routing):
    """Gate admission, body accounting and ticket release: what HTTP/1.1 and stream copies share."""

    _mirror_gate: MirrorGate
    _mirror_tickets: dict[int, list[int]]  # copy's request id -> [gate ticket, body bytes copied]

    def _admit_mirror(self, state: RouteState, policy: MirrorPolicy, content_length: int | None) -> MirrorStart | None:
        """Draw one of the rule's mirrors for this request (one RNG draw, always): the copy to start, or None."""
        decision = self._mirror_gate.admit(policy, self._rng, content_length=content_length)
        state.counters.record_mirror(decision)
        if decision.ticket is None or decision.backend is None:
            return None
        authority = backend_authority(decision.backend, state.labels.parent_namespace)
        endpoint_set = self.resolver.resolve(authority)
        if endpoint_set is None or not endpoint_set.endpoints:
            self._mirror_gate.release(decision.ticket, abandoned=True)
            return None
        return MirrorStart(decision.ticket, authority, endpoint_set)

    def _track_mirror(self, state: RouteState, mirror_id: int, ticket: int) -> None:
        assert mirror_id not in self._mirror_tickets, mirror_id
        self._mirror_tickets[mirror_id] = [ticket, 0]
        state.mirror_ids.append(mirror_id)

    def _mirror_keeps(self, mirror_id: int, added_bytes: int, unsent_bytes: int) -> bool:
        """``added_bytes`` more body for the copy, which would leave ``unsent_bytes`` not taken by the shadow:
        whether the gate keeps it. False: its ticket is released as abandoned; the caller resets it."""
        entry = self._mirror_tickets[mirror_id]
        entry[1] += added_bytes
        assert added_bytes >= 0 and unsent_bytes >= added_bytes, (added_bytes, unsent_bytes)
        if self._mirror_gate.keep(entry[0], body_bytes=entry[1], unsent_bytes=unsent_bytes):
            return True
        self._release_mirror(mirror_id, abandoned=True)
        return False

    def _release_mirror(self, request_id: int, *, abandoned: bool = False) -> None:
        """A request ended; if it was a copy, its gate ticket is free again (a second call is a no-op)."""
        entry = self._mirror_tickets.pop(request_id, None)
        if entry is not None:
            self._mirror_gate.release(entry[0], abandoned=abandoned)


class StreamMirrors(Mirrors):
    """Copies of StreamExchanges (HTTP/2 and gRPC clients, HTTP/1.1 clients of meshed peers)."""

    if TYPE_CHECKING:  # defined by the stream flows (h2traffic.py, h2flows.py, h2upstream.py)

        def _stream_choose(self, exchange: StreamExchange, endpoint_set: EndpointSet, *, h2c: bool) -> None: ...
        def _dispatch_stream(self, exchange: StreamExchange, endpoint_set: EndpointSet | None) -> None: ...
        def _to_sink(self, exchange: StreamExchange, data: bytes) -> None: ...
        def _source_request_ended(self, exchange: StreamExchange, now_ns: int) -> None: ...
        def _abandon_stream(self, exchange: StreamExchange, code: int) -> None: ...
        def _sink_connection(self, exchange: StreamExchange) -> Upstream | None: ...
        def _sink_queued(self, exchange: StreamExchange) -> int: ...

    def _stream_start_mirrors(self, primary: StreamExchange, state: RouteState, content_length: int | None) -> None:
        """The primary was routed (its head already rewritten): start the copies the gate admits."""
        for policy in state.matched.rule.mirrors:
            start = self._admit_mirror(state, policy, content_length)
            if start is not None:
                self._stream_start_mirror(primary, state, start)

    def _stream_start_mirror(self, primary: StreamExchange, state: RouteState, start: MirrorStart) -> None:
        endpoint_set = start.endpoint_set
        head = dataclasses.replace(primary.head, headers=list(primary.head.headers))  # its own, for a retry's sake
        labels = self.telemetry.http_labels(start.authority, "")
        # A client connection id that never exists: every write towards the copy's client is skipped. The
        # primary's stream id stays, so h2upstream.py renders the head as it does the primary's.
        mirror = StreamExchange(
            self._new_id(),
            self._new_id(),
            primary.source_stream,
            head,
            endpoint_set.name,
            self._now_ns,
            labels,
            primary.grpc,
        )
        mirror.endpoint_set = endpoint_set
        self._streams[mirror.exchange_id] = mirror
        self._track_mirror(state, mirror.exchange_id, start.ticket)
        self._stream_choose(mirror, endpoint_set, h2c=False)  # as a routed primary chooses (h2traffic.py)
        meshed = endpoint_set.meshed_inbound_port is not None
        tls = self.tls_labels(None, endpoint_set.identity if meshed else None)
        target = str(mirror.endpoint) if mirror.endpoint is not None else ""
        mirror.labels = self.telemetry.http_labels(start.authority, target, tls)
        self.telemetry.request_started(mirror.service, mirror.labels)
        self._dispatch_stream(mirror, endpoint_set)

    def _stream_mirror_body(self, state: RouteState, data: bytes) -> None:
        """Body bytes of the primary: copied to each live copy the gate keeps, never waiting for one."""
        for mirror_id in state.mirror_ids:
            mirror = self._streams.get(mirror_id)
            if mirror is None or mirror.done:
                continue
            sink = self._sink_connection(mirror)
            unsent = self._sink_queued(mirror) + (sink.unsent_bytes if sink is not None else 0)
            if self._mirror_keeps(mirror_id, len(data), unsent + len(data)):
                self._to_sink(mirror, data)
            else:
                self._abandon_stream(mirror, ErrorCodes.CANCEL)

    def _stream_mirrors_ended(self, primary: StreamExchange) -> None:
        """The primary's request ended (its trailers, if any, are in): so do its copies' requests."""
        state = primary.route
        assert state is not None and primary.request_ended
        for mirror_id in state.mirror_ids:
            mirror = self._streams.get(mirror_id)
            if mirror is not None and not mirror.done and not mirror.request_ended:
                mirror.request_trailers = list(primary.request_trailers) if primary.request_trailers else None
                self._source_request_ended(mirror, self._now_ns)

    def _stream_mirrors_orphaned(self, state: RouteState) -> None:
        """The primary is over: a copy whose request had not ended is cut, never left to look complete."""
        for mirror_id in state.mirror_ids:
            mirror = self._streams.get(mirror_id)
            if mirror is not None and not mirror.done and not mirror.request_ended:
                self._release_mirror(mirror_id, abandoned=True)
                self._abandon_stream(mirror, ErrorCodes.CANCEL)
        state.mirror_ids.clear()
