"""``python -m fedagg.config docs [DIR] [--check]``: (re)generate the config reference
``DIR/config.md`` and ``DIR/config.schema.json`` (DIR: ``docs``) from the key definitions;
``--check`` changes nothing and exits 1 if either file is out of date."""

from __future__ import annotations

import argparse
import sys

from fedagg.config._docs import write_docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedagg.config", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    docs = sub.add_parser("docs", help="write DIR/config.md and DIR/config.schema.json")
    docs.add_argument("dir", nargs="?", default="docs", help="the docs directory (default: docs)")
    docs.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    changed = write_docs(args.dir, check=args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
