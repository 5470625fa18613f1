"""``streamtx`` command line: one entry point, each subcommand implemented next to what it runs."""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

# name -> (module, function, help); modules are imported only when their command runs (the daemon does not need
# the simulator, the demo does not need the trainer, ...)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("streamtx.tasks.reacher.demo", "main", "run Reacher episodes through the daemon with the shipped policy"),
    "serve": ("streamtx_server.cli", "serve_main", "run the inference daemon for a checkpoint"),
    "stats": ("streamtx_server.cli", "stats_main", "print a running daemon's statistics"),
    "keygen": ("streamtx_server.cli", "keygen_main", "create CURVE keys for serve --curve-keys"),
    "collect": ("streamtx.tasks.reacher.collect", "main", "collect Reacher demonstrations from the scripted expert"),
    "train": ("streamtx.train.cli", "main", "train a policy on a demonstration file"),
    "random-checkpoint": ("streamtx.checkpoint", "random_checkpoint_main", "write a small random-weight checkpoint"),
}


def _usage() -> str:
    lines = ["usage: streamtx COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`streamtx COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"streamtx: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
