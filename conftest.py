"""Collection rules for ``pytest src tests``: modules that need an optional extra.

``spear.flower`` raises ImportError without Flower (``pip install "spear[flower]"``); its
doctests are skipped then, and the tests that use it skip themselves.
"""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("flwr") is None:
    collect_ignore.append("src/spear/flower.py")
