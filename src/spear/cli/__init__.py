"""The ``spear`` command: thin wrappers that parse arguments and call the API.

One module per command (``demo``, ``attack``, ``bench``, ``audit``); each exposes ``add_parser`` and
``run``. Errors the user can act on end the command with one line on stderr and status 2;
Ctrl-C ends it with one line and status 130 (``attack``, ``bench`` and ``audit`` say what
was kept).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import warnings
from collections.abc import Sequence

from spear.cli import attack_cmd, audit_cmd, bench, demo
from spear.errors import (
    BatchTooLargeError,
    InputError,
    NoReluSparsityError,
    NotAttackableError,
)

__all__ = ["main", "version"]


def version() -> str:
    """The installed distribution's version, or ``spear.__version__`` when not installed."""
    try:
        return importlib.metadata.version("spear")
    except importlib.metadata.PackageNotFoundError:
        import spear

        return spear.__version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="spear",
        description="Exact reconstruction of federated-learning clients' batches (SPEAR).",
    )
    parser.add_argument(
        "--version", action="version", version=f"spear {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, attack_cmd, bench, audit_cmd):
        module.add_parser(sub)
    return parser


#: torch's own deprecation notices that say nothing about the user's files or settings:
#: ``copy.deepcopy`` of a loaded ``.pt2`` program's graph module raises this one inside
#: torch. The command hides them; the library leaves warnings to its caller.
TORCH_INTERNAL_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spear`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            for message in TORCH_INTERNAL_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            status: int = args.run(args)
    except (InputError, BatchTooLargeError, NoReluSparsityError, NotAttackableError) as exc:
        print(f"spear: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"spear: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spear {args.command}: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
