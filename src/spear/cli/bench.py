"""``spear bench``: a sweep of attacks over cases (placeholder until the harness lands)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the ``bench`` sub-command."""
    p = sub.add_parser("bench", help="sweep attacks over batch sizes, widths, clients")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``spear bench``."""
    raise NotImplementedError
