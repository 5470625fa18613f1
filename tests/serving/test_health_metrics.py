"""Health and metrics over HTTP: /healthz says whether the serve loop serves (200) or not (503, and why); /metrics
is Prometheus text with per-stage latency histograms, sessions, queue depth, batch sizes, errors by code and
refusals, every label of bounded cardinality; the daemon runs without prometheus_client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import TIMEOUT, RawPeer, error_code, start_daemon

from streamtx_server import Server, ServerConfig
from streamtx_server.metrics import MetricsServer, health


class ConstantPolicy:
    """A numpy policy that answers zeros at once; while ``hold`` is set, ``act`` blocks until ``release`` (a stuck
    model), after setting ``entered``."""

    obs_dim, action_dim, horizon, max_tokens_per_step, receptive_field = 3, 2, 4, 4, 1
    dtype = np.dtype(np.float32)

    def __init__(self) -> None:
        self.hold, self.entered, self.release = threading.Event(), threading.Event(), threading.Event()

    def metadata(self) -> dict[str, Any]:
        return {"model": "constant"}

    def init_state(self, batch_size: int) -> np.ndarray:
        return np.zeros(batch_size)

    def reset(self, state: Any, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        pass

    def observe(self, state: Any, obs: np.ndarray, rows: np.ndarray) -> None:
        pass

    def act(self, state: Any, rows: np.ndarray) -> np.ndarray:
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(TIMEOUT)
        return np.zeros((len(rows), self.horizon, self.action_dim), np.float32)


def serve(
    policy: ConstantPolicy, directory: Path, **config: Any
) -> tuple[Server, threading.Thread, MetricsServer, str]:
    """The daemon in a thread on an ipc path, its metrics on a free port; returns once a hello was answered (the
    loop serves)."""
    endpoint = f"ipc://{directory}/daemon.ipc"
    server = Server(policy, [endpoint], ServerConfig(**config))
    http = MetricsServer(server, "127.0.0.1", 0)
    http.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with RawPeer(endpoint) as peer:  # connects before the bind; the reply comes once the loop runs
        assert peer.request("hello")["ok"]
    return server, thread, http, endpoint


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(http: MetricsServer) -> dict[str, list[Any]]:
    status, body = get(http.url + "/metrics")
    assert status == 200
    return {family.name: family.samples for family in text_string_to_metric_families(body.decode())}


def value(samples: list[Any], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_metrics_report_stages_sessions_batches_errors_and_refusals(tmp_path: Path) -> None:
    policy = ConstantPolicy()
    server, thread, http, endpoint = serve(policy, tmp_path, max_sessions=1, max_queued_per_session=1)
    try:
        with RawPeer(endpoint) as a, RawPeer(endpoint) as b:
            assert a.request("open", session="a")["ok"]
            for _ in range(3):
                assert a.request("step", session="a", obs=np.zeros(3, np.float32))["ok"]
            assert error_code(b.request("open", session="b")) == "full"  # no wait: refused at once
            bad = a.request("step", session="a", seq=4, obs=np.zeros(2, np.float32))  # seq given: the next is 4
            assert error_code(bad) == "bad_shape"
            b.send_request("open", session="b", wait=TIMEOUT)
            assert b.request("stats")["result"]["waiting_opens"] == 1  # b's socket: read after its open
            assert json.loads(get(http.url + "/healthz")[1])["waiting_opens"] == 1
            # busy: hold the model in a batch so that a's queue (1 step) fills
            policy.hold.set()
            a.send_request("step", session="a", obs=np.zeros(3, np.float32))
            assert policy.entered.wait(TIMEOUT)
            a.send_request("step", session="a", obs=np.zeros(3, np.float32))  # queued (the limit)
            a.send_request("step", session="a", obs=np.zeros(3, np.float32))  # busy, read once the model returns
            families = scrape(http)  # the loop is stuck in the model: the scrape does not need it
            assert value(families["streamtx_loop_heartbeat_age_seconds"], "streamtx_loop_heartbeat_age_seconds") >= 0
            policy.hold.clear()
            policy.release.set()
            codes = [a.recv() for _ in range(3)]
            assert [r["ok"] for r in codes] == [True, False, True] and error_code(codes[1]) == "busy"
            assert a.request("stats")["ok"]  # the loop recorded the last reply's latency before it read this

            families = scrape(http)
            latency = families["streamtx_stage_latency_seconds"]
            assert {s.labels["stage"] for s in latency} == {"decode", "queue", "model", "encode", "total"}
            assert value(latency, "streamtx_stage_latency_seconds_count", stage="queue") == 5  # the steps run
            assert value(latency, "streamtx_stage_latency_seconds_bucket", stage="queue", le="+Inf") == 5
            assert value(latency, "streamtx_stage_latency_seconds_count", stage="total") >= 11  # hello included
            assert value(latency, "streamtx_stage_latency_seconds_count", stage="model") == 5  # 5 batches of one
            sums = {
                stage: value(latency, "streamtx_stage_latency_seconds_sum", stage=stage) for stage in ("model", "total")
            }
            assert 0 < sums["model"] <= sums["total"], sums  # a step's round trip in the daemon contains its batch
            assert value(families["streamtx_batch_size"], "streamtx_batch_size_count") == 5
            assert value(families["streamtx_batch_size"], "streamtx_batch_size_bucket", le="1.0") == 5
            assert value(families["streamtx_steps"], "streamtx_steps_total") == 5
            assert value(families["streamtx_requests"], "streamtx_requests_total", kind="step") == 6
            errors = families["streamtx_errors"]
            assert value(errors, "streamtx_errors_total", code="full") == 1
            assert value(errors, "streamtx_errors_total", code="bad_shape") == 1
            assert value(errors, "streamtx_errors_total", code="internal") == 0  # every code, zeros included
            refusals = families["streamtx_refusals"]
            assert [value(refusals, "streamtx_refusals_total", reason=r) for r in ("full", "busy", "auth")] == [1, 1, 0]
            assert value(families["streamtx_sessions"], "streamtx_sessions") == 1
            assert value(families["streamtx_session_slots"], "streamtx_session_slots") == 1
            assert value(families["streamtx_waiting_opens"], "streamtx_waiting_opens") == 1
            assert value(families["streamtx_queued_steps"], "streamtx_queued_steps") == 0
            info = families["streamtx_build_info"][0]
            assert info.labels["protocol"] == "2" and info.value == 1
            # bounded cardinality: no label names a session, a peer or anything else unbounded
            labels = {name for samples in families.values() for s in samples for name in s.labels}
            assert labels <= {"stage", "kind", "code", "reason", "le", "version", "protocol"}

            assert a.request("close", session="a")["ok"]
            assert b.recv()["ok"]  # admitted from the wait queue
            families = scrape(http)
            assert value(families["streamtx_admitted_from_wait"], "streamtx_admitted_from_wait_total") == 1
            assert value(families["streamtx_waiting_opens"], "streamtx_waiting_opens") == 0
            assert b.request("close", session="b")["ok"]
            families = scrape(http)  # the gauges follow the sessions down, not the slots
            assert value(families["streamtx_sessions"], "streamtx_sessions") == 0
            assert value(families["streamtx_session_slots"], "streamtx_session_slots") == 1
    finally:
        policy.release.set()
        server.stop()
        thread.join(TIMEOUT)
        http.close()


def test_healthz_follows_the_loop(tmp_path: Path) -> None:
    policy = ConstantPolicy()
    server, thread, http, endpoint = serve(policy, tmp_path)
    try:
        status, body = get(http.url + "/healthz")
        report = json.loads(body)
        assert status == 200 and report["status"] == "ok", report
        assert report["sessions"] == 0 and report["protocol"] == 2 and report["version"]
        assert get(http.url + "/nothing")[0] == 404
        with RawPeer(endpoint) as peer:
            assert peer.request("open", session="s")["ok"]
            assert json.loads(get(http.url + "/healthz")[1])["sessions"] == 1
            policy.hold.set()  # the model hangs: the loop stops waking, its heartbeat ages
            peer.send_request("step", session="s", obs=np.zeros(3, np.float32))
            assert policy.entered.wait(TIMEOUT)
            frozen = server.heartbeat
            healthy, report = health(server, stall_after=0.0)  # any age is too old: the loop is stuck, not idle
            assert not healthy and report["status"] == "stalled"
            policy.hold.clear()
            policy.release.set()
            assert peer.recv()["ok"]
            assert peer.request("stats")["ok"]  # answered by the loop after it woke again
            assert server.heartbeat > frozen and health(server)[0]
    finally:
        policy.release.set()
        server.stop()
        thread.join(TIMEOUT)
    try:
        status, body = get(http.url + "/healthz")
        assert status == 503 and json.loads(body)["status"] == "stopped"
    finally:
        http.close()


def test_metrics_port_in_use_and_prometheus_client_missing_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    server = Server(ConstantPolicy(), ["tcp://127.0.0.1:*"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}"):
            MetricsServer(server, "127.0.0.1", port)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed: importing it fails
    with pytest.raises(RuntimeError, match=r"--metrics-port needs the prometheus_client package: pip install"):
        MetricsServer(server, "127.0.0.1", 0)


def test_the_daemon_imports_neither_prometheus_client_nor_torch() -> None:
    code = (
        "import sys, streamtx_server, streamtx_server.cli, streamtx_server.metrics; "
        "print(sorted(m for m in ('prometheus_client', 'torch', 'streamtx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.strip() == "[]", out


def test_serve_metrics_port_from_the_config_file(checkpoint: Path, tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("metrics-port = 0\nmax-waiting-opens = 3\n")
    daemon = start_daemon(checkpoint, tmp_path, f"--config={config}", binds=("tcp://127.0.0.1:*",))
    try:
        events = [json.loads(line) for line in daemon.log_path.read_text().splitlines() if line.startswith("{")]
        (url,) = [e["url"] for e in events if e.get("event") == "metrics_listening"]
        assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
        status, body = get(url + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        with RawPeer(daemon.endpoints[0]) as peer:
            assert peer.request("hello")["result"]["limits"]["max_waiting_opens"] == 3
        status, body = get(url + "/metrics")
        assert status == 200 and b"streamtx_stage_latency_seconds_bucket" in body
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
