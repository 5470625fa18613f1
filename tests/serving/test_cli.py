"""Command line: failures are reported, not raised."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamtx.apps.serve import serve_main
from streamtx_server.cli import main, stats_main
from streamtx_server.jsonlog import LOGGER_NAME


@pytest.fixture(autouse=True)
def _restore_daemon_logger() -> Iterator[None]:
    """serve_main points the daemon's logger at this test's captured stderr: undo that afterwards."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_serve_reports_a_missing_checkpoint(tmp_path: Path, capsys) -> None:
    assert serve_main(["--checkpoint", str(tmp_path / "missing.pt"), "--bind", "tcp://127.0.0.1:*"]) == 1
    (event,) = _events(capsys.readouterr().err)
    assert event["event"] == "serve_failed" and "missing.pt" in event["error"]


def test_serve_reports_a_bad_endpoint(checkpoint: Path, capsys) -> None:
    assert serve_main(["--checkpoint", str(checkpoint), "--bind", "127.0.0.1:5555"]) == 1
    (event,) = _events(capsys.readouterr().err)
    assert event["event"] == "serve_failed" and "endpoints" in event["error"]


def test_stats_reports_an_unreachable_daemon(capsys) -> None:
    assert stats_main(["tcp://127.0.0.1:9", "--timeout=0.2"]) == 1
    assert "no reply" in capsys.readouterr().err


def test_unknown_command(capsys) -> None:
    assert main(["bogus"]) == 2
    assert "serve" in capsys.readouterr().err


def test_operator_errors_are_one_line(checkpoint, tmp_path, capsys) -> None:
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    assert serve_main([f"--checkpoint={not_a_checkpoint}", "--log-format=text"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a streamtx checkpoint" in line and "weights_only" not in line


def test_a_second_daemon_on_a_held_ipc_path_is_refused(daemon, checkpoint, capsys) -> None:
    held = daemon.endpoints[1]
    assert held.startswith("ipc://")
    assert serve_main([f"--checkpoint={checkpoint}", f"--bind={held}", "--log-format=text"]) == 1
    assert "another daemon is listening there" in capsys.readouterr().err
