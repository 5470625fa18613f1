"""Request checking: every field is checked, each violation names the field and carries the right code."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from streamtx_client.errors import ErrorCode, ProtocolError
from streamtx_server.requests import Open, Step, parse_request

OBS_DIM, MAX_TOKENS = 4, 3


def parse(**message: Any):
    return parse_request({"v": 2, "id": 7, **message}, obs_dim=OBS_DIM, max_tokens=MAX_TOKENS)


def test_a_single_token_becomes_a_one_token_step() -> None:
    step = parse(kind="step", session="s", token="t", seq=1, obs=np.ones(OBS_DIM, np.float32))
    assert isinstance(step, Step) and step.obs.shape == (1, OBS_DIM) and step.act


def test_steps_at_the_limits_are_accepted_with_their_fields() -> None:
    """The inline fast accept and the per-field checks agree on what a step is (the limits are inclusive)."""
    tokens = np.ones((MAX_TOKENS, OBS_DIM), np.float16)
    step = parse(kind="step", session="s" * 128, token="t" * 128, seq=2**63 - 1, obs=tokens, act=False)
    assert step == Step(7, "s" * 128, "t" * 128, 2**63 - 1, tokens, False)
    assert parse(kind="step", session="s", token="t", seq=0, obs=np.ones(OBS_DIM)).obs.shape == (1, OBS_DIM)


def test_an_unknown_field_in_place_of_a_missing_one_is_refused() -> None:
    """The fast accept counts keys; a misspelt field (as many keys as a right step) must still be refused."""
    step = {"v": 2, "id": 7, "kind": "step", "session": "s", "token": "t", "obs": np.ones(OBS_DIM, np.float32)}
    for extra in ({"sequence": 1}, {"seq": 1, "act": True, "timing": True}):
        with pytest.raises(ProtocolError) as info:
            parse_request({**step, **extra}, obs_dim=OBS_DIM, max_tokens=MAX_TOKENS)
        assert info.value.code is ErrorCode.BAD_ARGUMENT
        assert ("sequence" if "sequence" in extra else "timing") in info.value.message


def test_open_defaults() -> None:
    assert parse(kind="open") == Open(7, None, None, 0, None, False, 0, None)
    assert parse(kind="open", session="a", seed=3, steps=5, token="t") == Open(7, "a", 3, 5, "t", False, 0, None)


def test_a_deeply_nested_value_gets_bad_argument_not_a_recursion() -> None:
    nested: Any = 1
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ProtocolError) as info:
        parse(kind="open", session=nested)
    assert info.value.code is ErrorCode.BAD_ARGUMENT and "session" in info.value.message


@pytest.mark.parametrize(
    "message, code, names",
    [
        ({"kind": "hello", "v": 1}, ErrorCode.UNSUPPORTED_VERSION, "v"),
        ({"kind": "hello", "id": "7"}, ErrorCode.BAD_MESSAGE, "id"),
        ({"kind": "hello", "id": True}, ErrorCode.BAD_MESSAGE, "id"),
        ({"kind": "dance"}, ErrorCode.UNKNOWN_KIND, "kind"),
        ({"kind": ["step"]}, ErrorCode.UNKNOWN_KIND, "kind"),
        ({"kind": "hello", "extra": 1}, ErrorCode.BAD_ARGUMENT, "extra"),
        ({"kind": "step", "session": "s"}, ErrorCode.BAD_MESSAGE, "obs"),
        ({"kind": "step", "session": "", "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "session"),
        ({"kind": "step", "session": 5, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "session"),
        ({"kind": "step", "session": "x" * 129, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "session"),
        ({"kind": "step", "session": "s", "obs": [1.0, 2.0, 3.0, 4.0]}, ErrorCode.BAD_ARGUMENT, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones(4, np.int32)}, ErrorCode.BAD_DTYPE, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones(4, bool)}, ErrorCode.BAD_DTYPE, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones(5)}, ErrorCode.BAD_SHAPE, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones((2, 2, 4))}, ErrorCode.BAD_SHAPE, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones((0, 4))}, ErrorCode.BAD_SHAPE, "obs"),
        ({"kind": "step", "session": "s", "obs": np.ones((4, 4))}, ErrorCode.TOO_MANY_TOKENS, "obs"),
        ({"kind": "step", "session": "s", "seq": -1, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "seq"),
        ({"kind": "step", "session": "s", "token": "", "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "token"),
        ({"kind": "step", "session": "s", "obs": np.ones(4), "act": 1}, ErrorCode.BAD_ARGUMENT, "act"),
        ({"kind": "step", "session": "s", "obs": np.ones(4), "act": None}, ErrorCode.BAD_ARGUMENT, "act"),
        ({"kind": "step", "session": "s", "seq": True, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "seq"),
        ({"kind": "step", "session": "s", "seq": 2**63, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "seq"),
        ({"kind": "step", "session": "s", "token": "t" * 129, "obs": np.ones(4)}, ErrorCode.BAD_ARGUMENT, "token"),
        ({"kind": "step", "v": 3, "session": "s", "obs": np.ones(4)}, ErrorCode.UNSUPPORTED_VERSION, "v"),
        ({"kind": "step", "id": "7", "session": "s", "obs": np.ones(4)}, ErrorCode.BAD_MESSAGE, "id"),
        ({"kind": "step", "session": "s", "obs": np.ones(4), "timing": True}, ErrorCode.BAD_ARGUMENT, "timing"),
        ({"kind": "open", "seed": -1}, ErrorCode.BAD_ARGUMENT, "seed"),
        ({"kind": "open", "seed": 1.5}, ErrorCode.BAD_ARGUMENT, "seed"),
        ({"kind": "open", "seed": 2**63}, ErrorCode.BAD_ARGUMENT, "seed"),
        ({"kind": "open", "steps": -2}, ErrorCode.BAD_ARGUMENT, "steps"),
        ({"kind": "reset"}, ErrorCode.BAD_MESSAGE, "session"),
        ({"kind": "close", "session": None}, ErrorCode.BAD_ARGUMENT, "session"),
    ],
)
def test_bad_requests_name_the_field(message: dict[str, Any], code: ErrorCode, names: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request({"v": 2, "id": 7, "token": "t", "seq": 1, **message}, obs_dim=OBS_DIM, max_tokens=MAX_TOKENS)
    assert info.value.code is code
    assert names in info.value.message


def test_replay_acts_are_one_bool_per_replayed_token() -> None:
    replay = np.ones((3, OBS_DIM), np.float32)
    opened = parse(kind="open", steps=2, replay=replay, replay_acts=[False, True, True])
    assert isinstance(opened, Open) and opened.replay_acts == (False, True, True)
    assert parse(kind="open", replay=replay).replay_acts is None


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"replay_acts": [True]}, "without a replay"),
        ({"replay": np.ones((2, OBS_DIM), np.float32), "replay_acts": [True]}, "list of 2 bools"),
        ({"replay": np.ones((2, OBS_DIM), np.float32), "replay_acts": [1, 0]}, "expected a bool"),
        ({"replay": np.ones((2, OBS_DIM), np.float32), "replay_acts": [True, True], "steps": 1}, "steps=1"),
    ],
)
def test_bad_replay_acts_are_refused_by_name(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(kind="open", **fields)
    assert info.value.code is ErrorCode.BAD_ARGUMENT and "replay_acts" in info.value.message
    assert words in info.value.message
