"""TOML config files: the file sets defaults, flags override, bad files fail like bad flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from streamtx_server.config_file import add_config_option, parse_args_with_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--bind", action="append")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--log-level", default="info", choices=["debug", "info"])
    p.add_argument("--quiet", action="store_true")
    add_config_option(p)
    return p


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_sets_defaults_and_flags_override(tmp_path):
    path = _write(tmp_path, 'checkpoint = "p.pt"\nbind = ["tcp://127.0.0.1:1"]\nmax_sessions = 8\nquiet = true\n')
    args = parse_args_with_config(_parser(), ["--config", str(path)])
    assert (args.checkpoint, args.bind, args.max_sessions, args.quiet) == (Path("p.pt"), ["tcp://127.0.0.1:1"], 8, True)
    args = parse_args_with_config(_parser(), ["--config", str(path), "--max-sessions", "3", "--checkpoint", "q.pt"])
    assert (args.checkpoint, args.max_sessions) == (Path("q.pt"), 3)


def test_without_a_file_the_parser_is_unchanged():
    args = parse_args_with_config(_parser(), ["--checkpoint", "p.pt"])
    assert args.max_sessions == 64 and args.config is None
    with pytest.raises(SystemExit):
        parse_args_with_config(_parser(), [])  # required option still required


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-sesions = 3\n", "unknown key 'max-sesions'"),
        ('max-sessions = "many"\n', "max-sessions: invalid literal"),
        ('log-level = "loud"\n', "expected one of ['debug', 'info']"),
        ('quiet = "yes"\n', "expected true or false"),
        ("checkpoint = [\n", "is not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, capsys, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(SystemExit) as exc:
        parse_args_with_config(_parser(), ["--config", str(path), "--checkpoint", "p.pt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args_with_config(_parser(), ["--config", str(tmp_path / "nope.toml"), "--checkpoint", "p.pt"])
    assert "cannot read" in capsys.readouterr().err
