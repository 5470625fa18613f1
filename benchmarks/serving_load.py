"""Child processes for ``bench_server.py``: a zero-cost policy behind the real daemon, a bare ZeroMQ + msgpack echo,
and two misbehaving clients (a pipeliner and a flooder). None imports torch, so each starts in a fraction of a
second and costs its core nothing but what it measures.

    python benchmarks/serving_load.py zero-daemon --obs-dim 8 --action-dim 6 --horizon 8 -- <streamtx serve flags>
    python benchmarks/serving_load.py echo ENDPOINT --action-dim 6 --horizon 8
    python benchmarks/serving_load.py pipeline ENDPOINT --obs-dim 8 --burst 256
    python benchmarks/serving_load.py flood ENDPOINT --obs-dim 8 --requests 10000

``pipeline`` and ``flood`` open a session, print ``ready``, wait for a line on stdin before they start, and on the
next line (or EOF) stop and print one JSON line: the replies they read, by error code (``ok`` for successes).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from streamtx_client.protocol import decode, encode, request
from streamtx_client.transport import frame_request
from streamtx_server import cli as server_cli

__all__ = ["ZeroPolicy", "StepClient", "main"]


class ZeroPolicy:
    """A :class:`~streamtx_client.policy.BatchPolicy` that returns constant (zero) action chunks at once: served by
    the real daemon, a round trip then holds only what serving costs (transport, codec, checks, batching)."""

    max_tokens_per_step = 4
    receptive_field = 1
    dtype = np.dtype(np.float32)

    def __init__(self, obs_dim: int, action_dim: int, horizon: int) -> None:
        self.obs_dim, self.action_dim, self.horizon = obs_dim, action_dim, horizon
        self._chunks = np.zeros((0, horizon, action_dim), np.float32)

    def metadata(self) -> dict[str, Any]:
        return {"model": type(self).__name__}

    def init_state(self, batch_size: int) -> None:
        self._chunks = np.zeros((batch_size, self.horizon, self.action_dim), np.float32)

    def reset(self, state: None, rows: np.ndarray, seeds: np.ndarray, steps: np.ndarray) -> None:
        pass

    def observe(self, state: None, obs: np.ndarray, rows: np.ndarray) -> None:
        pass

    def act(self, state: None, rows: np.ndarray) -> np.ndarray:
        return self._chunks[: len(rows)]


class StepClient:
    """A bare DEALER speaking protocol v2 by hand (no SDK): one session's steps with any number in flight."""

    def __init__(self, endpoint: str, context: zmq.Context[Any] | None = None) -> None:
        self.socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.rcvhwm = self.socket.sndhwm = 0  # a flood is only a flood if nothing is dropped on our side
        self.socket.connect(endpoint)
        self.ids = 0
        self.session = uuid.uuid4().hex
        self.token = uuid.uuid4().hex

    def send(self, kind: str, **fields: Any) -> int:
        self.ids += 1
        self.socket.send(frame_request(request(kind, **fields), self.ids, None))
        return self.ids

    def recv(self, timeout_ms: int) -> dict[str, Any] | None:
        if not self.socket.poll(timeout_ms):
            return None
        return decode(self.socket.recv())

    def call(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One request of this session, answered within 30 s, else RuntimeError."""
        self.send(kind, session=self.session, token=self.token, **fields)
        reply = self.recv(30_000)
        if reply is None or not reply["ok"]:
            raise RuntimeError(f"{kind} failed: {reply}")
        return reply

    def open(self) -> None:
        self.call("open", seed=0)

    def close_session(self) -> None:
        self.call("close")

    def step(self, seq: int, obs: np.ndarray) -> int:
        return self.send("step", session=self.session, token=self.token, seq=seq, obs=obs)

    def close(self) -> None:
        self.socket.close()


def _code(reply: dict[str, Any]) -> str:
    return "ok" if reply["ok"] else str(reply["error"]["code"])


def _wait_for_go(client: StepClient) -> zmq.Poller:
    print("ready", flush=True)
    sys.stdin.readline()
    stop = zmq.Poller()
    stop.register(sys.stdin.fileno(), zmq.POLLIN)
    return stop


def run_pipeline(endpoint: str, obs_dim: int, burst: int) -> dict[str, Any]:
    """Bursts of ``burst`` steps with consecutive sequence numbers, then all their replies, until told to stop;
    the next burst starts after the last applied step (what a client that ignores ``busy`` does)."""
    client = StepClient(endpoint)
    client.open()
    obs = np.ones(obs_dim, np.float32)
    stop = _wait_for_go(client)
    codes: Counter[str] = Counter()
    applied = bursts = 0
    while not stop.poll(0):
        for seq in range(applied + 1, applied + burst + 1):
            client.step(seq, obs)
        for _ in range(burst):
            reply = client.recv(30_000)
            if reply is None:
                codes["timeout"] += 1
                break
            codes[_code(reply)] += 1
            if reply["ok"]:
                applied = max(applied, int(reply["result"]["seq"]))
        bursts += 1
    client.close()
    return {"replies": dict(codes), "bursts": bursts, "applied": applied}


def run_flood(endpoint: str, obs_dim: int, requests: int) -> dict[str, Any]:
    """``requests`` steps as fast as the socket takes them, none read until told to stop; then read what came."""
    client = StepClient(endpoint)
    client.open()
    obs = np.ones(obs_dim, np.float32)
    stop = _wait_for_go(client)
    for seq in range(1, requests + 1):
        client.step(seq, obs)
    stop.poll()
    codes: Counter[str] = Counter()
    while (reply := client.recv(200)) is not None:
        codes[_code(reply)] += 1
    client.close()
    return {"sent": requests, "replies": dict(codes)}


def run_echo(endpoint: str, action_dim: int, horizon: int) -> None:
    """A bare ROUTER and msgpack, nothing of streamtx on the request path: unpack each request (its array stays an
    extension, unparsed), pack a reply of the daemon's shape and size (the actions extension built once), forever."""
    actions = msgpack.unpackb(encode({"actions": np.zeros((horizon, action_dim), np.float32)}))["actions"]
    packer = msgpack.Packer(use_bin_type=True)
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(endpoint)
    print(json.dumps({"event": "listening", "endpoints": [router.getsockopt_string(zmq.LAST_ENDPOINT)]}), flush=True)
    while True:
        peer, body = router.recv_multipart()
        message = msgpack.unpackb(body)
        seq = message.get("seq", 0)
        result = {
            "seq": seq,
            "tokens": seq,
            "timing": {"queue_s": 0.0, "model_s": 0.0, "batch": 1},
            "actions": actions,
            "superseded": False,
        }
        reply = {"v": message["v"], "id": message["id"], "ok": True, "result": result}
        router.send_multipart([peer, packer.pack(reply)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    zero = sub.add_parser("zero-daemon", help="the real daemon serving ZeroPolicy (pass serve flags after --)")
    echo = sub.add_parser("echo", help="a bare ZeroMQ ROUTER + msgpack echo")
    pipe = sub.add_parser("pipeline", help="a session pipelining bursts of steps")
    flood = sub.add_parser("flood", help="a session sending steps without reading replies")
    for q in (zero, echo):
        q.add_argument("--action-dim", type=int, required=True)
        q.add_argument("--horizon", type=int, required=True)
    zero.add_argument("--obs-dim", type=int, required=True)
    zero.add_argument("serve_args", nargs=argparse.REMAINDER)
    echo.add_argument("endpoint")
    for q in (pipe, flood):
        q.add_argument("endpoint")
        q.add_argument("--obs-dim", type=int, required=True)
    pipe.add_argument("--burst", type=int, default=256)
    flood.add_argument("--requests", type=int, default=10_000)
    args = p.parse_args(argv)
    if args.command == "zero-daemon":
        policy = ZeroPolicy(args.obs_dim, args.action_dim, args.horizon)
        serve_args = [a for a in args.serve_args if a != "--"]
        # serve requires --checkpoint; the zero policy loads nothing from it
        return server_cli.serve_main([f"--checkpoint={Path(__file__)}", *serve_args], lambda *_: policy)
    if args.command == "echo":
        run_echo(args.endpoint, args.action_dim, args.horizon)
        return 0
    if args.command == "pipeline":
        result = run_pipeline(args.endpoint, args.obs_dim, args.burst)
    else:
        result = run_flood(args.endpoint, args.obs_dim, args.requests)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
