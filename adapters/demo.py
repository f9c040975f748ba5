"""``tether demo``: a tiny mesh on loopback with live golden metrics and mTLS, no cluster needed.

    load generator -> [outbound] =mTLS=> [inbound: web] -> web API -> [outbound] =mTLS=> [inbound: backend] -> backend

Each pod runs its own Tether proxies (in this process, on their own ports; demo_mesh.py builds them); the
table shows what each service's inbound proxy measured, as ``linkerd viz stat`` does: success rate, requests
per second and latency percentiles over the last ``WINDOW_S`` seconds, and which share of its requests came
over mTLS, from which identities. Every pod gets its certificate from a real identity service started for
the run (``--no-mtls``: none, and the meshed hops are plaintext). A service is one ``DemoService`` entry.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.abc
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tether.adapters.demo_apps import BackendApp, WebApp
from tether.adapters.demo_mesh import MESH, IdentityPlane, Pod, identity_plane, start_pod, wait_certified
from tether.core.address import Address
from tether.core.proxy import ServiceStats

WINDOW_S = 10
MAX_IN_FLIGHT = 64  # the load generator skips a tick rather than queue without bound


@dataclass(slots=True)
class DemoService:
    name: str
    pod: Pod
    history: deque[tuple[float, ServiceStats]] = field(default_factory=lambda: deque(maxlen=WINDOW_S + 1))

    def stats(self) -> ServiceStats:
        """What the inbound proxy counted for its workload: meshed requests name the endpoint their transport
        header named, the application's own address."""
        assert self.pod.inbound is not None
        return self.pod.inbound.stats.service(str(self.pod.app_address))

    def tls(self) -> tuple[float | None, list[str]]:
        """The share of requests its inbound proxy took over mTLS, and the client identities it saw."""
        assert self.pod.inbound is not None
        total = over_mtls = 0
        clients: set[str] = set()
        for labels, count in self.pod.inbound.telemetry.request_total.items():
            total += count
            if labels.tls == "true":
                over_mtls += count
                clients.add(labels.peer_id)
        return (over_mtls / total if total else None), sorted(clients)


@dataclass(slots=True)
class LoadCounts:
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    last_error: str = ""


async def run_demo(
    duration_s: float | None, rate_per_s: float, as_json: bool, console: Console, *, mtls: bool = True
) -> int:
    """Run the demo mesh (with its identity service unless ``mtls`` is False); the exit code."""
    with identity_plane() if mtls else contextlib.nullcontext() as plane:
        return await _run_mesh(plane, duration_s, rate_per_s, as_json, console)


async def _run_mesh(
    plane: IdentityPlane | None, duration_s: float | None, rate_per_s: float, as_json: bool, console: Console
) -> int:
    rng = random.Random(random.SystemRandom().getrandbits(64))
    counts = LoadCounts()
    stop_load, stop_proxies = anyio.Event(), anyio.Event()
    started = time.monotonic()
    web_apps: list[WebApp] = []

    def web_app(pod: Pod) -> WebApp:
        web_apps.append(WebApp(f"http://{pod.outbound_address}"))
        return web_apps[-1]

    async with anyio.create_task_group() as task_group:
        pod = partial(start_pod, task_group, identity=plane, stop=stop_proxies)
        backend = await pod("backend", app=lambda _pod: BackendApp(rng), calls=None)
        web = await pod("web", app=web_app, calls=backend.as_peer())
        loadgen = await pod("loadgen", app=None, calls=web.as_peer())
        services = [DemoService("web", web), DemoService("backend", backend)]
        problem = await wait_certified([loadgen, web, backend]) if plane is not None else None
        if problem is not None:
            console.print(f"tether demo: the pods got no certificate: {problem}", style="red")
            task_group.cancel_scope.cancel()
            return 1
        if not as_json:
            _describe(console, services, loadgen, plane, rate_per_s)
        task_group.start_soon(_stop_on_signal, stop_load)
        async with anyio.create_task_group() as load_group:
            assert loadgen.outbound_address is not None
            load_group.start_soon(_generate_load, loadgen.outbound_address, rate_per_s, counts, stop_load)
            await _show(services, counts, duration_s, as_json, console, stop_load)
            stop_load.set()  # the generator stops sending and waits for the requests in flight
        elapsed = time.monotonic() - started
        stop_proxies.set()
        for app in web_apps:
            await app.aclose()
        task_group.cancel_scope.cancel()
    return _report(services, counts, elapsed, as_json, console, plane)


def _describe(
    console: Console, services: list[DemoService], loadgen: Pod, plane: IdentityPlane | None, rate_per_s: float
) -> None:
    for service in services:
        console.print(f"{service.name}: inbound proxy {service.pod.inbound_address}, identity {service.pod.identity}")
    if plane is not None:
        console.print(f"mTLS on: certificates from the identity service at {plane.address} (--no-mtls: off)")
        console.print(f"identities: <serviceaccount>.<namespace>{MESH.identity_suffix}", style="dim")
    console.print(f"load: {rate_per_s:g} req/s to web via {loadgen.outbound_address}; Ctrl-C to stop", style="dim")


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _generate_load(target: Address, rate_per_s: float, counts: LoadCounts, stop: anyio.Event) -> None:
    """Requests for web at ``rate_per_s``, through the load generator's outbound proxy (``target``)."""
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with (
        httpx.AsyncClient(base_url=f"http://{target}", timeout=10.0, limits=limits) as client,
        anyio.create_task_group() as task_group,
    ):
        in_flight = 0

        async def one(book: int) -> None:
            nonlocal in_flight
            try:
                response = await client.get(f"/api/books/{book}", headers={"host": "web"})
                if response.status_code < 500:
                    counts.succeeded += 1
                else:
                    counts.failed += 1
                    counts.last_error = f"HTTP {response.status_code}: {response.text[:120]}"
            except httpx.HTTPError as error:
                counts.failed += 1
                counts.last_error = f"{type(error).__name__}: {error}"
            finally:
                in_flight -= 1

        interval = 1.0 / rate_per_s
        next_at = time.monotonic()
        while not stop.is_set():
            if in_flight < MAX_IN_FLIGHT:
                in_flight += 1
                counts.sent += 1
                task_group.start_soon(one, counts.sent % 1000)
            else:
                counts.skipped += 1
            next_at += interval
            with anyio.move_on_after(max(0.0, next_at - time.monotonic())):
                await stop.wait()


async def _show(
    services: list[DemoService],
    counts: LoadCounts,
    duration_s: float | None,
    as_json: bool,
    console: Console,
    stop: anyio.Event,
) -> None:
    deadline = None if duration_s is None else time.monotonic() + duration_s
    for service in services:
        service.history.append((time.monotonic(), service.stats().copy()))
    live_display = Live(console=console, auto_refresh=False) if console.is_terminal and not as_json else None
    with live_display if live_display is not None else contextlib.nullcontext():
        while (deadline is None or time.monotonic() < deadline) and not stop.is_set():
            with anyio.move_on_after(1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))):
                await stop.wait()
            now = time.monotonic()
            for service in services:
                service.history.append((now, service.stats().copy()))
            if as_json:
                continue
            table = _table(services, counts, window=True)
            if live_display is not None:
                live_display.update(table, refresh=True)
            else:
                console.print(table)


def _window(service: DemoService) -> tuple[ServiceStats, float]:
    (first_at, first), (last_at, last) = service.history[0], service.history[-1]
    delta = ServiceStats(
        requests=last.requests - first.requests,
        responses_by_status={
            status: count - first.responses_by_status.get(status, 0)
            for status, count in last.responses_by_status.items()
        },
        aborted=last.aborted - first.aborted,
        latency=last.latency.minus(first.latency),
    )
    return delta, max(1e-9, last_at - first_at)


def service_row(stats: ServiceStats, seconds: float) -> dict[str, float | int | None]:
    answered = stats.responses + stats.aborted
    return {
        "requests": stats.requests,
        "rps": round(stats.responses / seconds, 2),
        "success_rate": round(stats.successes / answered, 4) if answered else None,
        "p50_ms": _round(stats.latency.quantile_ms(0.50)),
        "p95_ms": _round(stats.latency.quantile_ms(0.95)),
        "p99_ms": _round(stats.latency.quantile_ms(0.99)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def tls_column(service: DemoService) -> str:
    """The share of requests over mTLS and the client identities, short: "100% loadgen.demo"."""
    share, clients = service.tls()
    if share is None:
        return "-"
    if not clients:
        return "off"
    names = ", ".join(client.removesuffix(MESH.identity_suffix) for client in clients)
    return f"{100 * share:.0f}% {names}"


def _table(services: list[DemoService], counts: LoadCounts, *, window: bool, elapsed: float = 0.0) -> Table:
    title = f"last {WINDOW_S} s" if window else f"whole run, {elapsed:.1f} s"
    table = Table(
        title=f"tether demo: {title}  (load sent {counts.sent}, failed {counts.failed})",
        caption="P50-P99: latency percentiles; MTLS: the share of requests over mTLS, and from which identities",
    )
    for column in ("SERVICE", "MESHED", "SUCCESS", "RPS", "P50", "P95", "P99", "MTLS"):
        table.add_column(column, justify="left" if column in ("SERVICE", "MTLS") else "right", no_wrap=True)
    for service in services:
        stats, seconds = _window(service) if window else (service.stats(), max(elapsed, 1e-9))
        row = service_row(stats, seconds)
        success = "-" if row["success_rate"] is None else f"{100 * float(row['success_rate']):.2f}%"
        table.add_row(
            service.name,
            "1/1",
            success,
            f"{row['rps']:.1f}",
            *(_ms(row[key]) for key in ("p50_ms", "p95_ms", "p99_ms")),
            tls_column(service),
        )
    return table


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"


def _service_document(service: DemoService, elapsed: float) -> dict[str, Any]:
    share, clients = service.tls()
    return {
        **service_row(service.stats(), elapsed),
        "identity": service.pod.identity,
        "mtls_share": None if share is None else round(share, 4),
        "client_ids": clients,
    }


def _report(
    services: list[DemoService],
    counts: LoadCounts,
    elapsed: float,
    as_json: bool,
    console: Console,
    plane: IdentityPlane | None,
) -> int:
    if as_json:
        document = {
            "duration_s": round(elapsed, 3),
            "mtls": plane is not None,
            "load": {
                "sent": counts.sent,
                "succeeded": counts.succeeded,
                "failed": counts.failed,
                "skipped": counts.skipped,
                "last_error": counts.last_error,
            },
            "services": {service.name: _service_document(service, elapsed) for service in services},
        }
        console.print_json(json.dumps(document))
    else:
        console.print(_table(services, counts, window=False, elapsed=elapsed))
        if counts.failed:
            console.print(f"{counts.failed} requests failed; last: {counts.last_error}", style="red")
    return 1 if counts.failed else 0
