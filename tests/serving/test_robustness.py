"""Bad input gets an error reply with the right code; the daemon keeps serving; other sessions are untouched."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from serving_helpers import (
    MAX_TOKENS,
    TIMEOUT,
    RawPeer,
    RecordingPatience,
    assert_same_actions,
    error_code,
    make_script,
    reference_run,
    start_daemon,
)

from streamtx_client import Client
from streamtx_client.protocol import ARRAY_EXT, encode

OBS_DIM = 4  # the random checkpoint's


def _step(session: str, obs: Any, **extra: Any) -> bytes:
    fields = {"token": f"token-{session}", "seq": 1, **extra}  # RawPeer's token for the session; its next seq
    return encode({"v": 2, "id": 5, "kind": "step", "session": session, "obs": obs, **fields})


def _raw_array(dtype: str, shape: list[int], raw: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(ARRAY_EXT, msgpack.packb([dtype, shape, raw]))


def _ok_obs(n: int = 1) -> np.ndarray:
    return np.ones((n, OBS_DIM), np.float32)


# name -> (frames for an open session id, expected code)
BAD_INPUT: dict[str, tuple[Callable[[str], list[bytes]], str]] = {
    "garbage bytes": (lambda s: [b"\x00\xffnot msgpack at all"], "bad_message"),
    "empty frame": (lambda s: [b""], "bad_message"),
    "truncated msgpack": (lambda s: [_step(s, _ok_obs())[:-7]], "bad_message"),
    "not a map": (lambda s: [msgpack.packb(["step", s])], "bad_message"),
    "two frames": (lambda s: [b"a", b"b"], "bad_message"),
    "wrong version": (lambda s: [encode({"v": 99, "id": 5, "kind": "hello"})], "unsupported_version"),
    "wrong kind": (lambda s: [encode({"v": 2, "id": 5, "kind": "explode"})], "unknown_kind"),
    "unknown field": (
        lambda s: [encode({"v": 2, "id": 5, "kind": "close", "session": s, "token": f"token-{s}", "force": True})],
        "bad_argument",
    ),
    "obs not an array": (lambda s: [_step(s, [1.0, 2.0, 3.0, 4.0])], "bad_argument"),
    "wrong shape": (lambda s: [_step(s, np.ones((1, OBS_DIM + 1), np.float32))], "bad_shape"),
    "wrong rank": (lambda s: [_step(s, np.ones((1, 1, OBS_DIM), np.float32))], "bad_shape"),
    "integer dtype": (lambda s: [_step(s, np.ones((1, OBS_DIM), np.int32))], "bad_dtype"),
    "object dtype": (
        lambda s: [
            msgpack.packb(
                {
                    "v": 2,
                    "id": 5,
                    "kind": "step",
                    "session": s,
                    "token": "t",
                    "seq": 1,
                    "obs": _raw_array("|O", [1, OBS_DIM], b"\0" * 32),
                }
            )
        ],
        "bad_dtype",
    ),
    "bytes disagree with shape": (
        lambda s: [
            msgpack.packb(
                {
                    "v": 2,
                    "id": 5,
                    "kind": "step",
                    "session": s,
                    "token": "t",
                    "seq": 1,
                    "obs": _raw_array("<f4", [1, OBS_DIM], b"\0" * 12),
                }
            )
        ],
        "bad_message",
    ),
    "NaN": (lambda s: [_step(s, np.array([[0.0, np.nan, 0.0, 0.0]], np.float32))], "non_finite"),
    # finite in float64, infinite after the cast to the model's float32: checked after the cast
    "huge float64": (lambda s: [_step(s, np.array([[1e300, 0.0, 0.0, 0.0]], np.float64))], "non_finite"),
    "over the magnitude limit": (lambda s: [_step(s, np.array([[1e30, 0.0, 0.0, 0.0]], np.float32))], "non_finite"),
    "Inf": (lambda s: [_step(s, np.array([[np.inf, 0.0, 0.0, 0.0]], np.float64))], "non_finite"),
    "too many tokens": (lambda s: [_step(s, _ok_obs(MAX_TOKENS + 1))], "too_many_tokens"),
    "array too large": (lambda s: [_step(s, np.ones((1, 5000), np.float32))], "array_too_large"),
    "message too large": (
        lambda s: [encode({"v": 2, "id": 5, "kind": "hello", "pad": b"x" * 70_000})],
        "message_too_large",
    ),
    "unknown session": (lambda s: [_step("no-such-session", _ok_obs())], "unknown_session"),
    "bad seed": (
        lambda s: [
            encode({"v": 2, "id": 5, "kind": "reset", "session": s, "token": f"token-{s}", "seq": 1, "seed": "7"})
        ],
        "bad_argument",
    ),
}


@pytest.fixture(scope="module")
def victim(daemon) -> str:
    """An open session that the bad requests name."""
    session = f"victim-{uuid.uuid4().hex}"
    with RawPeer(daemon.endpoints[0]) as peer:
        assert peer.request("open", session=session, seed=0)["ok"]
    return session


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_gets_an_error_reply_and_the_daemon_keeps_serving(daemon, victim: str, name: str) -> None:
    frames, code = BAD_INPUT[name]
    with RawPeer(daemon.endpoints[0]) as peer:
        peer.send(*frames(victim))
        reply = peer.recv()
        assert error_code(reply) == code
        assert reply["id"] in (5, None)
        assert peer.request("hello")["ok"]


def test_bad_input_leaves_other_sessions_unchanged(daemon, policy, victim: str) -> None:
    script = make_script(np.random.default_rng(4), len(BAD_INPUT), OBS_DIM, MAX_TOKENS)
    got = []
    with (
        Client(daemon.endpoints[1], timeout=20.0, retries=0) as client,
        client.open(seed=21) as canary,
        RawPeer(daemon.endpoints[0]) as attacker,
    ):
        for (obs, _), (frames, code) in zip(script, BAD_INPUT.values()):
            attacker.send(*frames(victim))
            got.append(canary.step(obs))
            assert error_code(attacker.recv()) == code
    assert_same_actions(got, reference_run(policy, 21, script))


def test_closed_and_unknown_sessions(daemon) -> None:
    with RawPeer(daemon.endpoints[0]) as peer:
        assert peer.request("open", session="short-lived")["ok"]
        assert peer.request("close", session="short-lived")["ok"]
        assert error_code(peer.request("step", session="short-lived", obs=_ok_obs())) == "unknown_session"
        assert error_code(peer.request("reset", session="short-lived")) == "unknown_session"
        assert error_code(peer.request("close", session="short-lived")) == "unknown_session"


def test_session_limit(daemon) -> None:
    opened = []
    with RawPeer(daemon.endpoints[0]) as peer:
        try:
            for i in range(25):  # the daemon admits 24
                reply = peer.request("open", session=f"fill-{i}")
                if not reply["ok"]:
                    break
                opened.append(f"fill-{i}")
            assert error_code(reply) == "full"
        finally:
            for session in opened:
                assert peer.request("close", session=session)["ok"]
        assert peer.request("open", session="after-fill")["ok"]  # a freed slot is reused
        assert peer.request("close", session="after-fill")["ok"]


def test_req_sockets_with_an_empty_delimiter_are_served(daemon) -> None:
    with RawPeer(daemon.endpoints[0]) as peer:
        peer.send(b"", encode({"v": 2, "id": 9, "kind": "hello"}))
        delimiter, body = peer.socket.recv_multipart() if peer.socket.poll(20_000) else pytest.fail("no reply")
        assert delimiter == b"" and msgpack.unpackb(body)["id"] == 9


def test_a_client_that_disconnects_mid_request(daemon, policy) -> None:
    obs = make_script(np.random.default_rng(5), 2, OBS_DIM)
    session = f"mid-{uuid.uuid4().hex}"
    with RawPeer(daemon.endpoints[0]) as peer:
        assert peer.request("open", session=session, seed=8)["ok"]
    gone = RawPeer(daemon.endpoints[0])
    gone.send_request("step", session=session, obs=obs[0][0])
    gone.socket.close(linger=2000)  # sent, then gone before the reply: the daemon must shrug it off
    with RawPeer(daemon.endpoints[0]) as peer:
        # the orphan travelled on another connection: wait until the daemon applied it (each resync is a round trip)
        deadline = time.monotonic() + TIMEOUT
        while peer.request("resync", session=session)["result"]["seq"] < 1:
            assert time.monotonic() < deadline, "the orphaned step never reached the daemon"
        reply = peer.request("step", session=session, obs=obs[1][0], seq=2)  # seq 1 went with the orphan
        assert reply["ok"] and reply["result"]["tokens"] == 2  # the orphaned step did enter the state, in order
        assert peer.request("close", session=session)["ok"]
    assert_same_actions([reply["result"]["actions"]], reference_run(policy, 8, obs)[1:])


def test_daemon_restart_client_reconnects_and_replays(checkpoint: Path, policy, tmp_path: Path) -> None:
    """A crash (SIGKILL) mid-stream; the daemon comes back on the same endpoint; the client re-opens its session
    with its seed and step count and replays the receptive field: its actions continue as if nothing happened."""
    binds = (f"ipc://{tmp_path}/restart.ipc",)
    daemon = start_daemon(checkpoint, tmp_path, binds=binds)
    script = make_script(np.random.default_rng(6), 26, OBS_DIM, MAX_TOKENS, observe_every=4)
    crash_at = 20  # more tokens than the receptive field already seen
    restarter = None
    try:
        patience = RecordingPatience(attempt_timeout=1.0, total=120.0)
        with Client(binds[0], patience=patience) as client, client.open(seed=13) as session:
            got = [session.step(obs) if act else session.observe(obs) for obs, act in script[:crash_at]]
            daemon.kill()
            patience.retried.clear()  # a retry before the crash (a slow reply on a busy machine) does not count
            # back once the client's next step has timed out, then the client recovers
            restarter = threading.Thread(target=lambda: (patience.retried.wait(TIMEOUT), daemon.start()))
            restarter.start()
            got += [session.step(obs) if act else session.observe(obs) for obs, act in script[crash_at:]]
    finally:
        if restarter is not None:
            restarter.join()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert_same_actions(got, reference_run(policy, 13, script))
    # the second daemon saw the session re-opened with the step count reached before the crash
    acted = sum(act for _, act in script[:crash_at])
    reopened = [json.loads(line) for line in daemon.log_tail(200).splitlines() if '"session_opened"' in line]
    assert reopened[-1]["steps"] == acted > 0
