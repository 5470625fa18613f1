"""Ctrl-C during ``streamtx demo``: the daemon it started is stopped, the demo exits 130 with one line, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

TIMEOUT = 120.0  # seconds: imports and the daemon's start on a loaded 2-core machine; bounded


def test_ctrl_c_stops_the_daemon_and_exits_130(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    command = [sys.executable, "-m", "streamtx", "demo", "--quiet", f"--log={log}", f"--png={tmp_path / 'demo.png'}"]
    demo = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as from a terminal: a test run started in the background of a non-interactive shell inherits SIGINT
        # ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # waits on the demo's output: the line it prints once the daemon listens
            if line.startswith("daemon listening on tcp://"):
                break
        else:
            pytest.fail(f"the demo ended before its daemon listened: {demo.wait(TIMEOUT)}, {demo.stderr}")
        demo.send_signal(signal.SIGINT)  # the 100 default episodes take far longer than the signal's delivery
        out, err = demo.communicate(timeout=TIMEOUT)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == ["streamtx demo: interrupted (Ctrl-C); the daemon it started is stopped"], err
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert "listening" in events and events[-1] == "stopped", events  # a graceful stop, by the demo
