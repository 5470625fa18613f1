"""``streamtx`` command line: one entry point; each subcommand's code lives in the module that owns its job."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .. import __version__
from . import collect, demo, fleet, o3_demo, serve, train

__all__ = ["COMMANDS", "main"]

Command = Callable[["list[str] | None"], int]

COMMANDS: dict[str, tuple[Command, str]] = {
    "demo": (demo.main, "run Reacher episodes through the daemon with the shipped policy"),
    "serve": (serve.serve_main, "run the inference daemon for a checkpoint"),
    "stats": (serve.stats_main, "print a running daemon's statistics"),
    "keygen": (serve.keygen_main, "create CURVE keys for serve --curve-keys"),
    "collect": (collect.main, "collect Reacher demonstrations from the scripted expert"),
    "train": (train.main, "train a policy on a demonstration file"),
    "random-checkpoint": (serve.random_checkpoint_main, "write a small random-weight checkpoint"),
    "fleet": (fleet.main, "the policy on many replicas with Ray Serve: fleet up|scale|status|down (needs .[fleet])"),
    "o3-demo": (o3_demo.main, "train an O(3)-equivariant 3-D reaching policy and a plain one, serve both, compare"),
    "replay": (serve.replay_main, "replay a `serve --record` dataset against a checkpoint, compare the actions"),
}


def _usage() -> str:
    lines = ["usage: streamtx COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`streamtx COMMAND --help` shows a command's options; `streamtx --version` the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"streamtx {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"streamtx: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[name]
    return int(command(rest) or 0)
