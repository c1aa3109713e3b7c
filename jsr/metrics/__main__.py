"""``python -m jsr.metrics files``: where each metric's weight files were looked for, found or missing.

    python -m jsr.metrics files            # each metric: found (path) or missing (places looked in, how to get it)
    python -m jsr.metrics files --check    # also read each found file and check it against what jsr needs
    python -m jsr.metrics files --json     # the same, for machines
    python -m jsr.metrics files lpips fid  # only these metrics

Exit status 0 whatever is missing (a missing file is information, not an error); 2 for a bad argument.
See :mod:`jsr.metrics.files` for the places looked in.
"""

from __future__ import annotations

import argparse
import json
import sys

from jsr.metrics import files


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jsr.metrics", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("files", help="list every metric weight file: where looked for, found or missing")
    p.add_argument("metrics", nargs="*", metavar="METRIC",
                   help=f"only these metrics ({', '.join(files.METRIC_FILES)}; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--check", action="store_true", help="read each found file and check names and shapes "
                   "(seconds: VGG16 is 528 MB)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.metrics if m.lower() not in files.METRIC_FILES]
    if unknown:
        parser.error(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(files.METRIC_FILES)}")
    data = files.listing(args.metrics or None, check=args.check)
    sys.stdout.write(json.dumps(data, indent=1) + "\n" if args.json else files.format_listing(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
