"""The ``alcs`` command line: one module per command under :mod:`alcs_tvm.commands`, each with
``register(subparsers)`` whose parser sets ``func``; errors a user can fix print as one line (exit 2), Ctrl-C as
``alcs CMD: interrupted`` (exit 130)."""
from __future__ import annotations

import argparse
import os
import sys


def _caused_by_ctrl_c(err: BaseException | None) -> bool:
    """``err`` is a KeyboardInterrupt or was raised because of one (an extension module whose initialisation a
    Ctrl-C broke raises ``ImportError: initialization failed`` from it: ONNX Runtime's does)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


try:
    from .commands import COMMANDS
    from .commands.common import INTERRUPTS
    from .startup import load_tvm_without_torch
except BaseException as _err:  # Ctrl-C while the command modules load (they import no TVM, torch or numpy)
    if not _caused_by_ctrl_c(_err):
        raise
    _COMMAND = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    print(f"alcs {_COMMAND}: interrupted" if _COMMAND else "alcs: interrupted", file=sys.stderr, flush=True)
    os._exit(130)  # not sys.exit: see the end of this file

#: what a user can fix: printed as one line, exit 2
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ConnectionError, TimeoutError)


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
    # from here on Ctrl-C is the command's interrupt: the command imports TVM, torch and ONNX Runtime itself, after
    # checking its arguments (alcs_tvm.commands), so a Ctrl-C while they load ends here too
    INTERRUPTS.install(args.command)
    err = None
    try:
        if not getattr(args, "uses_torch", False):  # a command that trains sets it (alcs_tvm.startup)
            load_tvm_without_torch()
        code = int(args.func(args) or 0)
    except BaseException as caught:  # noqa: BLE001 - after Ctrl-C, whatever TVM raised instead is the interrupt
        err = caught
        if not (INTERRUPTS.fired.is_set() or _caused_by_ctrl_c(caught)):
            if isinstance(caught, USER_ERRORS):
                print(f"alcs {args.command}: error: {caught}", file=sys.stderr)
                return 2
            raise
    finally:
        INTERRUPTS.uninstall()
    if err is not None or INTERRUPTS.fired.is_set():
        INTERRUPTS.report()
        INTERRUPTS.settle(err)
        return 130
    return code


if __name__ == "__main__":
    status = main()
    if status == 130:
        # CPython ends a `python -m` run by SIGINT (exit -2, not 130) once a KeyboardInterrupt has passed through
        # exec() of a string - which is how dataclasses make their methods, so a Ctrl-C while one is created -
        # even when it was handled; the interrupted command has cleaned up, so it exits here
        sys.stdout.flush()
        os._exit(130)
    sys.exit(status)
