"""A scripted replica for the fleet client's state machine: a ROUTER on an inproc endpoint that answers the
protocol's requests as a test tells it (normal, refusing, moving, silent), and records what it received."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from streamtx_client.errors import ErrorCode
from streamtx_client.placement import Replica
from streamtx_client.protocol import decode, encode, error_reply, ok_reply

OBS_DIM, ACTION_DIM, HORIZON, WINDOW = 2, 1, 3, 4
HELLO = {
    "protocol": 2,
    "versions": [2],
    "policy": {
        "obs_dim": OBS_DIM,
        "action_dim": ACTION_DIM,
        "horizon": HORIZON,
        "replay_window": WINDOW,
        "max_tokens_per_step": 4,
        "dtype": "float32",
        "metadata": {},
    },
    "limits": {"max_tokens_per_step": 4, "max_message_bytes": 1 << 20},
}

Behaviour = Callable[[dict[str, Any]], "dict[str, Any] | None"]
"""A request -> its reply (None: stay silent)."""


class Journal:
    """Every request every fake received, in order: ``(replica id, kind, message)``; :meth:`wait` blocks on it."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []
        self._changed = threading.Condition()

    def add(self, replica: str, message: dict[str, Any]) -> None:
        with self._changed:
            self.entries.append((replica, message["kind"], message))
            self._changed.notify_all()

    def of(self, replica: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self._changed:
            return [m for r, k, m in self.entries if r == replica and kind in (None, k)]

    def wait_for(self, replica: str, kind: str, timeout: float = 30.0) -> bool:
        """Block until ``replica`` received a request of ``kind``."""
        with self._changed:
            return self._changed.wait_for(lambda: (replica, kind) in [(r, k) for r, k, _ in self.entries], timeout)

    def kinds(self) -> list[tuple[str, str]]:
        with self._changed:
            return [(r, k) for r, k, _ in self.entries if k != "hello"]


class FakeReplica:
    """Answers like a daemon holding sessions (token check, seq), unless ``refuse`` says otherwise for a request:
    ``refuse(message)`` returns a reply to send instead, ``SILENT`` to send none, or None to answer normally."""

    SILENT: dict[str, Any] = {"silent": True}

    def __init__(self, context: zmq.Context, replica: Replica, journal: Journal) -> None:
        self.replica = replica
        self.journal = journal
        self.refuse: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda message: None
        self.sessions: dict[str, int] = {}  # id -> last applied seq
        self._socket = context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self._socket.bind(replica.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(20):
                continue
            identity, body = self._socket.recv_multipart()
            message = decode(body)
            self.journal.add(self.replica.id, message)
            reply = self.refuse(message)
            if reply is None:
                reply = self._answer(message)
            if reply is not self.SILENT:
                self._socket.send_multipart([identity, encode({**reply, "id": message["id"]})])

    def _answer(self, m: dict[str, Any]) -> dict[str, Any]:
        kind = m["kind"]
        if kind == "hello":
            return ok_reply(None, HELLO)
        if kind == "open":
            self.sessions[m["session"]] = m.get("seq", 0)
            tokens = 0 if m.get("replay") is None else len(m["replay"])
            return ok_reply(
                None,
                {
                    "session": m["session"],
                    "token": m["token"],
                    "seed": m.get("seed", 7),
                    "seq": m.get("seq", 0),
                    "tokens": tokens,
                },
            )
        if m["session"] not in self.sessions:
            return error_reply(None, ErrorCode.UNKNOWN_SESSION, "not open")
        if kind == "close":
            del self.sessions[m["session"]]
            return ok_reply(None, {})
        self.sessions[m["session"]] = m["seq"]
        result: dict[str, Any] = {"seq": m["seq"], "tokens": 1}
        if kind == "step" and m.get("act", True):
            # actions name the replica (its index) and the step: a test sees who answered
            result["actions"] = np.full((HORIZON, ACTION_DIM), 100 * self.index + m["seq"], np.float32)
        if kind == "reset":
            result = {"seed": m.get("seed", 7), "seq": m["seq"]}
        return ok_reply(None, result)

    @property
    def index(self) -> int:
        return int(self.replica.id.rsplit("-", 1)[1])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._socket.close(linger=0)
