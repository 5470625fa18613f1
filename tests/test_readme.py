"""Every code block of the README runs as written, so the documentation cannot rot.

The blocks run in file order in one scratch folder (with ``.venv``, ``examples`` and ``streamtx`` linked in, as in a
reader's checkout), as a reader pasting them would: ``python`` blocks in one shared
namespace (a later block may use what an earlier one defined), ``bash`` blocks in a shell with this environment's
``streamtx`` and ``python`` first on ``PATH`` (a command ending in ``&`` keeps running, e.g. a daemon, and is
stopped at the end with the whole process group its block started). The first block holds the set-up commands
(install, demo, tests): ``shared/tools/fresh-install-check.sh`` and CI run those, so they are not re-run here.
Blocks of any other language (``text``, ``toml``, ...) are shown, not run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block, in order."""
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def test_blocks_are_found():
    text = "x\n```bash\necho a\n```\n\n```python\nprint(1)\n```\n```text\nshown\n```\n"
    assert readme_blocks(text) == [("bash", "echo a\n", 2), ("python", "print(1)\n", 6), ("text", "shown\n", 9)]


def _run_python(code: str, namespace: dict[str, object], line: int) -> None:
    exec(compile(code, f"README.md:{line}", "exec"), namespace)


def _start_bash(code: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A bash block as a reader's shell would run it, but stopping at the first failing command."""
    return subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: background commands are stopped with it
    )


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
    try:
        for lang, code, line in blocks[1:]:
            if lang == "python":
                _run_python(textwrap.dedent(code), namespace, line)
            elif lang in ("bash", "sh", "shell"):
                shell = _start_bash(code, tmp_path, env)
                groups.append(shell)
                out, _ = shell.communicate(timeout=600)
                assert shell.returncode == 0, f"README.md:{line}: bash block failed:\n{out.decode()[-3000:]}"
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
        shell = _start_bash("false\necho after\n", tmp_path, dict(os.environ))
        out, _ = shell.communicate(timeout=60)
        assert shell.returncode != 0 and b"after" not in out
