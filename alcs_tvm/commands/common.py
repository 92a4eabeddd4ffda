"""Arguments and checks shared by several ``alcs`` commands (argparse lives only in the CLI modules), the output
files every command writes whole or not at all (:class:`OutputFiles`) and Ctrl-C (:data:`INTERRUPTS`)."""
from __future__ import annotations

import contextlib
import gc
import glob
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

from ..defaults import CONNECT_TIMEOUT, FIRST_STEP_TIMEOUT, MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR

__all__ = ["TARGET_HELP", "VECTOR_WIDTH_HELP", "add_device_arguments", "check_device_arguments",
           "parse_sparsities", "require_file", "input_shapes_arg", "check_output", "OutputFiles", "Interrupts",
           "INTERRUPTS", "INTERRUPT_GRACE"]

TARGET_HELP = "x86 (host features), x86-avx2, x86-avx512, arm64, or a TVM target JSON dict"

VECTOR_WIDTH_HELP = ("pruning group width V in fp32 lanes, for every layer (default: the target's - AVX-512 32 where "
                     "a conv's output channels are 64, 96, ... (a multiple of 32, two groups or more), else 16; "
                     "AVX2 8; NEON 8 where they are a multiple of 8 and at least 16, else 4)")


def add_device_arguments(parser, *, local: bool = True):
    """Where a command runs kernels: a device at a tracker, an RPC server, or (``local``) this host; and the
    bound on waiting for it."""
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="RPC tracker to get the device from")
    parser.add_argument("--rpc-key", metavar="KEY", help="device key at the tracker (e.g. arm64-qemu)")
    parser.add_argument("--rpc", metavar="HOST:PORT", help="RPC server to use directly (no tracker)")
    if local:
        parser.add_argument("--local", action="store_true", help="measure on this host (no RPC)")
    parser.add_argument("--device-timeout", type=float, default=None, metavar="S",
                        help=f"bound in seconds on getting the device and on each remote step (default: "
                             f"{CONNECT_TIMEOUT:g} s to get the device, {FIRST_STEP_TIMEOUT:g} s for a kind of step "
                             f"not done before, then {STEP_TIMEOUT_FACTOR:g}x what that kind of step took, at "
                             f"least {MIN_STEP_TIMEOUT:g} s)")


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
    (:meth:`path`) and renamed into place by :meth:`commit`, all together, once the work succeeded and Ctrl-C was
    not pressed; leaving the ``with`` block by an error or Ctrl-C removes the temporaries. So an interrupted
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
        INTERRUPTS.pending.add(temp)
        return temp

    def commit(self) -> None:
        """Rename every temporary into place; Ctrl-C during the renames takes effect after them."""
        with INTERRUPTS.deferred():
            if INTERRUPTS.fired.is_set():
                raise KeyboardInterrupt
            for final, temp in self._temps.items():
                os.replace(temp, final)
        self._forget()

    def drop(self, final: str) -> None:
        """Remove the temporary of ``final`` now: an intermediate the work needed, not an output."""
        temp = self._temps.pop(final)
        _remove(temp)
        INTERRUPTS.pending.discard(temp)

    def discard(self) -> None:
        for temp in self._temps.values():
            _remove(temp)
        self._forget()

    def _forget(self):
        for temp in self._temps.values():
            INTERRUPTS.pending.discard(temp)
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


# ----------------------------------------------------------------------------------------------------- Ctrl-C
#: seconds a command has, after Ctrl-C, to unwind (finally blocks, sessions closed) before it is ended anyway
INTERRUPT_GRACE = 5.0


class Interrupts:
    """Ctrl-C during an ``alcs`` command: ``alcs CMD: interrupted``, exit 130, no output half-written, whatever
    TVM makes of the KeyboardInterrupt.

    TVM's FFI turns a KeyboardInterrupt raised in a Python callback into an error of its own (a bare
    ``RuntimeError`` from a Relax mutator), and some of its passes catch every error: FoldConstant then gives up
    folding one constant and the compile goes on for minutes. So the interrupt is recorded here when it arrives:
    any error after it is reported as the interrupt, a command that finishes after it still exits 130 without
    committing its outputs, and one that has not stopped ``INTERRUPT_GRACE`` seconds later (or at a second
    Ctrl-C) is ended, its unfinished outputs removed. From the interrupt on, what the process writes to stderr
    goes nowhere (TVM's C++ warns about the half-built state it unwinds, "BlockBuilder destroyed with remaining
    blocks"): the one line saying it was interrupted is all the user needs."""

    def __init__(self):
        self.fired = threading.Event()
        self.pending: set[str] = set()  # temporaries of OutputFiles not yet committed or removed
        self.command = "alcs"
        self._done = threading.Event()
        self._committing = 0
        self._reported = threading.Lock()
        self._said = False
        self._previous = None
        self._stderr = None  # the real stderr while fd 2 is silenced

    def install(self, command: str) -> None:
        """Take over SIGINT for one command (only from the main thread, and only if SIGINT has Python's default
        handler: an ignored or an application's own handler stays)."""
        self._unsilence()
        self.command = command
        self.fired.clear()
        self._done.clear()
        self._said = False
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def uninstall(self) -> None:
        self._done.set()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    @contextlib.contextmanager
    def deferred(self):
        """A block Ctrl-C does not break into (renaming outputs into place); the interrupt counts after it."""
        self._committing += 1
        try:
            yield
        finally:
            self._committing -= 1

    def report(self) -> None:
        """Write ``alcs CMD: interrupted`` to the real stderr once, whichever thread gets there first."""
        with self._reported:
            if self._said:
                return
            self._said = True
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            line = f"alcs {self.command}: interrupted\n"
            if self._stderr is not None:
                with contextlib.suppress(OSError):
                    os.write(self._stderr, line.encode())
            else:
                print(line, end="", file=sys.stderr, flush=True)

    def settle(self, err: BaseException | None) -> None:
        """After the report: drop what the error keeps alive (TVM objects whose destructors warn) while stderr is
        still silenced, then give stderr back."""
        if err is not None and err.__traceback__ is not None:
            traceback.clear_frames(err.__traceback__)
            err.__traceback__ = None
        del err
        gc.collect()
        self._unsilence()

    def _silence(self) -> None:
        if self._stderr is not None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()  # what was written before Ctrl-C still goes out
        try:
            saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:
            return
        self._stderr = saved

    def _unsilence(self) -> None:
        if self._stderr is None:
            return
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(self._stderr, 2)
        os.close(self._stderr)
        self._stderr = None

    def _on_sigint(self, signum, frame):
        first = not self.fired.is_set()
        self.fired.set()
        self._silence()
        if first:
            threading.Thread(target=self._deadline, name="alcs-interrupt", daemon=True).start()
        elif not self._committing:  # a second Ctrl-C: the user does not want to wait for the unwinding
            self._end()
        if not self._committing:  # renames into place finish first; the interrupt counts after them
            raise KeyboardInterrupt

    def _deadline(self):
        if self._done.wait(INTERRUPT_GRACE):
            return
        self._end()

    def _end(self):
        """End the process now: remove the unfinished outputs, say so, exit 130."""
        waited = time.monotonic()
        while self._committing and time.monotonic() - waited < INTERRUPT_GRACE:
            time.sleep(0.01)  # renames into place take microseconds; let them finish
        for temp in list(self.pending):
            _remove(temp)
        self.report()
        os._exit(130)


#: the one per process: the command line runs one command at a time
INTERRUPTS = Interrupts()
