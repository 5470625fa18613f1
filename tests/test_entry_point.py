"""The ``streamtx`` entry point: usage, version, unknown commands."""

from __future__ import annotations

import streamtx
from streamtx.apps.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"streamtx {streamtx.__version__}"


def test_unknown_command_is_named(capsys):
    assert main(["serv"]) == 2
    assert "unknown command 'serv'" in capsys.readouterr().err
