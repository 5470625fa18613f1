"""TOML configuration files for command-line programs: the file sets an ``argparse`` parser's defaults, flags given on
the command line override them.

One mechanism for every command that takes ``--config`` (``streamtx serve``, ``streamtx train``): a file's keys are
the options' names (``max-sessions`` or ``max_sessions``), its values are checked exactly as the same text on the
command line would be (the option's ``type`` and ``choices``), and a key that names no option is an error that says
which file, which key, and what the options are.

Example ``serve.toml``::

    checkpoint = "policy.pt"
    bind = ["tcp://127.0.0.1:5555", "ipc:///tmp/streamtx.ipc"]
    max-sessions = 256
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["add_config_option", "load_config_defaults", "parse_args_with_config", "ConfigFileError"]


class ConfigFileError(ValueError):
    """A configuration file that cannot be read or does not fit the command's options."""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--config FILE`` option (read by :func:`parse_args_with_config`)."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of option defaults (keys are option names); flags given here override it",
    )


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option name (without dashes, ``-`` and ``_`` alike) -> its action, for every optional argument but help."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse exposes its actions only through this attribute
        if isinstance(action, argparse._HelpAction) or not action.option_strings or action.dest == "config":
            continue
        out[action.dest.replace("_", "-")] = action
    return out


def _convert(path: Path, key: str, action: argparse.Action, value: Any) -> Any:
    """``value`` from the file, checked and converted as the command line would check its text."""

    def one(item: Any) -> Any:
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(item, bool):
                raise ConfigFileError(f"{path}: {key}: expected true or false, got {item!r}")
            return item
        if isinstance(item, (dict, list)):
            raise ConfigFileError(f"{path}: {key}: expected a single value, got {item!r}")
        converted = item
        if action.type is not None and not isinstance(item, bool):
            try:
                converted = action.type(str(item))  # type: ignore[operator]
            except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                raise ConfigFileError(f"{path}: {key}: {exc}") from None
        if action.choices is not None and converted not in action.choices:
            raise ConfigFileError(f"{path}: {key}: expected one of {list(action.choices)}, got {item!r}")
        return converted

    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [one(item) for item in items]
    if action.nargs not in (None, "?") and action.nargs != 0:
        if not isinstance(value, list):
            raise ConfigFileError(f"{path}: {key}: expected a list, got {value!r}")
        return [one(item) for item in value]
    return one(value)


def load_config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """The parser defaults that the TOML file ``path`` sets (``dest -> value``)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigFileError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"--config: {path} is not valid TOML: {exc}") from None
    options = _options(parser)
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        action = options.get(key.replace("_", "-"))
        if action is None:
            raise ConfigFileError(f"{path}: unknown key {key!r}; expected option names: {', '.join(sorted(options))}")
        defaults[action.dest] = _convert(path, key, action, value)
    return defaults


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` where ``--config FILE`` (added by :func:`add_config_option`) supplies defaults.

    Flags on the command line win over the file, and the file over the parser's own defaults. An option that is
    ``required`` may come from the file instead. A bad file exits like a bad flag (``parser.error``: usage, the
    message, exit status 2).
    """
    pre = argparse.ArgumentParser(add_help=False)  # reads --config alone: required options may be in the file
    pre.add_argument("--config", type=Path)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return parser.parse_args(argv)
    try:
        defaults = load_config_defaults(parser, path)
    except ConfigFileError as exc:
        parser.error(str(exc))
    required = [a for a in parser._actions if a.required and a.dest in defaults]
    for action in required:
        action.required = False
    try:
        parser.set_defaults(**defaults)
        return parser.parse_args(argv)
    finally:
        for action in required:
            action.required = True
