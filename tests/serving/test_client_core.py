"""Client logic without sockets: retry, reconnect, and session restore (re-open + replay of the receptive field)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamtx_client.core import RECONNECT, ServerInfo, SessionLog, call, step_flow
from streamtx_client.errors import RequestTimeout, ServerError
from streamtx_client.protocol import ok_reply, request

INFO = ServerInfo(
    obs_dim=2,
    action_dim=1,
    horizon=3,
    cond_window=2,
    replay_window=5,
    max_tokens_per_step=2,
    max_message_bytes=1 << 20,
    raw={},
)


def drive(flow, respond: Callable[[Any], dict[str, Any]]) -> tuple[Any, list[Any]]:
    """Run a flow against ``respond`` (which may raise RequestTimeout); returns its result and the commands."""
    commands, outcome, resume = [], None, flow.send
    while True:
        try:
            command = resume(outcome)
        except StopIteration as stop:
            return stop.value, commands
        commands.append(command)
        try:
            outcome, resume = (None if command is RECONNECT else respond(command)), flow.send
        except RequestTimeout as exc:
            outcome, resume = exc, flow.throw


def error(code: str) -> dict[str, Any]:
    return {"v": 1, "id": None, "ok": False, "error": {"code": code, "message": "m"}}


def test_a_timeout_reconnects_and_retries() -> None:
    replies = iter([RequestTimeout("lost"), ok_reply(1, {"x": 1})])

    def respond(_: Any) -> dict[str, Any]:
        reply = next(replies)
        if isinstance(reply, Exception):
            raise reply
        return reply

    result, commands = drive(call(request("hello"), retries=1), respond)
    assert result == {"x": 1}
    assert [c if c is RECONNECT else c["kind"] for c in commands] == ["hello", RECONNECT, "hello"]


def test_retries_run_out() -> None:
    def respond(_: Any) -> dict[str, Any]:
        raise RequestTimeout("down")

    with pytest.raises(RequestTimeout):
        drive(call(request("hello"), retries=2), respond)


def test_other_errors_are_not_retried() -> None:
    sent = []

    def respond(command: Any) -> dict[str, Any]:
        sent.append(command)
        return error("bad_shape")

    with pytest.raises(ServerError) as info:
        drive(call(request("hello"), retries=3), respond)
    assert info.value.code == "bad_shape" and len(sent) == 1


def test_unknown_session_restores_the_session_then_retries() -> None:
    log = SessionLog("s1", seed=11, window=INFO.replay_window, max_tokens_per_step=INFO.max_tokens_per_step)
    history = np.arange(14, dtype=np.float32).reshape(7, 2)  # 7 tokens, 5 of them in the replay window
    log.record(history[:3], act=True)
    log.record(history[3:], act=True)
    restarted = {"done": False}

    def respond(command: dict[str, Any]) -> dict[str, Any]:
        if command["kind"] == "open":
            restarted["done"] = True
            return ok_reply(None, {"session": "s1", "seed": 11})
        if not restarted["done"]:
            return error("unknown_session")
        return ok_reply(None, {"actions": np.zeros((3, 1), np.float32) if command["act"] else None})

    new = np.array([[100.0, 101.0]], np.float32)
    actions, commands = drive(step_flow(log, INFO, new, True, retries=2), respond)
    assert actions.shape == (3, 1)
    kinds = [c["kind"] for c in commands]
    assert kinds == ["step", "open", "step", "step", "step", "step"]
    assert commands[1]["seed"] == 11 and commands[1]["steps"] == 2  # the noise sequence continues
    replay = commands[2:5]
    assert all(c["act"] is False for c in replay)
    assert [len(c["obs"]) for c in replay] == [2, 2, 1]  # chunks of at most max_tokens_per_step
    np.testing.assert_array_equal(np.concatenate([c["obs"] for c in replay]), history[-5:])
    np.testing.assert_array_equal(commands[5]["obs"], new)
    assert log.steps == 3  # the retried step counted once


def test_a_superseded_step_records_its_tokens_but_no_control_step() -> None:
    log = SessionLog("s", seed=0, window=5, max_tokens_per_step=2)
    out, _ = drive(
        step_flow(log, INFO, np.ones(2, np.float32), True, retries=0),
        lambda c: ok_reply(None, {"actions": None, "superseded": True}),
    )
    assert out is None and log.steps == 0 and len(log.restore_requests()) == 2  # open + one replay chunk


def test_a_malformed_action_chunk_is_an_error_not_a_result() -> None:
    log = SessionLog("s", seed=0, window=5, max_tokens_per_step=2)
    with pytest.raises(ServerError, match="actions of shape"):
        drive(
            step_flow(log, INFO, np.ones(2, np.float32), True, retries=0),
            lambda c: ok_reply(None, {"actions": np.zeros((2, 1))}),
        )


@pytest.mark.parametrize(
    "obs, exc",
    [
        (np.ones(3, np.float32), ValueError),
        (np.ones((1, 1, 2)), ValueError),
        (np.ones(2, np.int64), TypeError),
        (np.ones((0, 2)), ValueError),
    ],
)
def test_observations_are_checked_before_sending(obs: np.ndarray, exc: type) -> None:
    log = SessionLog("s", seed=0, window=5, max_tokens_per_step=2)
    with pytest.raises(exc, match="obs"):
        drive(step_flow(log, INFO, obs, True, retries=0), lambda c: pytest.fail("sent"))
