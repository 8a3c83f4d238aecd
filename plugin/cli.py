"""The ``understudy`` command line: one entry point, one subcommand group per part of the product."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from langchain_understudy import __version__
from langchain_understudy.errors import UnderstudyError

__all__ = ["main"]

# Each module defines ``register(subparsers)``; its subcommands set ``func(args) -> int``.
_COMMAND_MODULES = (
    "langchain_understudy.plugin._cli_students",
    "langchain_understudy.plugin._cli_kb",
    "langchain_understudy.plugin._cli_traces",
    "langchain_understudy.plugin._cli_distill",
    "langchain_understudy.plugin._cli_router",
    "langchain_understudy.plugin._cli_app",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the full argument parser (nothing is parsed at import time)."""
    parser = argparse.ArgumentParser(
        prog="understudy",
        description="Distil, serve and route a local student model for a LangChain agent.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except UnderstudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
