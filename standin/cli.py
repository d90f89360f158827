"""`standin` command line: one subcommand per module, each exposing `add_parser(subparsers)`."""

import argparse
import importlib
import sys

# Each module defines add_parser(subparsers) and sets `func` on the parser it adds.
SUBCOMMAND_MODULES = (
    "standin.commands",
    "standin.bench",
    "standin.preprocess.cli",
    "standin.eval.cli",
    "standin.train.cli",
    "standin.mini.cli",
)


def fail(message: str, status: int = 1) -> int:
    """Expected bad input: one line on stderr and an exit status (1; 2 for usage, as argparse), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="standin", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
