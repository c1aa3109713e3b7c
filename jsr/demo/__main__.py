"""``python -m jsr.demo`` (see :mod:`jsr.demo.cli`)."""
import sys

from jsr.demo.cli import main

sys.exit(main())
