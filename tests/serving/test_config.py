"""Daemon configuration errors name the argument."""

from __future__ import annotations

import pytest

from streamtx.apps.served_policy import TorchBatchPolicy
from streamtx_server import Server, ServerConfig


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_sessions=0), "max_sessions"),
        (dict(max_batch=1.5), "max_batch"),
        (dict(max_message_bytes=True), "max_message_bytes"),
        (dict(max_wait=-0.001), "max_wait"),
        (dict(max_wait=float("inf")), "max_wait"),
        (dict(idle_timeout=0), "idle_timeout"),
    ],
)
def test_bad_config(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ServerConfig(**kwargs)


@pytest.mark.parametrize("endpoints", ["tcp://127.0.0.1:5555", [], ["localhost:5555"]])
def test_bad_endpoints(policy, endpoints) -> None:
    with pytest.raises(ValueError, match="endpoints"):
        Server(TorchBatchPolicy(policy), endpoints)


def test_the_policy_caps_tokens_per_step(policy) -> None:
    server = Server(
        TorchBatchPolicy(policy), ["inproc://unused"], ServerConfig(max_sessions=1, max_tokens_per_step=1000)
    )
    assert server.config.max_tokens_per_step == policy.max_tokens_per_step
