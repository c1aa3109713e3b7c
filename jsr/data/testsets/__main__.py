"""``python -m jsr.data.testsets``: prepare the papers' test sets as TFDS datasets from their manual downloads.

    python -m jsr.data.testsets list
    python -m jsr.data.testsets build realsr "/data/RealSR(V3)" --data_dir /data/tfds
    python -m jsr.data.testsets build drealsr /data/DRealSR --data_dir /data/tfds
    python -m jsr.data.testsets build div2k_val /data/DIV2K --data_dir /data/tfds

A folder not in the set's layout, or an unknown name, ends with one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from jsr.cli import report_user_error
from jsr.data import testsets
from jsr.data.testsets import layout

_LAYOUTS = {
    "realsr": "Canon/Test/4/Canon_001_HR.png + Canon_001_LR4.png, the same for Nikon (RealSR V3)",
    "drealsr": "x4/Test_x4/test_HR/<name>_x4.png + test_LR/<name>_x1.png, at any depth",
    "div2k_val": "DIV2K_valid_HR/0801.png ... 0900.png (degraded with seed 0, Real-ESRGAN preset)",
}
assert set(_LAYOUTS) == set(testsets.TEST_SETS)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jsr.data.testsets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the sets, their labels, sizes and manual layouts")
    b = sub.add_parser("build", help="prepare one set (ArrayRecord) from its manual download")
    b.add_argument("name", help=", ".join(testsets.TEST_SETS))
    b.add_argument("manual_dir", help="the folder holding the set's download, in its own layout")
    b.add_argument("--data_dir", default=None, help="TFDS data folder (default: TFDS's, ~/tensorflow_datasets)")
    b.add_argument("--check", action="store_true", help="only list what the manual folder holds (no TFDS needed)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, (label, count) in testsets.TEST_SETS.items():
            print(f"{name:10s} {label:10s} {count:4d} images  manual folder: {_LAYOUTS[name]}")
        return 0
    try:
        if args.check:
            find = layout.FIND.get(args.name)
            if find is None:
                raise ValueError(f"unknown test set {args.name!r}; the sets are {', '.join(testsets.TEST_SETS)}")
            files = find(args.manual_dir)
            label, count = testsets.TEST_SETS[args.name]
            print(f"{label}: {len(files)} images (the papers' set: {count}); first {files[0].name}, last "
                  f"{files[-1].name}")
            return 0
        out = testsets.build(args.name, args.manual_dir, args.data_dir)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return report_user_error(e)
    print(f"{args.name}: prepared in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
