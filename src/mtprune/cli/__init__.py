"""The ``mtprune`` command line: a thin layer over the Python API.

Each module of this package registers one group of subcommands (``register(subparsers)``) whose
handlers parse arguments, call the API and print. Every :class:`~mtprune.errors.MtpruneError` becomes
one line on stderr and its exit code; argument errors are one line and exit 2, as argparse's are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mtprune import interrupt
from mtprune.checkpoint import trusting_code
from mtprune.cli import cost_cmd, data_cmds, eval_cmds, export_cmds, init_cmd, prune_cmd, run_cmds, train_cmds
from mtprune.errors import MtpruneError
from mtprune.version import __version__


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line (``mtprune prune: error: ...``), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="mtprune",
        description="Multi-task channel pruning (MTP) for semantic segmentation networks.",
    )
    parser.add_argument("--version", action="version", version=f"mtprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineArgumentParser)
    for module in (init_cmd, cost_cmd, prune_cmd, train_cmds, run_cmds, eval_cmds, export_cmds, data_cmds):
        module.register(sub)
    for name in LOADS_CHECKPOINTS:
        sub.choices[name].add_argument(
            "--trust-code",
            action="store_true",
            help="run the Python code a python: model's checkpoint carries (model_src.py) when it loads; refused "
            "without it (or MTPRUNE_TRUST_CODE=1)",
        )
    return parser


#: the commands that load checkpoints, and so take --trust-code
LOADS_CHECKPOINTS = ("cost", "prune", "eval", "export", "train", "run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "renamed", None):  # an old flag: its new spelling, nothing run
        print(f"mtprune {args.command}: error: {args.renamed}", file=sys.stderr)
        return 2
    interrupt.install()
    try:
        with trusting_code(getattr(args, "trust_code", False)):
            return int(args.func(args) or 0)
    except MtpruneError as e:
        print(f"mtprune {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # any file-system failure not met by a more specific message: still one line
        print(f"mtprune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mtprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
