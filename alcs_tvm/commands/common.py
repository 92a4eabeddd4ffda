"""Arguments and checks shared by several ``alcs`` commands (argparse lives only in the CLI modules), and the output
files every command writes whole or not at all (:class:`OutputFiles`)."""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile

from ..rpc import DEFAULT_TIMEOUT

__all__ = ["TARGET_HELP", "VECTOR_WIDTH_HELP", "add_device_arguments", "check_device_arguments",
           "parse_sparsities", "require_file", "input_shapes_arg", "check_output", "OutputFiles"]

TARGET_HELP = "x86 (host features), x86-avx2, x86-avx512, arm64, or a TVM target JSON dict"

VECTOR_WIDTH_HELP = ("pruning group width V in fp32 lanes, for every layer (default: the target's - AVX-512 32 where "
                     "a conv's output channels are 64, 96, ... (a multiple of 32, two groups or more), else 16; "
                     "AVX2 8; NEON 4)")


def add_device_arguments(parser, *, local: bool = True):
    """Where a command runs kernels: a device at a tracker, an RPC server, or (``local``) this host; and the
    bound on waiting for it."""
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="RPC tracker to get the device from")
    parser.add_argument("--rpc-key", metavar="KEY", help="device key at the tracker (e.g. arm64-qemu)")
    parser.add_argument("--rpc", metavar="HOST:PORT", help="RPC server to use directly (no tracker)")
    if local:
        parser.add_argument("--local", action="store_true", help="measure on this host (no RPC)")
    parser.add_argument("--device-timeout", type=float, default=None, metavar="S",
                        help=f"bound in seconds on getting the device and on each remote step "
                             f"(default {DEFAULT_TIMEOUT:.0f})")


def check_device_arguments(args):
    if args.rpc and args.rpc_tracker:
        raise ValueError("give either --rpc-tracker (with --rpc-key) or --rpc, not both")
    if args.rpc_tracker and not args.rpc_key:
        raise ValueError("--rpc-tracker needs --rpc-key (e.g. x86-local or arm64-qemu)")
    if args.rpc_key and not args.rpc_tracker:
        raise ValueError("--rpc-key needs --rpc-tracker HOST:PORT")


def parse_sparsities(text: str) -> list:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers, got {text!r}") from None


def require_file(path: str, what: str = "model file") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def input_shapes_arg(parser):
    parser.add_argument("--input-shapes", help="e.g. input:1x3x224x224 (needed when the model has dynamic dims)")


# ------------------------------------------------------------------------------------------------ output files
def check_output(path: str, option: str = "-o") -> str:
    """``path`` as a file a command can write once its work is done; checked before the work, so that a typo in a
    directory costs a second, not a whole compile or training run. Raises ``ValueError`` naming ``option``."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{option} {path} is a directory; give a file name")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        what = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ValueError(f"{option} {path}: directory {os.path.dirname(path) or directory} {what}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write in directory {os.path.dirname(path) or directory}")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputFiles:
    """A command's output files, written whole or not at all.

    Each file is checked when named (:func:`check_output`, before the work), written to a temporary beside it
    (:meth:`path`) and renamed into place by :meth:`commit`, all together, once the work succeeded; leaving the
    ``with`` block by an error or Ctrl-C removes the temporaries. So an interrupted
    ``alcs compile -o model.so`` leaves the previous ``model.so`` (and its sidecar and report) as they were."""

    def __init__(self, *named):
        """``named``: ``(option, path)`` pairs, e.g. ``("-o", "model.so")``; a ``None`` path is skipped."""
        self._temps: dict[str, str] = {}
        for option, path in named:
            if path is not None:
                check_output(path, option)

    def path(self, final: str, temp: str | None = None) -> str:
        """The temporary to write ``final`` to (or record ``temp``, a file some writer derives from another
        temporary). It keeps ``final``'s extension: TVM and matplotlib pick the format from it."""
        if temp is None:
            directory, name = os.path.split(os.path.abspath(final))
            fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{os.path.splitext(name)[1]}",
                                        dir=directory)
            os.close(fd)
            os.chmod(temp, 0o666 & ~_umask())  # the mode a plain open() would give the file
        self._temps[final] = temp
        return temp

    def commit(self) -> None:
        """Rename every temporary into place."""
        for final, temp in self._temps.items():
            os.replace(temp, final)
        self._temps.clear()

    def drop(self, final: str) -> None:
        """Remove the temporary of ``final`` now: an intermediate the work needed, not an output."""
        _remove(self._temps.pop(final))

    def discard(self) -> None:
        for temp in self._temps.values():
            _remove(temp)
        self._temps.clear()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


def _remove(temp: str) -> None:
    """Remove a temporary and what writers derived from its name (``compiler.export``'s ``.tmpPID.so``)."""
    for path in [temp] + glob.glob(glob.escape(temp) + ".*"):
        with contextlib.suppress(OSError):
            os.unlink(path)
