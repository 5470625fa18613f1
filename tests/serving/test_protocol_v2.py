"""Protocol v2 against the real daemon: exactly-once steps, owned sessions, resync, backpressure, version refusal."""

from __future__ import annotations

import uuid

import numpy as np
from serving_helpers import RawPeer, error_code

OBS_DIM = 4  # the random checkpoint's


def _obs(value: float = 0.1) -> np.ndarray:
    return np.full((1, OBS_DIM), value, np.float32)


def test_a_retried_step_is_answered_from_its_reply_and_never_applied_twice(daemon) -> None:
    session = f"once-{uuid.uuid4().hex}"
    with RawPeer(daemon.endpoints[0]) as peer:
        assert peer.request("open", session=session, seed=3)["ok"]
        first = peer.request("step", session=session, obs=_obs(), seq=1)["result"]
        again = peer.request("step", session=session, obs=_obs(), seq=1)["result"]  # the reply was "lost"
        assert again["tokens"] == first["tokens"] == 1
        np.testing.assert_array_equal(again["actions"], first["actions"])
        held = peer.request("resync", session=session)["result"]
        assert held["seq"] == 1 and held["tokens"] == 1
        assert error_code(peer.request("step", session=session, obs=_obs(), seq=5)) == "out_of_order"
        assert peer.request("step", session=session, obs=_obs(), seq=2)["result"]["tokens"] == 2


def test_a_second_open_of_a_live_session_is_refused_unless_it_carries_the_token(daemon) -> None:
    session = f"owned-{uuid.uuid4().hex}"
    with RawPeer(daemon.endpoints[0]) as owner, RawPeer(daemon.endpoints[0]) as other:
        assert owner.request("open", session=session, seed=1, token="mine")["ok"]
        owner.tokens[session] = "mine"
        assert owner.request("step", session=session, obs=_obs())["ok"]
        assert error_code(other.request("open", session=session, token="theirs")) == "not_owner"
        assert error_code(other.request("step", session=session, obs=_obs(), token="theirs", seq=2)) == "not_owner"
        assert owner.request("resync", session=session)["result"]["tokens"] == 1  # untouched by the refusals
        taken = other.request("open", session=session, token="theirs", takeover=True)["result"]
        assert taken["token"] == "theirs"
        assert error_code(owner.request("step", session=session, obs=_obs())) == "not_owner"


def test_a_v1_client_gets_one_clear_unsupported_version_in_its_own_frame(daemon) -> None:
    with RawPeer(daemon.endpoints[0]) as v1:
        reply = v1.request("hello", version=1)
    assert reply["v"] == 1 and error_code(reply) == "unsupported_version"
    assert "protocol 2" in reply["error"]["message"]


def test_a_flooding_session_is_answered_busy_and_others_are_unaffected(daemon) -> None:
    session = f"flood-{uuid.uuid4().hex}"
    with RawPeer(daemon.endpoints[0]) as flooder, RawPeer(daemon.endpoints[0]) as victim:
        assert flooder.request("open", session=session, seed=1)["ok"]
        ids = [flooder.send_request("step", session=session, obs=_obs()) for _ in range(200)]
        assert victim.request("hello")["ok"]  # a control request is answered without waiting for the flood
        replies = [flooder.recv() for _ in ids]
        codes = [r["error"]["code"] for r in replies if not r["ok"]]
        assert codes and set(codes) <= {"busy", "out_of_order"}  # busy, then the gaps it left
        assert flooder.request("close", session=session)["ok"]
