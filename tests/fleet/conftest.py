"""Fixtures of the fleet tests: a random-weight checkpoint and its in-process policy (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamtx.checkpoint import load_policy, make_random_checkpoint

MAX_TOKENS = 2  # observation tokens per step, in the replicas and the in-process reference


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("policy") / "random.pt", seed=0)


@pytest.fixture(scope="session")
def policy(checkpoint: Path):
    return load_policy(checkpoint, max_tokens_per_step=MAX_TOKENS)
