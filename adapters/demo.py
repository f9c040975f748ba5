"""``tether demo``: a tiny mesh on loopback with live golden metrics, no cluster needed.

    load generator -> [tether proxy: web] -> web API -> [tether proxy: backend] -> backend

Each service runs behind its own Tether proxy (in this process, on its own ports); the table shows what
each proxy measured, as ``linkerd viz stat`` does: success rate, requests per second and latency
percentiles over the last ``WINDOW_S`` seconds. Later issues add services, mTLS and policy here: a
service is one ``DemoService`` entry.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import anyio
import anyio.abc
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tether.adapters.demo_apps import BackendApp, WebApp
from tether.adapters.driver import ProxyDriver
from tether.adapters.http_server import Handler, serve_http
from tether.adapters.proxy_config import RoleConfig
from tether.adapters.serve import build_role_proxy
from tether.core.address import Address
from tether.core.config import ProxyConfig
from tether.core.proxy import Proxy, ServiceStats

WINDOW_S = 10
MAX_IN_FLIGHT = 64  # the load generator skips a tick rather than queue without bound


@dataclass(slots=True)
class DemoService:
    name: str
    proxy: Proxy
    proxy_address: Address
    history: deque[tuple[float, ServiceStats]] = field(default_factory=lambda: deque(maxlen=WINDOW_S + 1))

    def stats(self) -> ServiceStats:
        return self.proxy.stats.service(self.name)


@dataclass(slots=True)
class LoadCounts:
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    last_error: str = ""


async def _listen() -> tuple[anyio.abc.SocketListener, Address]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    host, port = listener.extra(anyio.abc.SocketAttribute.local_address)[:2]
    return listener, Address(str(host), int(port))


async def _start_service(
    task_group: anyio.abc.TaskGroup, name: str, handler: Handler, stop: anyio.Event
) -> DemoService:
    app_listener, app_address = await _listen()
    task_group.start_soon(serve_http, app_listener, handler)
    # In front of its service, as an inbound sidecar; the listener below picks the port.
    role = RoleConfig(name, "inbound", Address("127.0.0.1", 0), ProxyConfig(), endpoints=(app_address,))
    proxy = build_role_proxy(role)
    proxy_listener, proxy_address = await _listen()
    task_group.start_soon(lambda: ProxyDriver(proxy, name=name).serve(proxy_listener, stop=stop))
    return DemoService(name, proxy, proxy_address)


async def run_demo(duration_s: float | None, rate_per_s: float, as_json: bool, console: Console) -> int:
    rng = random.Random(random.SystemRandom().getrandbits(64))
    counts = LoadCounts()
    stop_load, stop_proxies = anyio.Event(), anyio.Event()
    started = time.monotonic()
    async with anyio.create_task_group() as task_group:
        backend = await _start_service(task_group, "backend", BackendApp(rng), stop_proxies)
        web_app = WebApp(f"http://{backend.proxy_address}")
        web = await _start_service(task_group, "web", web_app, stop_proxies)
        services = [web, backend]
        if not as_json:
            console.print(f"web API behind proxy {web.proxy_address}; backend behind proxy {backend.proxy_address}")
            console.print(f"load: {rate_per_s:g} req/s to web; Ctrl-C to stop", style="dim")
        task_group.start_soon(_stop_on_signal, stop_load)
        async with anyio.create_task_group() as load_group:
            load_group.start_soon(_generate_load, web.proxy_address, rate_per_s, counts, stop_load)
            await _show(services, counts, duration_s, as_json, console, stop_load)
            stop_load.set()  # the generator stops sending and waits for the requests in flight
        elapsed = time.monotonic() - started
        stop_proxies.set()
        await web_app.aclose()
        task_group.cancel_scope.cancel()
    return _report(services, counts, elapsed, as_json, console)


async def _stop_on_signal(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _generate_load(target: Address, rate_per_s: float, counts: LoadCounts, stop: anyio.Event) -> None:
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


def _table(services: list[DemoService], counts: LoadCounts, *, window: bool, elapsed: float = 0.0) -> Table:
    title = f"last {WINDOW_S} s" if window else f"whole run, {elapsed:.1f} s"
    table = Table(title=f"tether demo: {title}  (load sent {counts.sent}, failed {counts.failed})")
    for column in ("SERVICE", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"):
        table.add_column(column, justify="left" if column == "SERVICE" else "right")
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
        )
    return table


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"


def _report(services: list[DemoService], counts: LoadCounts, elapsed: float, as_json: bool, console: Console) -> int:
    if as_json:
        document = {
            "duration_s": round(elapsed, 3),
            "load": {
                "sent": counts.sent,
                "succeeded": counts.succeeded,
                "failed": counts.failed,
                "skipped": counts.skipped,
                "last_error": counts.last_error,
            },
            "services": {service.name: service_row(service.stats(), elapsed) for service in services},
        }
        console.print_json(json.dumps(document))
    else:
        console.print(_table(services, counts, window=False, elapsed=elapsed))
        if counts.failed:
            console.print(f"{counts.failed} requests failed; last: {counts.last_error}", style="red")
    return 1 if counts.failed else 0
