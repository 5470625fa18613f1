"""Every code block of the README runs as written, so the documentation cannot rot.

The blocks run in file order in one scratch folder (with ``.venv``, ``examples`` and ``streamtx`` linked in, as in a
reader's checkout), as a reader pasting them would: ``python`` blocks in one shared
namespace (a later block may use what an earlier one defined), ``bash`` blocks in a shell with this environment's
``streamtx`` and ``python`` first on ``PATH`` (a command ending in ``&`` keeps running, e.g. a daemon, and is
stopped at the end with the whole process group its block started). The first block holds the set-up commands
(install, demo, tests): ``shared/tools/fresh-install-check.sh`` and CI run those, so they are not re-run here.
Blocks of any other language (``text``, ``toml``, ...) are shown, not run. The README's fixed ports (5555, 8000) are
replaced by free ones, so that two checkouts running this test at once on one machine cannot reach each other's
daemons.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import IO

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block, in order."""
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def test_blocks_are_found():
    text = "x\n```bash\necho a\n```\n\n```python\nprint(1)\n```\n```text\nshown\n```\n"
    assert readme_blocks(text) == [("bash", "echo a\n", 2), ("python", "print(1)\n", 6), ("text", "shown\n", 9)]


README_PORTS = ("5555", "8000")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_ports(code: str, ports: dict[str, str]) -> str:
    """``code`` with each README port (a whole number in the text) replaced by its stand-in."""
    return re.sub(r"\b(" + "|".join(ports) + r")\b", lambda m: ports[m.group(1)], code)


def test_ports_are_replaced_as_whole_numbers():
    ports = {"5555": "40001", "8000": "40002"}
    code = "--bind tcp://127.0.0.1:5555 --openpi-port 8000 --x 55555 port=8000)"
    assert with_ports(code, ports) == "--bind tcp://127.0.0.1:40001 --openpi-port 40002 --x 55555 port=40002)"


def _run_python(code: str, namespace: dict[str, object], line: int) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def _start_bash(code: str, cwd: Path, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A bash block as a reader's shell would run it, but stopping at the first failing command.

    Output goes to a file, not a pipe: a background command (a daemon) inherits it and may keep it open long after
    the block is done, so the block's end is the shell's exit, never the output's end-of-file.
    """
    return subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: background commands are stopped with it
    )


def _run_bash(code: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """Start a block, wait for its shell to exit and return it with what it printed."""
    with tempfile.TemporaryFile() as log:
        shell = _start_bash(code, cwd, env, log)
        try:
            shell.wait(timeout=timeout)
        finally:
            log.seek(0)
            out = log.read().decode(errors="replace")
    return shell, out


def test_readme_blocks_run(tmp_path, monkeypatch):
    blocks = readme_blocks(README.read_text())
    assert blocks and blocks[0][0] == "bash", "README's first block holds the set-up commands"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # the scratch folder stands for the reader's checkout: the installed venv and the repository's files they name
    (tmp_path / ".venv").symlink_to(sys.prefix)
    for name in ("examples", "streamtx"):
        (tmp_path / name).symlink_to(README.parent / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    groups: list[subprocess.Popen[bytes]] = []
    ports = {port: str(_free_port()) for port in README_PORTS}
    try:
        for lang, code, line in blocks[1:]:
            code = with_ports(code, ports)
            if lang == "python":
                _run_python(textwrap.dedent(code), namespace, line)
            elif lang in ("bash", "sh", "shell"):
                shell, out = _run_bash(code, tmp_path, env, timeout=600)
                groups.append(shell)
                assert shell.returncode == 0, f"README.md:{line}: bash block failed:\n{out[-3000:]}"
    finally:
        for shell in groups:
            try:
                os.killpg(shell.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    assert len(blocks) > 1


@pytest.mark.parametrize("lang", ["python", "bash"])
def test_a_failing_block_fails(tmp_path, lang):
    """The runner does fail on a broken block (guards the test above)."""
    if lang == "python":
        with pytest.raises(NameError):
            _run_python("undefined_name\n", {}, 1)
    else:
        shell, out = _run_bash("false\necho after\n", tmp_path, dict(os.environ), timeout=60)
        assert shell.returncode != 0 and "after" not in out


def test_a_background_command_does_not_hold_the_block(tmp_path):
    """A block that leaves a process running (a daemon, with the block's output) ends when its shell ends."""
    shell, out = _run_bash("sleep 300 & echo $! > bg.pid\necho done\n", tmp_path, dict(os.environ), timeout=60)
    try:
        assert shell.returncode == 0 and out == "done\n"
    finally:
        os.killpg(shell.pid, signal.SIGTERM)
