"""Closed-loop evaluation of a checkpoint served by the streamtx daemon: the daemon runs as a child process, the
simulated Reacher arm is a client robot that reaches it through the SDK (the path a real robot takes)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamtx_client import ActionChunkBuffer, Client
from streamtx_server.process import DaemonProcess

from ..tasks.reacher.env import Half
from ..tasks.reacher.evaluate import EvalResult, run_episodes

__all__ = ["SessionController", "ServedEvaluation", "evaluate_served"]


class SessionController:
    """A streaming policy driven through one session (a robot stream): served by the daemon, or in-process.

    Every observation is sent to the daemon (the policy's streaming state must see each one). Every ``execute``
    control steps the step asks for an action chunk, played by the SDK's ``ActionChunkBuffer``; the other steps only
    observe. ``latencies`` collects the client-measured round trip (seconds) of every chunk request, ``chunks`` the
    raw chunks ``(horizon, 2)`` as the daemon returned them.

    Args:
        session: an open session: a ``streamtx_client.Session`` (served), or a ``LocalSession`` (in-process).
        execute: control steps between chunk requests (``1 <= execute <= horizon``).
        ensemble_decay: temporal ensembling of overlapping chunks (see ``ActionChunkBuffer``), or None.
    """

    def __init__(self, session: Any, execute: int = 1, ensemble_decay: float | None = None) -> None:
        self.session = session
        self.buffer = ActionChunkBuffer(session.horizon, execute, ensemble_decay=ensemble_decay)
        self.latencies: list[float] = []
        self.chunks: list[np.ndarray] = []

    def reset(self, seed: int) -> None:
        self.session.reset(seed)
        self.buffer.clear()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if self.buffer.needs_chunk:
            start = time.perf_counter()
            chunk = self.session.step(obs)
            self.latencies.append(time.perf_counter() - start)
            if chunk is None:  # only a pipelining client can be superseded; this one waits for each reply
                raise RuntimeError("the daemon superseded a blocking step request")
            self.chunks.append(chunk)
            self.buffer.add(chunk)
        else:
            self.session.observe(obs)
        return self.buffer.pop()


@dataclass
class ServedEvaluation:
    """Episodes run through the daemon: the outcomes, the client-measured round trip (seconds) of every chunk request,
    the raw chunks ``(requests, horizon, action_dim)`` the daemon returned, its ``stats`` reply at the end and its
    ``hello``."""

    result: EvalResult
    latencies: np.ndarray
    chunks: np.ndarray
    stats: dict[str, Any]
    hello: dict[str, Any]

    def model_time_ms(self) -> dict[str, float]:
        """The daemon's model-stage latency percentiles (every batch of policy calls, observe-only steps included)."""
        model = self.stats["latency"]["model"]
        return {"p50": float(model["p50_ms"]), "p99": float(model["p99_ms"])} if model["count"] else {}


def evaluate_served(
    checkpoint: str | os.PathLike[str],
    seeds: Sequence[int],
    half: Half | None = None,
    execute: int = 1,
    *,
    threads: int = 1,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    desc: str = "policy",
    on_listening: Callable[[str], None] | None = None,
) -> ServedEvaluation:
    """Start the daemon on ``checkpoint`` (a child process on a free local port, ``threads`` torch threads), run one
    episode per seed as a client robot through the SDK (one session, reset with the episode's seed), and shut the
    daemon down, also when interrupted (KeyboardInterrupt) at any point after it was started. The daemon's JSON log
    goes to ``log_path`` (default: a temporary file, removed afterwards); ``on_listening`` gets its endpoint once it
    listens."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {checkpoint}")
    with tempfile.TemporaryDirectory(prefix="streamtx-reacher-") as tmp:
        log = Path(log_path) if log_path is not None else Path(tmp) / "daemon.log"
        daemon = DaemonProcess.serve(checkpoint.resolve(), ["tcp://127.0.0.1:*"], log, f"--threads={threads}")
        try:
            endpoint = daemon.start()[0]
            if on_listening is not None:
                on_listening(endpoint)
            # generous timeout: the first request of a fresh daemon may wait for lazy initialization
            with Client(endpoint, timeout=30.0, retries=0) as client:
                hello = client.hello()
                session = client.open(seed=int(seeds[0]))
                controller = SessionController(session, execute)
                result = run_episodes(controller, seeds, half, progress=progress, desc=desc)
                stats = client.stats()
                session.close()
        finally:
            code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"the daemon exited with code {code}:\n{daemon.log_tail()}")
    return ServedEvaluation(result, np.asarray(controller.latencies), np.stack(controller.chunks), stats, hello)
