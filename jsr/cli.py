"""Shared start-up of jsr's absl command lines (``train.py``, ``evaluate.py``)."""

from __future__ import annotations

import sys
from typing import Callable

HELP_FLAGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def run(main: Callable) -> None:
    """``absl.app.run(main)``, except that asking for help exits 0 (absl's own exit status for it is 1, which
    scripts and users read as a failure)."""
    from absl import app

    try:
        app.run(main)
    except SystemExit as e:
        if e.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            sys.exit(0)
        raise
