"""Fixtures of the serving tests: a random-weight checkpoint, its in-process policy, a daemon in a child process."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import signal

import pytest
import torch

from serving_helpers import MAX_TOKENS
from streamtx.checkpoint import load_policy, make_random_checkpoint
from streamtx_server.process import DaemonProcess

# Small limits, so the limit tests need small messages.
DAEMON_FLAGS = ("--threads=1", f"--max-tokens-per-step={MAX_TOKENS}", "--max-message-bytes=65536",
                "--max-array-elements=4096", "--max-sessions=24", "--max-wait-ms=2")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The in-process reference runs single-threaded, like the daemons under test (``--threads=1``): on a small
    shared machine, intra-op threads only contend with the daemon."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("policy") / "random.pt", seed=0)


@pytest.fixture(scope="session")
def policy(checkpoint: Path):
    """The in-process reference: the same checkpoint, loaded as the daemon loads it."""
    return load_policy(checkpoint, max_tokens_per_step=MAX_TOKENS)


def start_daemon(checkpoint: Path, directory: Path, *flags: str, binds: tuple[str, ...] | None = None) -> DaemonProcess:
    binds = binds or ("tcp://127.0.0.1:*", f"ipc://{directory}/daemon.ipc")
    daemon = DaemonProcess.serve(checkpoint, binds, directory / "daemon.log", *DAEMON_FLAGS, *flags)
    daemon.start()
    return daemon


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
