"""Helpers of the serving tests: daemons in child processes, the in-process reference run, and a raw DEALER peer
for hand-made messages."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx_client import LocalSession, Patience
from streamtx_client.protocol import PROTOCOL_VERSION, decode, encode
from streamtx_server import Server, ServerConfig
from streamtx_server.process import DaemonProcess

Script = Sequence[tuple[np.ndarray, bool]]
"""A session's stream: per control step, observation tokens ``(S, obs_dim)`` and whether it asks for actions."""

TIMEOUT = 20.0  # seconds; generous for a loaded 2-core machine, still bounded
MAX_TOKENS = 4  # observation tokens per step, in the daemon under test and the in-process reference
# Small limits, so the limit tests need small messages.
DAEMON_FLAGS = (
    "--threads=1",
    f"--max-tokens-per-step={MAX_TOKENS}",
    "--max-message-bytes=65536",
    "--max-array-elements=4096",
    "--max-sessions=24",
    "--max-wait-ms=2",
)


def start_daemon(checkpoint: Path, directory: Path, *flags: str, binds: tuple[str, ...] | None = None) -> DaemonProcess:
    """``python -m streamtx serve`` in a child process, listening; default endpoints ``[tcp, ipc]``."""
    binds = binds or ("tcp://127.0.0.1:*", f"ipc://{directory}/daemon.ipc")
    daemon = DaemonProcess.serve(checkpoint, binds, directory / "daemon.log", *DAEMON_FLAGS, *flags)
    daemon.start()
    return daemon


def start_server(
    policy: Any,
    endpoint: str,
    *,
    context: zmq.Context | None = None,
    curve: Any = None,
    clock: Callable[[], float] = time.monotonic,
    logger: logging.Logger | None = None,
    **config: Any,
) -> tuple[Server, threading.Thread]:
    """A :class:`Server` serving the torch ``policy`` (through the numpy adapter) in a thread; returns once it
    listens."""
    server = Server(
        TorchBatchPolicy(policy), [endpoint], ServerConfig(**config), curve=curve, clock=clock, logger=logger
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"context": context}, daemon=True)
    thread.start()
    assert server.listening.wait(TIMEOUT), "the server did not start"
    return server, thread


@dataclass(frozen=True)
class RecordingPatience(Patience):
    """The client's patience, with an event set at its first retry (a request of the client timed out)."""

    retried: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        self.retried.set()
        return super().delay(attempt)


def stop_server(server: Server, thread: threading.Thread) -> None:
    server.stop()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def wait_ipc_released(endpoint: str) -> None:
    """Until nobody accepts on the ipc path of ``endpoint``: a stopped daemon's ZeroMQ socket is closed by libzmq's
    I/O thread after the daemon's own thread has ended, which on a loaded machine can be a while later, and a new
    daemon refuses a path still listened on. The condition itself is what is waited for (bounded by ``TIMEOUT``)."""
    path, deadline, pause = endpoint.removeprefix("ipc://"), time.monotonic() + TIMEOUT, threading.Event()
    while time.monotonic() < deadline:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            return
        finally:
            probe.close()
        pause.wait(0.01)
    raise AssertionError(f"{endpoint}: still listened on {TIMEOUT} s after the daemon stopped")


def make_script(
    rng: np.random.Generator, steps: int, obs_dim: int, max_tokens: int = 1, observe_every: int = 0
) -> list[tuple[np.ndarray, bool]]:
    """A random stream: ``1..max_tokens`` tokens per step; every ``observe_every``-th step only observes."""
    script = []
    for t in range(steps):
        s = int(rng.integers(1, max_tokens + 1))
        act = not (observe_every and t % observe_every == observe_every - 1)
        script.append((rng.standard_normal((s, obs_dim)).astype(np.float32), act))
    return script


def reference_run(policy: Any, seed: int, script: Script) -> list[np.ndarray | None]:
    """The stream run in-process on its own, through the same session interface the SDK gives a robot."""
    with LocalSession(TorchBatchPolicy(policy), seed=seed) as session:
        return [session.step(obs) if act else session.observe(obs) for obs, act in script]


def assert_same_actions(got: Sequence[np.ndarray | None], want: Sequence[np.ndarray | None], atol: float = 1e-6):
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"step {t}: got {g}, want {w}"
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=0, atol=atol, err_msg=f"step {t}")


class RawPeer:
    """A bare DEALER socket: sends any frames, receives decoded replies with a timeout."""

    def __init__(self, endpoint: str, **curve: bytes) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        for name, key in curve.items():
            setattr(self.socket, name, key)
        self.socket.connect(endpoint)
        self._ids = 0
        self.tokens: dict[str, str] = {}  # session -> token, from open replies
        self.seqs: dict[str, int] = {}  # session -> the last seq sent

    def send(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def send_request(self, kind: str, version: int = PROTOCOL_VERSION, **fields: Any) -> int:
        """Send a request; session requests get the session's token and (step, reset) its next seq unless given."""
        session = fields.get("session")
        if kind in ("step", "reset", "close", "resync") and isinstance(session, str):
            fields.setdefault("token", self.tokens.get(session, f"token-{session}"))
            if kind in ("step", "reset") and "seq" not in fields:
                fields["seq"] = self.seqs[session] = self.seqs.get(session, 0) + 1
        if kind == "open" and isinstance(session, str):
            fields.setdefault("token", self.tokens.setdefault(session, f"token-{session}"))
            self.seqs[session] = fields.get("seq", 0)
        self._ids += 1
        self.send(encode({"v": version, "id": self._ids, "kind": kind, **fields}))
        return self._ids

    def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if not self.socket.poll(timeout * 1e3):
            raise TimeoutError(f"no reply within {timeout} s")
        return decode(self.socket.recv())

    def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        rid = self.send_request(kind, **fields)
        reply = self.recv()
        assert reply["id"] == rid, reply
        return reply

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], reply
    return reply["error"]["code"]


class GatedPolicy:
    """The real policy, but ``act`` can be made to block until released, or to raise."""

    def __init__(self, policy: Any) -> None:
        self._policy = policy
        self.gate_next_act = False
        self.acting = threading.Event()  # set while a gated act waits
        self.release = threading.Event()
        self.fail = False
        self.nan_next_act = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def act(self, state: Any, rows: Any = None) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("simulated model failure")
        if self.gate_next_act:
            self.gate_next_act = False
            self.acting.set()
            assert self.release.wait(TIMEOUT)
        actions = self._policy.act(state, rows)
        if self.nan_next_act:
            self.nan_next_act = False
            actions = torch.full_like(actions, float("nan"))
        return actions
