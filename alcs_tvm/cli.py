"""The ``alcs`` command line. Each concept's module registers its own sub-commands here."""
from __future__ import annotations

import argparse
import importlib
import os
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


def default_tvm_threads(environ=os.environ) -> str:
    """Give TVM's thread pool an explicit size unless the user did: TVM's own default (``OMP_NUM_THREADS``, else
    half the hardware threads), spelled out. Left implicit, processes that had called ``torch.set_num_threads``
    first (``alcs flow`` and ``alcs prune`` train before they measure) ran every TVM kernel 2.5x slower on the 2-vCPU
    test machine - small_cnn 0.044 ms instead of 0.017 ms, with the same 1-thread pool by
    ``runtime.num_threads()`` - and the flow's latency table and budget with them."""
    default = environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // 2))
    return environ.setdefault("TVM_NUM_THREADS", default)


def main(argv=None) -> int:
    default_tvm_threads()  # before any command touches TVM's pool
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
