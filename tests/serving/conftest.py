"""Fixtures of the serving tests: a random-weight checkpoint, its in-process policy, a daemon in a child process."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import MAX_TOKENS, start_daemon

from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx_server.process import DaemonProcess


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("policy") / "random.pt", seed=0)


@pytest.fixture(scope="session")
def policy(checkpoint: Path):
    """The in-process reference: the same checkpoint, loaded as the daemon loads it."""
    return load_policy(checkpoint, max_tokens_per_step=MAX_TOKENS)


@pytest.fixture(scope="session")
def daemon(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon shared by the tests that do not stop it: endpoints ``[tcp, ipc]``. Ctrl-C must stop it cleanly
    (the other daemons of the tests get SIGTERM)."""
    proc = start_daemon(checkpoint, tmp_path_factory.mktemp("daemon"))
    try:
        yield proc
    finally:
        code = proc.stop(sig=signal.SIGINT)
    assert code == 0, proc.log_tail()
    assert '"event": "stopped"' in proc.log_tail()
