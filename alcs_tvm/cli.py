"""The ``alcs`` command line. Each concept's module registers its own sub-commands here."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds); each module defines ``register_cli(subparsers)`` whose parsers set ``func``.
_COMMAND_MODULES = [
    "alcs_tvm.compiler",
    "alcs_tvm.run",
    "alcs_tvm.device",
    "alcs_tvm.profiler",
    "alcs_tvm.autotune",
    "alcs_tvm.prune_cli",
    "alcs_tvm.flow",
]


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alcs", description="ALCS: latency-constrained SIMD-block sparse CNNs on Apache TVM")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register_cli(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, TypeError, FileNotFoundError, ConnectionError, TimeoutError) as err:
        print(f"alcs {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alcs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # run as ``python -m alcs_tvm.cli``: use the importable module, so that ``alcs_tvm.cli.UserError`` raised by
    # the command modules is the class caught in main()
    from alcs_tvm.cli import main as _main

    sys.exit(_main())
