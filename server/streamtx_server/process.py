"""A daemon in a child process (for tests, benchmarks, supervisors): start it, wait until it listens, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DaemonProcess"]


class DaemonProcess:
    """Runs ``command`` (a daemon that logs JSON events to stderr) with its log in ``log_path``.

    :meth:`start` returns once the daemon logged its ``listening`` event, with the endpoints it bound (so
    ``tcp://127.0.0.1:*`` can pick a free port); :meth:`stop` sends SIGTERM (graceful: requests in flight are
    answered) and kills after a timeout; :meth:`kill` simulates a crash.
    """

    def __init__(self, command: Sequence[str], log_path: str | os.PathLike[str], *, env: dict[str, str] | None = None):
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = env
        self.endpoints: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def serve(
        cls,
        checkpoint: str | os.PathLike[str],
        binds: Sequence[str],
        log_path: str | os.PathLike[str],
        *extra_args: str,
    ) -> DaemonProcess:
        """``python -m streamtx serve`` of ``checkpoint`` on ``binds`` (more CLI flags in ``extra_args``)."""
        command = [
            sys.executable,
            "-m",
            "streamtx",
            "serve",
            f"--checkpoint={checkpoint}",
            *(f"--bind={b}" for b in binds),
            "--log-format=json",
            *extra_args,
        ]
        return cls(command, log_path)

    @property
    def pid(self) -> int | None:
        """The child's process id while started (None before the first start)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 60.0) -> list[str]:
        if self.running:
            raise RuntimeError("daemon already running")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self._events(offset):
                if event.get("event") == "listening":
                    endpoints = event["endpoints"]
                    assert isinstance(endpoints, list), event
                    self.endpoints = [str(e) for e in endpoints]
                    return self.endpoints
            if self._process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self._process.returncode}:\n{self.log_tail()}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"daemon did not listen within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM or SIGINT: both stop gracefully), wait up to ``timeout`` s, then SIGKILL; returns
        the exit code."""
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(sig)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL: the daemon dies without answering anything (a crash)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _events(self, offset: int) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        events = []
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            for line in log:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # not an event (e.g. a warning printed by a library)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
