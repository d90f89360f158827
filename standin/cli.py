"""`standin` command line: one subcommand per module, each exposing `add_parser(subparsers)`.

Building the parser imports no torch, diffusers, cv2 or dlib: each module imports what a command needs inside the
function that runs it, so `standin --help` and argument errors are instant.
"""

import argparse
import importlib
import sys

# Each module defines add_parser(subparsers) and sets `func` on the parser it adds. Installed packages add more
# through the `standin.commands` entry points (standin.plugins), e.g. `standin mini` from standin-mini.
SUBCOMMAND_MODULES = (
    "standin.commands",
    "standin.control",
    "standin.bench_cli",
    "standin.preprocess.cli",
    "standin.eval.cli",
    "standin.train.cli",
    "standin.swap.cli",
    "standin.app",
    "standin.provenance",
)

DESCRIPTION = """\
Stand-In identity control on Wan video diffusion transformers: one photo of a person and a prompt in, a video of
that person doing what the prompt says out. Without --base, `standin generate` runs the embedded mini model (a
CPU is enough; pip install -e ./mini). `standin COMMAND --help` describes each command.
"""


def fail(message: str, status: int = 1) -> int:
    """Expected bad input: one line on stderr and an exit status (1; 2 for usage, as argparse), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    return status


def device_error(name: str | None) -> str | None:
    """Why a --device cannot be used here (imports torch: call it when the command runs), or None."""
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"unknown --device {name!r} (e.g. cpu, cuda, cuda:1)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def _plugin_modules() -> list:
    """The modules of the `standin.commands` entry points, by name."""
    from standin.plugins import COMMANDS, registered

    modules = []
    for name, entry in sorted(registered(COMMANDS).items()):
        try:
            modules.append(entry.load())
        except Exception as error:  # a broken extra package must not take the product's own commands down
            print(f"warning: the `standin {name}` commands could not be loaded ({type(error).__name__}: {error})",
                  file=sys.stderr)
    return modules


class _CommandListFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help on its own line: argparse sizes the name column without the extra indent it gives
    subcommands, so a long name (prepare-data) would push its help to the next line."""

    def add_argument(self, action):
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="standin", description=DESCRIPTION, formatter_class=_CommandListFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       title="commands (one line each; COMMAND --help for its options)")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    for module in _plugin_modules():
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
