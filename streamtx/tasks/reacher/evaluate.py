"""Closed-loop evaluation on Reacher-v5: a controller (the scripted expert, or a policy served by the daemon and
reached through the client SDK) drives the simulator for a set of seeded episodes.

Evaluation seeds start at :data:`EVAL_SEED` so that they are held out from the collector's (``0, 1, ...``).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from .env import EPISODE_STEPS, SUCCESS_DISTANCE, Half, fingertip_distance, fingertip_position, make_env, \
    reset_episode
from .expert import ReacherExpert

__all__ = ["EVAL_SEED", "Controller", "ExpertController", "SessionController", "EvalResult", "ServedEvaluation",
           "run_episodes", "eval_seeds", "evaluate_served"]

EVAL_SEED = 1_000_000


def eval_seeds(num_episodes: int, start: int = EVAL_SEED) -> list[int]:
    return list(range(start, start + num_episodes))


class Controller(Protocol):
    """Anything that maps the stream of observations of an episode to torques."""

    def reset(self, seed: int) -> None:
        """A new episode starts (``seed`` may seed the controller's own randomness)."""

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Torques ``(2,)`` for the observation ``(10,)`` of the current control step."""


class ExpertController:
    """The scripted expert as a controller."""

    def __init__(self, expert: ReacherExpert | None = None) -> None:
        self.expert = expert or ReacherExpert()

    def reset(self, seed: int) -> None:
        pass

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.expert(obs)


class SessionController:
    """A policy served by the streamtx daemon, driven through one client session (a robot stream).

    Every observation is sent to the daemon (the policy's streaming state must see each one). Every ``execute``
    control steps the step asks for an action chunk, played by the SDK's ``ActionChunkBuffer``; the other steps only
    observe. ``latencies`` collects the client-measured round trip (seconds) of every chunk request, ``chunks`` the
    raw chunks ``(horizon, 2)`` as the daemon returned them.

    Args:
        session: an open ``streamtx_client.Session``.
        execute: control steps between chunk requests (``1 <= execute <= horizon``).
        ensemble_decay: temporal ensembling of overlapping chunks (see ``ActionChunkBuffer``), or None.
    """

    def __init__(self, session: Any, execute: int = 1, ensemble_decay: float | None = None) -> None:
        from streamtx_client import ActionChunkBuffer

        self.session = session
        self.buffer = ActionChunkBuffer(session.info.horizon, execute, ensemble_decay=ensemble_decay)
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
class EvalResult:
    """Per-episode outcomes: ``seeds (N,)``, ``final_distance (N,)``, ``fingertip (N, T + 1, 2)`` (the path, first
    position included), ``target (N, 2)``, ``actions (N, T, 2)`` (as applied, clipped to the action space)."""

    seeds: np.ndarray
    final_distance: np.ndarray
    fingertip: np.ndarray
    target: np.ndarray
    actions: np.ndarray

    @property
    def success_rate(self) -> float:
        return float((self.final_distance < SUCCESS_DISTANCE).mean())

    @property
    def mean_final_distance(self) -> float:
        return float(self.final_distance.mean())

    def summary(self) -> str:
        return f"success {self.success_rate:6.1%}  mean final distance {self.mean_final_distance:.4f}"


def run_episodes(controller: Controller, seeds: Sequence[int], half: Half | None = None, progress: bool = True,
                 desc: str = "episodes") -> EvalResult:
    """Run one episode per seed (each ``EPISODE_STEPS`` control steps) with ``controller`` in the loop.

    The applied torque is the controller's clipped to the action space ``[-1, 1]^2``, as a robot's driver would; a
    non-finite torque raises ``ValueError``.
    """
    if len(seeds) < 1:
        raise ValueError("seeds: expected at least one episode seed, got none")
    env = make_env()
    n = len(seeds)
    final = np.zeros(n)
    path = np.zeros((n, EPISODE_STEPS + 1, 2))
    target = np.zeros((n, 2))
    actions = np.zeros((n, EPISODE_STEPS, 2))
    for e, seed in enumerate(tqdm(seeds, desc=desc, disable=not progress, dynamic_ncols=True)):
        obs = reset_episode(env, seed, half)
        controller.reset(int(seed))
        target[e] = obs[4:6]
        path[e, 0] = fingertip_position(obs)
        for t in range(EPISODE_STEPS):
            action = np.asarray(controller(obs), dtype=np.float64)
            if action.shape != (2,) or not np.isfinite(action).all():
                raise ValueError(f"controller: expected finite torques of shape (2,), got {action!r}")
            actions[e, t] = np.clip(action, -1.0, 1.0)
            obs, *_ = env.step(actions[e, t].astype(np.float32))
            path[e, t + 1] = fingertip_position(obs)
        final[e] = fingertip_distance(obs)
    env.close()
    return EvalResult(np.asarray(seeds), final, path, target, actions)


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


def evaluate_served(checkpoint: str | os.PathLike[str], seeds: Sequence[int], half: Half | None = None,
                    execute: int = 1, *, threads: int = 1, log_path: str | os.PathLike[str] | None = None,
                    progress: bool = True, desc: str = "policy") -> ServedEvaluation:
    """Start the daemon on ``checkpoint`` (a child process on a free local port, ``threads`` torch threads), run one
    episode per seed as a client robot through the SDK (one session, reset with the episode's seed), and shut the
    daemon down. The daemon's JSON log goes to ``log_path`` (default: a temporary file, removed afterwards)."""
    from streamtx_client import Client
    from streamtx_server.process import DaemonProcess

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {checkpoint}")
    with tempfile.TemporaryDirectory(prefix="streamtx-reacher-") as tmp:
        log = Path(log_path) if log_path is not None else Path(tmp) / "daemon.log"
        daemon = DaemonProcess.serve(checkpoint.resolve(), ["tcp://127.0.0.1:*"], log, f"--threads={threads}")
        endpoint = daemon.start()[0]
        try:
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
