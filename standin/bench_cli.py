"""`standin bench`'s arguments, apart from standin/bench.py so that building the command line imports no torch
(bench.py itself is imported only when the benchmark runs)."""

import argparse
import ast
from importlib.util import find_spec
from pathlib import Path

# The names of standin.bench.CONFIGS and standin.bench.DTYPES (tests/test_bench.py checks that they agree).
CONFIG_NAMES = ("medium", "real", "tiny")
DTYPE_NAMES = ("bf16", "fp32")


def add_arguments(parser) -> None:
    parser.add_argument("--config", nargs="+", default=["tiny", "medium"], choices=CONFIG_NAMES)
    parser.add_argument("--layers", type=int, help="override the number of blocks (fit the real sizes on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPE_NAMES)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per measured generation")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions; medians are reported")
    parser.add_argument("--fp8", action="store_true", help="store the base weights in float8 (layerwise casting)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per variant")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def _bench_docstring() -> str:
    """standin/bench.py's docstring, read without importing it."""
    return ast.get_docstring(ast.parse(Path(find_spec("standin.bench").origin).read_text())) or ""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time and memory of Stand-In vs the base, side by side",
                                   description=_bench_docstring(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from standin.cli import device_error, fail

    if device_error(args.device):
        return fail(device_error(args.device))
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            return fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    from standin.bench import run as run_bench

    return run_bench(args)
