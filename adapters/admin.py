"""The proxy's admin server (Linkerd's port 4191): metrics, readiness, liveness, log level, shutdown.

GET  /metrics           Prometheus text: Linkerd's metric names and labels (adapters/prometheus.py)
GET  /ready             200 once the proxy serves and, with an identity, holds a valid certificate;
                        503 with the reason before (no certificate yet and why, an expired one, draining)
GET  /live              200 while the process runs
GET  /proxy-log-level   the current log level
PUT  /proxy-log-level   body "debug" | "info" | "warning" | "error": set it
POST /shutdown          only with --shutdown-endpoint: drain and exit, as SIGTERM
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import h11

from tether.adapters import prometheus
from tether.core.proxy.telemetry import Telemetry

LEVELS = ("debug", "info", "warning", "error")
TEXT = "text/plain; charset=utf-8"


class AdminServer:
    def __init__(
        self,
        telemetry: Callable[[], Telemetry],
        *,
        ready: Callable[[], str | None],
        shutdown: Callable[[], None] | None = None,
        extra_metrics: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        """``ready`` returns None when ready, else why not (the 503's body); ``extra_metrics`` adds exposition
        lines (the identity metrics)."""
        self._telemetry = telemetry
        self._ready = ready
        self._shutdown = shutdown
        self._extra_metrics = extra_metrics

    async def __call__(self, request: h11.Request, body: bytes) -> tuple[int, bytes, str]:
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        if path == "/metrics" and method == "GET":
            text = prometheus.render(self._telemetry(), extra=self._extra_metrics())
            return 200, text.encode(), prometheus.CONTENT_TYPE
        if path == "/ready" and method == "GET":
            reason = self._ready()
            return (200, b"ready\n", TEXT) if reason is None else (503, f"not ready: {reason}\n".encode(), TEXT)
        if path == "/live" and method == "GET":
            return 200, b"live\n", TEXT
        if path == "/proxy-log-level":
            return self._log_level(method, body)
        if path == "/shutdown":
            return self._shutdown_request(method)
        return 404, b"not found; try /metrics, /ready, /live, /proxy-log-level or /shutdown\n", TEXT

    def _log_level(self, method: str, body: bytes) -> tuple[int, bytes, str]:
        logger = logging.getLogger("tether")
        if method == "GET":
            return 200, logging.getLevelName(logger.getEffectiveLevel()).lower().encode() + b"\n", TEXT
        if method != "PUT":
            return 405, b"use GET or PUT\n", TEXT
        wanted = body.decode("utf-8", "replace").strip().lower()
        if wanted not in LEVELS:
            return 400, f"unknown level {wanted!r}; use one of {', '.join(LEVELS)}\n".encode(), TEXT
        logger.setLevel(wanted.upper())
        return 204, b"", TEXT

    def _shutdown_request(self, method: str) -> tuple[int, bytes, str]:
        if self._shutdown is None:
            return 404, b"the shutdown endpoint is disabled; start the proxy with --shutdown-endpoint\n", TEXT
        if method != "POST":
            return 405, b"use POST\n", TEXT
        self._shutdown()
        return 202, b"shutting down\n", TEXT
