"""The ``alcs`` command line: one module per command under :mod:`alcs_tvm.commands`, each with
``register(subparsers)`` whose parser sets ``func``; errors a user can fix print as one line (exit 2)."""
from __future__ import annotations

import argparse
import os
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alcs", description="ALCS: latency-constrained SIMD-block sparse CNNs on Apache TVM")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def default_tvm_threads(environ=os.environ) -> str:
    """Give TVM's thread pool an explicit size unless the user did: TVM's own default (``OMP_NUM_THREADS``, else
    half the hardware threads), spelled out. Left implicit, a process that called ``torch.set_num_threads`` before
    TVM's pool started (``alcs flow`` and ``alcs prune`` train before they measure) runs every TVM kernel several
    times slower with the same reported pool size (docs/deploying.md)."""
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
    except (ValueError, TypeError, FileNotFoundError, ConnectionError, TimeoutError) as err:
        print(f"alcs {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alcs {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
