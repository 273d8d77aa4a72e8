"""``retrbench`` entry point: the command registry, global options, exit codes.

A command is registered with :func:`command` on its handler, with the function that adds
its arguments and the examples shown by ``--help`` on the entry's :class:`Command` info::

    def _args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name")

    @command("hello", args=_args, help="say hello", examples=["retrbench hello --name x"])
    def _hello(a: argparse.Namespace) -> int:
        print(a.name)
        return 0

Only the parser of the command being run is populated (its argument functions may import
the registries, and with them torch); ``retrbench --help`` stays light.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .._version import __version__
from ..registry import EntryInfo, Registry

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "command", "main", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_FAILED = 1  # the command ran and failed (message on stderr; traceback with -vv)
EXIT_USAGE = 2  # bad options, names or parameters: nothing was computed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UsageError(Exception):
    """A user input error found before any work (exit status 2)."""


@dataclass(frozen=True)
class Command(EntryInfo):
    """A subcommand: ``help`` (one line), the function adding its arguments, its examples."""

    args: Callable[[argparse.ArgumentParser], None] | None = field(default=None, compare=False)
    description: str = ""
    examples: tuple[str, ...] = ()


COMMANDS: Registry[Callable[[argparse.Namespace], int]] = Registry("command", Command)


def command(
    name: str,
    *,
    args: Callable[[argparse.ArgumentParser], None] | None = None,
    help: str,
    description: str = "",
    examples: Sequence[str] = (),
    order: int = 0,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated handler ``(args) -> exit status`` as ``retrbench NAME``."""
    info = Command(help=help, order=order, args=args, description=description, examples=tuple(examples))
    return COMMANDS.register(name, info=info)


def _load_commands() -> None:
    from . import download, features, listing, report, run, train  # noqa: F401  (register commands)


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    default = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default, help="more log output (-vv: debug, and tracebacks on errors)")
    p.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS, help="only errors")


def _chosen(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-") and a in COMMANDS), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``retrbench`` parser; with ``argv``, only the command named in it gets its arguments
    (every command's otherwise)."""
    _load_commands()
    chosen = None if argv is None else _chosen(argv)
    p = argparse.ArgumentParser(
        prog="retrbench",
        description="Benchmark frozen networks for instance-level image retrieval.",
        epilog="Run 'retrbench COMMAND --help' for a command's options and examples. Exit status: 0 done, "
        "1 failed, 2 bad usage, 130 interrupted.",
    )
    p.add_argument("--version", action="version", version=f"retrbench {__version__}")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        info: Command = entry.info
        epilog = "examples:\n" + "\n".join(f"  {e}" for e in info.examples) if info.examples else None
        sp = sub.add_parser(
            entry.name,
            help=info.help,
            description=info.description or info.help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _global_options(sp, top=False)
        if info.args is not None and (argv is None or chosen == entry.name):
            info.args(sp)
    return p


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    text = str(e) or type(e).__name__
    return text if isinstance(e, (OSError, ValueError, RuntimeError, UsageError)) else f"{type(e).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``retrbench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    level = logging.ERROR if args.quiet else logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    handler = COMMANDS.get(args.command).factory
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"retrbench {args.command}: interrupted; finished work is kept (a rerun resumes)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as e:
        print(f"retrbench {args.command}: error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.verbose >= 2:
            traceback.print_exc()
        hint = "" if args.verbose >= 2 else " (run with -vv for the traceback)"
        print(f"retrbench {args.command}: error: {_message(e)}{hint}", file=sys.stderr)
        return EXIT_FAILED
