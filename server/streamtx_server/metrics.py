"""Health and Prometheus metrics of a running daemon over HTTP (``streamtx serve --metrics-port N``).

``GET /healthz`` answers 200 and ``{"status": "ok", "sessions", "waiting_opens", "uptime_s", "version",
"protocol", "heartbeat_age_s"}`` while the serve loop runs, and 503 with the same body and the status that says why
otherwise: ``starting`` (not listening yet), ``draining`` / ``stopped`` (a stop was asked), ``stalled`` (the loop has
not woken for ``stall_after`` seconds: it wakes at least once a second when idle, so only a model call or a request
that hangs, or a dead loop thread, makes its heartbeat that old). ``GET /metrics`` is the Prometheus text format.

Every series is read from :class:`~streamtx_server.stats.ServerStats` when scraped, so the serve loop does no work
for the metrics; labels are bounded by the protocol (stages, request kinds, error codes, refusal reasons): no
per-session label. ``prometheus_client`` is optional (``pip install 'streamtx[metrics]'``); the daemon runs without
it, and only asking for the endpoint without it is an error.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from streamtx_client.errors import ErrorCode
from streamtx_client.protocol import KINDS, PROTOCOL_VERSION

from .daemon import Server
from .jsonlog import log_event
from .stats import STAGES, SlidingWindow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["MetricsServer", "health", "require_prometheus", "STALL_AFTER_S", "VERSION"]

STALL_AFTER_S = 10.0
"""A heartbeat older than this makes /healthz answer 503 ``stalled``: ten times the idle loop's wake-up period, above
any model call of a healthy daemon (a CPU batch takes milliseconds to a few hundred)."""


def _version() -> str:
    try:  # streamtx_server ships in the streamtx distribution
        return importlib.metadata.version("streamtx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


def health(server: Server, stall_after: float = STALL_AFTER_S) -> tuple[bool, dict[str, Any]]:
    """Whether ``server``'s loop serves, and the /healthz body (read from another thread: a snapshot)."""
    age = time.monotonic() - server.heartbeat
    status = server.phase if server.phase != "serving" else "stalled" if age > stall_after else "ok"
    body = {
        "status": status,
        "sessions": len(server.sessions),
        "waiting_opens": server.waiting_opens,
        "uptime_s": round(time.monotonic() - server.stats.started, 3),
        "version": VERSION,
        "protocol": PROTOCOL_VERSION,
        "heartbeat_age_s": round(age, 3),
    }
    return status == "ok", body


def require_prometheus() -> Any:
    """The ``prometheus_client`` module, or a RuntimeError that says how to install it."""
    try:  # optional dependency: imported only when the endpoint is asked for
        import prometheus_client
    except ImportError:
        raise RuntimeError(
            "--metrics-port needs the prometheus_client package: pip install 'streamtx[metrics]' "
            "(or prometheus_client), or leave --metrics-port out"
        ) from None
    return prometheus_client


class _Collector:
    """The daemon's series as Prometheus metric families, built at each scrape from its statistics."""

    def __init__(self, server: Server, families: Any) -> None:
        self.server = server
        self.families = families  # prometheus_client.metrics_core: the *MetricFamily classes

    def collect(self) -> Iterator[Metric]:
        f, server, stats = self.families, self.server, self.server.stats
        latency = f.HistogramMetricFamily(
            "streamtx_stage_latency_seconds",
            "Per-request latency of each serving stage (decode, queue, model: per batch, encode, total)",
            labels=["stage"],
        )
        for stage in STAGES:
            buckets, total = _histogram(stats.latency[stage])
            latency.add_metric([stage], buckets, total)
        yield latency
        batch = f.HistogramMetricFamily("streamtx_batch_size", "Session steps per batched policy call")
        buckets, steps = _histogram(stats.batch_sizes)
        batch.add_metric([], buckets, steps)
        yield batch
        yield f.CounterMetricFamily("streamtx_steps", "Session steps run by the policy", value=steps)

        requests = dict(stats.requests)  # one step under the GIL: the daemon's thread may add a key meanwhile
        family = f.CounterMetricFamily("streamtx_requests", "Requests received, by kind", labels=["kind"])
        for kind in KINDS:
            family.add_metric([kind], requests.get(kind, 0))
        yield family
        errors = dict(stats.errors)
        family = f.CounterMetricFamily("streamtx_errors", "Error replies, by code", labels=["code"])
        for code in ErrorCode:
            family.add_metric([code.value], errors.get(code.value, 0))
        yield family
        family = f.CounterMetricFamily(
            "streamtx_refusals",
            "Refusals: full (no session slot), busy (a session's queue full), auth (a CURVE handshake refused)",
            labels=["reason"],
        )
        family.add_metric(["full"], errors.get(ErrorCode.FULL.value, 0))
        family.add_metric(["busy"], errors.get(ErrorCode.BUSY.value, 0))
        family.add_metric(["auth"], stats.auth_refused)
        yield family
        for name, doc, value in (
            ("superseded", "Steps that only observed: a newer acting step of the session was queued", stats.superseded),
            ("expired_sessions", "Sessions closed after their idle timeout", stats.expired),
            ("repeated", "Retries answered from a session's last reply (never applied twice)", stats.repeated),
            ("admitted_from_wait", "Opens admitted from the wait queue when a slot freed", stats.admitted),
        ):
            yield f.CounterMetricFamily(f"streamtx_{name}", doc, value=value)

        sessions = list(server.sessions)  # copied in one step under the GIL
        for name, doc, gauge in (
            ("sessions", "Open sessions", len(sessions)),
            ("session_slots", "Session slots (--max-sessions)", server.config.max_sessions),
            ("waiting_opens", "Opens waiting for a free session slot", server.waiting_opens),
            ("queued_steps", "Steps queued for a batch, all sessions", sum(len(s.queue) for s in sessions)),
            ("uptime_seconds", "Seconds since the daemon started", time.monotonic() - stats.started),
            (
                "loop_heartbeat_age_seconds",
                "Seconds since the serve loop last woke",
                time.monotonic() - server.heartbeat,
            ),
        ):
            yield f.GaugeMetricFamily(f"streamtx_{name}", doc, value=gauge)
        info = f.GaugeMetricFamily("streamtx_build_info", "Version and protocol", labels=["version", "protocol"])
        info.add_metric([VERSION, str(PROTOCOL_VERSION)], 1)
        yield info


def _histogram(window: SlidingWindow) -> tuple[list[tuple[str, int]], float]:
    """Cumulative ``(le, count)`` buckets, ``+Inf`` last, and the sum of one series."""
    counts, total = window.histogram()  # both of one instant
    buckets, running = [], 0
    for bound, count in zip([*window.buckets, float("inf")], counts):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
    return buckets, total


class MetricsServer:
    """``/healthz`` and ``/metrics`` of ``server`` on ``http://host:port`` (port 0: any free one; :attr:`url` says
    which), served by a thread of its own. Binds at construction, so a port in use fails before the daemon starts.

    Args:
        server: the daemon to report on.
        host: the interface to listen on (127.0.0.1 by default: metrics are not for the open network).
        port: the TCP port.
        stall_after: heartbeat age (seconds) beyond which /healthz answers 503 ``stalled``.
    """

    def __init__(
        self, server: Server, host: str = "127.0.0.1", port: int = 0, *, stall_after: float = STALL_AFTER_S
    ) -> None:
        prometheus = require_prometheus()
        self.registry = prometheus.CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server, prometheus.metrics_core))
        exposition = (prometheus.generate_latest, prometheus.CONTENT_TYPE_LATEST)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, exposition[0](owner.registry), exposition[1])
                elif path == "/healthz":
                    ok, body = health(server, stall_after)
                    self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found: try /healthz or /metrics\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
                log_event(server.log, logging.DEBUG, "http_request", line=format % args)

        try:
            self._http = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); is another daemon "
                "using it? choose another port"
            ) from None
        self._http.daemon_threads = True
        bound_host, bound_port = self._http.server_address[:2]
        self.url = f"http://{bound_host!s}:{bound_port}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
