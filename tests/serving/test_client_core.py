"""Client logic without sockets: retry with backoff, exactly-once sequence numbers, session restore in one request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from streamtx_client.core import Patience, ServerInfo, SessionLog, Sleep, call, open_flow, step_flow
from streamtx_client.errors import ErrorCode, RequestTimeout, ServerError
from streamtx_client.protocol import error_reply, ok_reply, request

INFO = ServerInfo(
    obs_dim=2, action_dim=1, horizon=3, replay_window=5, max_tokens_per_step=2, max_message_bytes=1 << 20, raw={}
)
QUICK = Patience(attempt_timeout=0.01, total=60.0, backoff=0.0)  # no real waiting: the flows only yield Sleep


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
            outcome, resume = (None if isinstance(command, Sleep) else respond(command)), flow.send
        except RequestTimeout as exc:
            outcome, resume = exc, flow.throw


def scripted(replies: list[Any]) -> Callable[[Any], dict[str, Any]]:
    it: Iterator[Any] = iter(replies)

    def respond(_: Any) -> dict[str, Any]:
        reply = next(it)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return respond


def kinds(commands: list[Any]) -> list[str]:
    return ["sleep" if isinstance(c, Sleep) else c["kind"] for c in commands]


def test_a_timeout_backs_off_and_retries() -> None:
    result, commands = drive(
        call(request("hello"), patience=QUICK, what="hello", endpoint="e"),
        scripted([RequestTimeout("lost"), ok_reply(1, {"x": 1})]),
    )
    assert result == {"x": 1} and kinds(commands) == ["hello", "sleep", "hello"]


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    patience = Patience(backoff=0.1, max_backoff=1.0, jitter=0.5)
    delays = [patience.delay(k) for k in range(1, 8)]
    assert all(0.05 <= d <= 0.1 for d in delays[:1]) and all(0.5 <= d <= 1.0 for d in delays[4:])
    assert Patience().total >= 20.0  # the default covers a daemon restart


def test_giving_up_names_the_call_the_endpoint_and_the_time_waited() -> None:
    with pytest.raises(RequestTimeout, match=r"session 's': step: no reply from tcp://x:1 in .* s \(3 attempts"):
        drive(
            call(
                request("hello"),
                patience=Patience(retries=2, backoff=0),
                what="session 's': step",
                endpoint="tcp://x:1",
            ),
            scripted([RequestTimeout("a")] * 3),
        )


def test_busy_is_retried_with_the_same_sequence_number() -> None:
    log = SessionLog("s", "tok", seed=1, window=5)
    chunk = np.zeros((3, 1), np.float32)
    busy = error_reply(1, ErrorCode.BUSY, "slow down")
    _, commands = drive(
        step_flow(log, INFO, np.ones(2, np.float32), True, QUICK, "e"),
        scripted([busy, ok_reply(2, {"actions": chunk, "seq": 1})]),
    )
    steps = [c for c in commands if not isinstance(c, Sleep)]
    assert [c["seq"] for c in steps] == [1, 1] and all(c["token"] == "tok" for c in steps)
    assert log.seq == 1


def test_an_unknown_session_is_restored_in_one_request_then_the_step_retried_with_its_seq() -> None:
    log = SessionLog("s", "tok", seed=9, window=5)
    for t in range(7):  # more tokens than the window keeps
        log.record(t + 1, np.full((1, 2), float(t), np.float32), acted=t % 2 == 0)
    chunk = np.zeros((3, 1), np.float32)
    replies = [error_reply(1, ErrorCode.UNKNOWN_SESSION, "restarted"), ok_reply(2, {}), ok_reply(3, {"actions": chunk})]
    actions, commands = drive(step_flow(log, INFO, np.ones(2, np.float32), True, QUICK, "e"), scripted(replies))
    assert actions is chunk
    step, _, restore, retry = commands
    assert restore["kind"] == "open" and restore["token"] == "tok" and restore["seed"] == 9
    assert restore["steps"] == 4 and restore["seq"] == 7
    np.testing.assert_array_equal(restore["replay"][:, 0], [2, 3, 4, 5, 6])  # the last 5 tokens, in order
    assert step["seq"] == retry["seq"] == 8


def test_errors_that_retrying_cannot_fix_are_raised_at_once() -> None:
    log = SessionLog("s", "tok", seed=1, window=5)
    with pytest.raises(ServerError, match="bad_shape"):
        drive(
            step_flow(log, INFO, np.ones(2, np.float32), True, QUICK, "e"),
            scripted([error_reply(1, ErrorCode.BAD_SHAPE, "no")]),
        )


def test_a_seed_that_cannot_go_on_the_wire_is_refused_locally() -> None:
    with pytest.raises(ValueError, match="seed"):
        drive(open_flow(INFO, "s", 2**70, False, QUICK, "e"), lambda c: pytest.fail("sent"))
