"""Command line: ``serve`` (run the daemon for a policy loader), ``stats`` (print a daemon's statistics), ``keygen``
(CURVE keys). ``streamtx serve`` / ``stats`` / ``keygen`` (``streamtx.apps.serve``) call these."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from streamtx_client import Client, RequestTimeout, ServerError
from streamtx_client.protocol import PROTOCOL_VERSION

from .auth import create_curve_keys, load_server_keys
from .config import ServerConfig
from .config_file import add_config_option, parse_args_with_config
from .daemon import Server
from .jsonlog import configure_logging, log_event
from .metrics import MetricsServer, require_prometheus
from .openpi import DEFAULT_OBS_KEY, OpenpiBridge, OpenpiEndpoint

__all__ = ["serve_main", "serve_args", "serve_parser", "stats_main", "keygen_main", "main", "run_server"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 0..65535 (0: any free one), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def default_threads() -> int:
    """Half the cores, at most 4: the rest stays free for the clients and the robot loop on the same machine (on
    2 cores, torch's default of one thread per core made the README's robot loop miss its 0.5 s timeouts)."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def serve_parser(prog: str = "streamtx serve") -> argparse.ArgumentParser:
    defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve a streaming policy checkpoint over ZeroMQ.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_option(p)
    p.add_argument("--checkpoint", required=True, type=Path, help="policy checkpoint (streamtx.checkpoint format)")
    p.add_argument(
        "--bind",
        action="append",
        metavar="ENDPOINT",
        help="tcp://host:port or ipc:///path; repeat for several (default tcp://127.0.0.1:5555)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=default_threads(),
        help="torch intra-op threads; the default (half the cores, at most 4) leaves cores to clients on this host",
    )
    p.add_argument(
        "--max-sessions", type=_positive_int, default=defaults.max_sessions, help="session slots (rows of the state)"
    )
    p.add_argument(
        "--max-message-bytes", type=_positive_int, default=defaults.max_message_bytes, help="largest request accepted"
    )
    p.add_argument(
        "--max-array-elements",
        type=_positive_int,
        default=defaults.max_array_elements,
        help="largest array accepted in a request",
    )
    p.add_argument(
        "--max-tokens-per-step",
        type=_positive_int,
        default=defaults.max_tokens_per_step,
        help="observation tokens one step may carry",
    )
    p.add_argument(
        "--max-queued-per-session",
        type=_positive_int,
        default=defaults.max_queued_per_session,
        help="steps one session may have waiting; more are answered busy",
    )
    p.add_argument(
        "--max-obs-abs",
        type=float,
        default=defaults.max_obs_abs,
        help="largest observation magnitude accepted, checked in the model's dtype",
    )
    p.add_argument(
        "--max-batch",
        type=_positive_int,
        default=defaults.max_batch,
        help="most session steps per batched forward; 1 turns batching off",
    )
    p.add_argument(
        "--max-wait-ms",
        type=_non_negative_float,
        default=defaults.max_wait * 1e3,
        help="how long a step may wait for others to join its batch",
    )
    p.add_argument(
        "--idle-timeout",
        type=_non_negative_float,
        default=defaults.idle_timeout,
        help="seconds after which a session with no request and nothing queued is closed; 0 turns expiry off",
    )
    p.add_argument(
        "--max-waiting-opens",
        type=_non_negative_int,
        default=defaults.max_waiting_opens,
        help="opens that may wait for a session slot when all are taken (admitted first come, first served as "
        "slots free); more are answered full; 0: full at once",
    )
    p.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        help="serve /healthz and Prometheus /metrics over HTTP on this port (0: any free one, logged); off if "
        "not given; needs prometheus_client (pip install 'streamtx[metrics]')",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="interface of the --metrics-port endpoint (0.0.0.0: every interface)",
    )
    p.add_argument(
        "--curve-keys",
        type=Path,
        metavar="DIR",
        help="require CURVE: DIR holds server.key_secret (and optionally authorized_clients/)",
    )
    p.add_argument(
        "--openpi-port",
        type=_port,
        help="also serve openpi's websocket policy protocol on this port (0: any free one); off by default",
    )
    p.add_argument("--openpi-host", default="127.0.0.1", help="the address the openpi endpoint binds")
    p.add_argument(
        "--openpi-obs-key",
        action="append",
        metavar="KEY",
        help=f"openpi observation key whose values, concatenated in the order given, are the policy's observation "
        f"tokens; repeat for several (default {DEFAULT_OBS_KEY})",
    )
    p.add_argument(
        "--openpi-ignore-key",
        action="append",
        metavar="KEY",
        help="openpi observation key accepted and dropped (e.g. prompt, camera images); other unknown keys are refused",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    p.add_argument("--log-format", default="json", choices=["json", "text"], help="one JSON object per line, or text")
    p.add_argument("--version", action="version", version=f"%(prog)s (protocol {PROTOCOL_VERSION})")
    return p


def run_server(
    policy: Any,
    endpoints: Sequence[str],
    config: ServerConfig,
    *,
    curve_keys: Path | None = None,
    openpi: OpenpiEndpoint | None = None,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Serve ``policy`` until SIGINT or SIGTERM, then finish the requests in flight and return 0. SIGUSR1 drains
    the daemon (:meth:`Server.drain`: its sessions move to the other replicas of a fleet).

    With ``openpi``, an :class:`~streamtx_server.openpi.OpenpiBridge` in a thread serves openpi's websocket protocol
    as a client of this daemon over a private ``inproc://`` endpoint; it stops first on a signal. With ``metrics``
    (host, port), /healthz and /metrics are served over HTTP there."""

    curve = load_server_keys(curve_keys) if curve_keys is not None else None
    if openpi is not None and curve is not None:
        raise ValueError(
            "--openpi-port: the openpi websocket protocol has no authentication; it cannot be combined with "
            "--curve-keys (serve openpi clients from a daemon of their own, bound to a trusted network)"
        )
    bridge_endpoint = f"inproc://streamtx-openpi-{uuid.uuid4().hex}"
    server = Server(policy, [*endpoints, bridge_endpoint] if openpi is not None else endpoints, config, curve=curve)
    http = MetricsServer(server, *metrics) if metrics is not None else None  # a port in use fails here, early
    bridge = None
    failure: list[BaseException] = []
    if openpi is not None:
        bridge = OpenpiBridge(
            bridge_endpoint, openpi.mapping, host=openpi.host, port=openpi.port, context=zmq.Context.instance()
        )

    def run_bridge() -> None:
        assert bridge is not None
        server.listening.wait()
        try:
            bridge.serve_forever()
        except (OSError, ImportError) as exc:  # e.g. the port is taken: the whole daemon fails, as a bad --bind does
            failure.append(exc)
            server.stop()

    def stop(*_: object) -> None:
        if bridge is not None:
            bridge.stop()
        server.stop()

    thread = threading.Thread(target=run_bridge, name="openpi", daemon=True) if bridge is not None else None
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: server.drain())
    try:
        if http is not None:
            http.start()
            log_event(server.log, logging.INFO, "metrics_listening", url=http.url, paths=["/healthz", "/metrics"])
        if thread is not None:
            thread.start()
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bridge is not None and thread is not None:
            bridge.stop()
            thread.join(5.0)
        if http is not None:
            http.close()
    if failure:
        raise OSError(f"--openpi-port: {failure[0]}")
    return 0
    return 0


PolicyLoader = Callable[[Path, str, "int | None", int], Any]
"""``(checkpoint, device, threads, max_tokens_per_step) -> policy``: how ``serve`` turns its flags into the policy it
serves. The daemon knows no model library; the application that runs it (``streamtx serve``) passes its loader."""


def serve_main(argv: list[str] | None, load_policy: PolicyLoader) -> int:
    """``serve --checkpoint PATH --bind tcp://127.0.0.1:5555 ...`` with the policy that ``load_policy`` makes."""
    return serve_args(parse_args_with_config(serve_parser(), argv), load_policy)


def serve_args(args: argparse.Namespace, load_policy: PolicyLoader) -> int:
    """:func:`serve_main` after parsing (an application that adds options to :func:`serve_parser` calls this)."""
    log = configure_logging(args.log_level, args.log_format)
    try:
        config = ServerConfig(
            max_message_bytes=args.max_message_bytes,
            max_array_elements=args.max_array_elements,
            max_sessions=args.max_sessions,
            max_tokens_per_step=args.max_tokens_per_step,
            max_batch=args.max_batch,
            max_wait=args.max_wait_ms / 1e3,
            idle_timeout=args.idle_timeout or None,
            max_queued_per_session=args.max_queued_per_session,
            max_obs_abs=args.max_obs_abs,
            max_waiting_opens=args.max_waiting_opens,
        )
        openpi = (
            None
            if args.openpi_port is None
            else OpenpiEndpoint.from_flags(
                args.openpi_port, args.openpi_host, args.openpi_obs_key, args.openpi_ignore_key
            )
        )
        if args.metrics_port is not None:
            require_prometheus()  # before the model loads: a missing package fails in a moment, not after it
        policy = load_policy(args.checkpoint, args.device, args.threads, args.max_tokens_per_step)
        metrics = None if args.metrics_port is None else (args.metrics_host, args.metrics_port)
        return run_server(
            policy,
            args.bind or ["tcp://127.0.0.1:5555"],
            config,
            curve_keys=args.curve_keys,
            openpi=openpi,
            metrics=metrics,
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        log_event(log, logging.ERROR, "serve_failed", error=str(exc))
        print(f"streamtx serve: {exc}", file=sys.stderr)
        return 1


def _table(stats: dict[str, Any]) -> str:
    lines = [
        f"sessions {stats['sessions']}/{stats['max_sessions']}   uptime {stats['uptime_s']:.1f} s   "
        f"batches {stats['batches']['count']} (mean size {stats['batches']['mean_size']:.2f}, "
        f"max {stats['batches']['max_size']})   superseded {stats['superseded']}   "
        f"expired {stats['expired_sessions']}   waiting opens {stats['waiting_opens']}",
        "",
        f"{'stage':<8} {'count':>9} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'max ms':>9}",
    ]
    for stage, s in stats["latency"].items():
        if s["count"]:
            lines.append(
                f"{stage:<8} {s['count']:>9} {s['p50_ms']:>9.3f} {s['p99_ms']:>9.3f} {s['mean_ms']:>9.3f} "
                f"{s['max_ms']:>9.3f}"
            )
        else:
            lines.append(f"{stage:<8} {0:>9} {'-':>9} {'-':>9} {'-':>9} {'-':>9}")
    lines += [
        "",
        "requests " + (", ".join(f"{k} {v}" for k, v in sorted(stats["requests"].items())) or "none"),
        "errors   " + (", ".join(f"{k} {v}" for k, v in sorted(stats["errors"].items())) or "none"),
    ]
    return "\n".join(lines)


def stats_main(argv: list[str] | None = None) -> int:
    """``streamtx stats ENDPOINT``: print a running daemon's statistics."""
    p = argparse.ArgumentParser(prog="streamtx stats", description="Print a streamtx daemon's statistics.")
    p.add_argument("endpoint", help="tcp://host:port or ipc:///path")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the reply")
    p.add_argument("--server-key", help="the daemon's CURVE public key (Z85 text or its .key file)")
    p.add_argument("--client-keys", help="this client's .key_secret file, if the daemon lists admitted clients")
    p.add_argument("--json", action="store_true", help="print the raw statistics as JSON")
    args = p.parse_args(argv)

    try:
        with Client(
            args.endpoint, timeout=args.timeout, retries=0, server_key=args.server_key, client_keys=args.client_keys
        ) as client:
            stats = client.stats()
    except (RequestTimeout, ServerError, ValueError) as exc:
        print(f"streamtx stats: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else _table(stats))
    return 0


def keygen_main(argv: list[str] | None = None) -> int:
    """``streamtx keygen DIR [--clients N]``: CURVE keys for ``serve --curve-keys DIR``."""
    p = argparse.ArgumentParser(prog="streamtx keygen", description="Create CURVE keys for the daemon.")
    p.add_argument("directory", type=Path)
    p.add_argument("--clients", type=int, default=0, help="also create N admitted client key pairs")
    args = p.parse_args(argv)

    public = create_curve_keys(args.directory, clients=args.clients)
    print(f"server public key (give to clients): {public}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m streamtx_server {stats,keygen} ...`` (serving a checkpoint is ``streamtx serve``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"stats": stats_main, "keygen": keygen_main}
    if not argv or argv[0] not in commands:
        print(
            f"usage: python -m streamtx_server {{{','.join(commands)}}} ...  (to serve a checkpoint: streamtx serve)",
            file=sys.stderr,
        )
        return 2
    return commands[argv[0]](argv[1:])
