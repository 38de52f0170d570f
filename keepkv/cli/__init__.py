"""The ``keepkv`` command line: one module per subcommand (``generate``, ``chat``, ``info``, ``download``,
``eval``, ``bench``, ``serve``), each with ``add_parser(subparsers)``, which registers the subcommand and sets
``run`` (the function that carries it out: ``run(args) -> exit code``) as its parser default. A new subcommand is
a module here and its name in :data:`COMMANDS`; options several commands share are in :mod:`keepkv.cli.common`.

Diagnostics go through the ``"keepkv"`` logger to standard error (:mod:`keepkv.logs`; ``--verbose`` / ``--quiet``
before or after the command); standard output carries only results (generated text, tables, JSON)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from keepkv import __version__
from keepkv.errors import KeepKVError
from keepkv.logs import configure_cli_logging

COMMANDS = ("generate", "chat", "info", "download", "eval", "bench", "serve")
"""The subcommands, in the order ``keepkv --help`` lists them: modules of this package."""
VERBOSITY_FLAGS = ("-v", "--verbose", "-q", "--quiet")

def _add_verbosity_arguments(parser: argparse.ArgumentParser, on_command: bool) -> None:
    """``-v/--verbose`` (debug messages) and ``-q/--quiet`` (warnings and errors only); accepted before the command
    and after it (``on_command``: no default there, so it does not hide one given before)."""
    default = argparse.SUPPRESS if on_command else False
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show debug messages on standard error")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="show only warnings and errors on standard error (no progress bars)")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: every module of :data:`COMMANDS` adds its subcommand."""
    parser = argparse.ArgumentParser(prog="keepkv", description="Long-context LLM inference with a compressed "
                                     "KV cache (KeepKV and the methods it is compared with).")
    parser.add_argument("--version", action="version", version=f"keepkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    _add_verbosity_arguments(parser, on_command=False)
    for command in commands.choices.values():
        _add_verbosity_arguments(command, on_command=True)
    return parser


def _refuse_unknown_options_without_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """``keepkv --bogus``: argparse would only say that the command is missing; name the unknown option(s) too.

    Options before a command are otherwise parsed normally (argparse names unknown ones once a command is given).
    """
    if any(not arg.startswith("-") for arg in argv) or any(arg in ("-h", "--help", "--version") for arg in argv):
        return
    argv = [arg for arg in argv if arg not in VERBOSITY_FLAGS]
    if argv:
        parser.error(f"unrecognized arguments: {' '.join(argv)} (and no command given: see keepkv --help)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code: 0, 2 for a usage or input
    error (one line on stderr, no traceback), 130 on Ctrl-C."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_unknown_options_without_command(parser, argv)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet exclude each other: give one")
    configure_cli_logging("verbose" if args.verbose else "quiet" if args.quiet else "normal")
    try:
        return int(args.run(args) or 0)
    except KeepKVError as err:
        print(f"keepkv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
