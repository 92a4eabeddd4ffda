"""Remote sessions on RPC devices (the emulated ARM64 device, a phone, a board), with bounded waits.

``connect(tracker="127.0.0.1:9190", key="arm64-qemu")`` asks the tracker for a device, ``connect(rpc="HOST:PORT")``
connects straight to a server started without a tracker. Errors are one line and typed for the CLI:

* nothing listening at the tracker/server address -> ``ConnectionError`` naming ``host:port``;
* the tracker has no server under ``key`` -> ``UnknownKeyError`` (a ``ValueError``) listing the tracker's keys;
* no free device / a device that stops answering -> ``TimeoutError`` (every wait is bounded);
* a device server that dies during a call -> ``ConnectionError`` ("closed the connection during ...");
* a library that is not a whole shared library -> ``ValueError``, before anything is sent (:func:`check_library`).

TVM's RPC client blocks in C++ without a timeout, so remote calls run under :func:`guard`: a watchdog thread that,
when the deadline passes, shuts down this process's sockets to that server, which makes the blocked call fail.

How long a step may take (:class:`StepBudget`, one per session): getting a device and opening the session
``CONNECT_TIMEOUT`` (30 s); a kind of step not yet timed on the session ``FIRST_STEP_TIMEOUT`` (60 s); afterwards
``max(MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR x`` what the same kind of step took before, per unit of work``)`` -
at least 30 s, 10x the expected. A device that freezes is thus given up on in well under a minute, a device that
is merely slow is not, and ``timeout=`` (``--device-timeout``) sets one fixed bound for every step instead.
"""
from __future__ import annotations

import contextlib
import gc
import os
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path

from tvm import rpc as tvm_rpc
from tvm.support import cc

from .defaults import CONNECT_TIMEOUT, FIRST_STEP_TIMEOUT, MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR
from .library_file import check_library, elf_machine
from .tracker import (UnknownKeyError, open_socket, parse_address, request_device, tracker_keys,
                      tracker_summary)
from .toolchain import cross_compile_function

__all__ = ["UnknownKeyError", "parse_address", "tracker_summary", "tracker_keys", "connect", "guard",
           "upload_library", "end_dropped_sessions", "check_library", "elf_machine", "StepBudget", "CONNECT_TIMEOUT",
           "FIRST_STEP_TIMEOUT", "MIN_STEP_TIMEOUT", "STEP_TIMEOUT_FACTOR"]

_LOST = ("kShutdown", "Connection reset", "Broken pipe", "connection closed", "Socket", "socket", "RPCSession",
         "EOF", "closed")


# ---------------------------------------------------------------------------------------------- the watchdog
def _shutdown_sockets_to(addr: tuple[str, int]) -> int:
    """Shut down every TCP socket of this process connected to ``addr``; return how many."""
    import psutil

    try:
        ip = socket.gethostbyname(addr[0])
    except OSError:
        ip = addr[0]
    count = 0
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.fd is None or conn.fd < 0 or not conn.raddr:
            continue
        if conn.raddr.port == addr[1] and conn.raddr.ip in (ip, addr[0], f"::ffff:{ip}"):
            with contextlib.suppress(OSError):
                sock = socket.socket(fileno=os.dup(conn.fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                    count += 1
                finally:
                    sock.close()
    return count


def _describe(session) -> str:
    addr = getattr(session, "alcs_addr", None)
    key = getattr(session, "alcs_key", "")
    where = f"{addr[0]}:{addr[1]}" if addr else "?"
    return f"device {key!r} at {where}" if key else f"device at {where}"


def _seconds(value: float) -> str:
    return f"{value:g}" if value == int(value) else f"{value:.1f}"


class StepBudget:
    """How long each remote step of one session may take before the device counts as frozen.

    With ``fixed`` (``--device-timeout``) every step gets that many seconds (0: no bound). Otherwise the bound is
    learnt per kind of step ("upload", "inference", ...): ``FIRST_STEP_TIMEOUT`` for a kind not yet timed, then
    ``max(MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR x expected)``, the expected time being the slowest time per unit of
    work that kind took before times the step's units (bytes for an upload). A caller that knows a step's
    expected time from another kind (timing = repeat x number inferences) passes it as ``expected``. A frozen
    phone thus blocks its user for about half a minute, not the five a fixed default took, and a slow device or
    a long measurement is not mistaken for a frozen one."""

    def __init__(self, fixed: float | None = None, reason: str = "--device-timeout"):
        self.fixed, self.reason = fixed, reason
        self._per_unit: dict[str, float] = {}

    def per_unit(self, kind: str) -> float | None:
        """The slowest seconds per unit a ``kind`` of step took on this session so far (None: never timed)."""
        return self._per_unit.get(kind)

    def bound(self, kind: str, units: float = 1.0, expected: float | None = None) -> tuple[float, str]:
        """``(seconds, why)``: the bound on the next ``kind`` step and how it was chosen, for the error message."""
        if self.fixed is not None:
            return self.fixed, self.reason
        if expected is None:
            rate = self._per_unit.get(kind)
            if rate is None:
                return FIRST_STEP_TIMEOUT, f"the bound on a first {kind}; --device-timeout S to wait longer"
            expected = rate * units
        seconds = max(MIN_STEP_TIMEOUT, STEP_TIMEOUT_FACTOR * expected)
        return seconds, (f"{STEP_TIMEOUT_FACTOR:g}x the expected {expected:.2g} s, at least "
                         f"{MIN_STEP_TIMEOUT:g} s; --device-timeout S to wait longer")

    def record(self, kind: str, seconds: float, units: float = 1.0) -> None:
        rate = seconds / max(units, 1e-9)
        self._per_unit[kind] = max(self._per_unit.get(kind, 0.0), rate)


def session_budget(session) -> StepBudget:
    """The :class:`StepBudget` of a session from :func:`connect` (a session opened otherwise gets a learning one)."""
    budget = getattr(session, "alcs_budget", None)
    if budget is None:
        budget = StepBudget(getattr(session, "alcs_timeout", None))
        with contextlib.suppress(AttributeError):
            session.alcs_budget = budget
    return budget


@contextlib.contextmanager
def guard(session, what: str, timeout: float | None = None, *, kind: str | None = None, units: float = 1.0,
          expected: float | None = None):
    """Run remote calls on ``session`` with a deadline and one-line errors.

    The deadline is ``timeout`` seconds when given, else the session's :class:`StepBudget` for a ``kind`` (default
    ``what``) of step with ``units`` of work or an ``expected`` duration; the time the step took is recorded for
    the next step of its kind. A call still blocked at the deadline is aborted by shutting the session's socket,
    and raises ``TimeoutError``; a server that goes away raises ``ConnectionError``.
    """
    kind = kind or what
    budget = session_budget(session)
    if timeout is not None:
        why = "--device-timeout"
    else:
        timeout, why = budget.bound(kind, units, expected)
    addr = getattr(session, "alcs_addr", None)
    fired = threading.Event()

    def _fire():
        fired.set()
        if addr:
            _shutdown_sockets_to(addr)

    timer = threading.Timer(timeout, _fire) if timeout and addr else None
    if timer:
        timer.daemon = True
        timer.start()
    started = time.monotonic()
    try:
        yield
    except Exception as err:  # noqa: BLE001 - classify TVM's errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        if fired.is_set():
            raise TimeoutError(f"{_describe(session)} did not answer within {_seconds(timeout)} s during {what} "
                               f"({why}); the session was aborted (is the server alive? `alcs device status`)") \
                from None
        if "RPCSessionTimeoutError" in str(err):
            raise TimeoutError(f"{_describe(session)}: the session expired during {what} "
                               f"(increase the device timeout)") from None
        if isinstance(err, (ConnectionError, TimeoutError)):
            raise
        if isinstance(err, OSError) or any(s in str(err) for s in _LOST):
            raise ConnectionError(f"{_describe(session)} closed the connection during {what} "
                                  f"(server killed or crashed?): {first}") from None
        raise
    else:
        budget.record(kind, time.monotonic() - started, units)
    finally:
        if timer:
            timer.cancel()


# ------------------------------------------------------------------------------------------------- sessions
def connect(tracker: str | None = None, key: str | None = None, *, rpc: str | None = None,
            timeout: float | None = None, session_timeout: float | None = None):
    """A ``tvm.rpc`` session on a device.

    ``connect(tracker="HOST:PORT", key="arm64-qemu")``: ask the tracker for a free device registered under
    ``key``. ``connect(rpc="HOST:PORT")``: connect straight to a server that runs without a tracker.

    ``timeout=None`` (default): getting the device and opening the session may take ``CONNECT_TIMEOUT`` s, each
    later remote step what the session's :class:`StepBudget` learns. ``timeout=S``: S s for getting the device and
    for every step (the handshake at most 60 s), and ``session_timeout`` (default S) makes the server end the
    session after that many seconds. The session carries ``alcs_addr`` (server host, port), ``alcs_key``,
    ``alcs_timeout`` (``timeout``) and ``alcs_budget``.
    """
    if (tracker is None) == (rpc is None):
        raise ValueError("give either tracker=HOST:PORT (with key=...) or rpc=HOST:PORT")
    wait = CONNECT_TIMEOUT if timeout is None else timeout
    if session_timeout is None:
        session_timeout = timeout or 0  # learnt bounds: the server does not end a long profile halfway
    if tracker is not None:
        if not key:
            raise ValueError("a device key is needed with a tracker (e.g. key='arm64-qemu')")
        url, port, matchkey = request_device(tracker, key, wait)
    else:
        url, port = parse_address(rpc, "RPC server address")
        open_socket((url, port), "RPC server", min(wait, 10.0)).close()  # clear error if nothing listens
        matchkey = key or ""

    class _Pending:  # lets guard() describe/abort the connect itself
        alcs_addr, alcs_key, alcs_timeout = (url, port), key or "", timeout
        alcs_budget = StepBudget(min(wait, 60.0), "--device-timeout" if timeout is not None else
                                 "the bound on connecting; --device-timeout S to wait longer")

    try:
        with guard(_Pending, "connect"):
            session = tvm_rpc.connect(url, port, matchkey, session_timeout=session_timeout or 0)
    except (ConnectionError, TimeoutError):
        raise
    except Exception as err:  # noqa: BLE001
        if "mismatch" in str(err).lower() or "matches key" in str(err):
            raise ConnectionError(f"RPC server at {url}:{port} expects a key (it is registered with a tracker): "
                                  f"use tracker=HOST:PORT and key=KEY") from None
        raise ConnectionError(f"cannot open a session with the RPC server at {url}:{port}: "
                              f"{str(err).strip().splitlines()[-1] if str(err).strip() else err}") from None
    session.alcs_addr = (url, port)
    session.alcs_key = key or ""
    session.alcs_timeout = timeout
    session.alcs_budget = StepBudget(timeout)
    return session


def end_dropped_sessions() -> None:
    """End the sessions whose last reference the caller has just dropped, now.

    A session stays open, and its device busy for every other client, until its last reference is gone. TVM's
    ``relax.VirtualMachine`` keeps the module it runs in a reference cycle, so a VM made on a remote library keeps
    that library's session alive until the garbage collector next runs: a second client of the device (another
    ``run_model`` call, another command) would wait for it, up to the session timeout."""
    gc.collect()


def _link_tar(tar_path: Path, out_dir: Path) -> Path:
    """Link the objects of a ``export_library(...tar)`` archive into a ``.so`` with the matching compiler."""
    with tarfile.open(tar_path) as tar:
        tar.extractall(out_dir, filter="data")
    objects = [str(p) for p in sorted(out_dir.iterdir()) if p.suffix in (".o", ".obj")]
    if not objects:
        raise ValueError(f"{tar_path} has no object files")
    out = out_dir / (tar_path.stem + ".so")
    if elf_machine(objects[0]) == "aarch64":
        cross_compile_function()(str(out), objects)
    else:
        cc.create_shared(str(out), objects)
    return out


def upload_library(session, lib_path, timeout: float | None = None):
    """Upload a compiled library (``.so``, or a ``.tar`` that is linked here first) and load it on the device.

    Returns the remote ``tvm.runtime.Module``; e.g. ``tvm.relax.VirtualMachine(mod, session.cpu())``. The library
    is checked first (:func:`check_library`): a cut-short one would kill the server's session, and with it the
    server (it stays up but unregistered).
    """
    lib_path = Path(lib_path)
    check_library(lib_path)
    with tempfile.TemporaryDirectory(prefix="alcs-upload-") as tmp:
        if lib_path.suffix == ".tar":
            lib_path = _link_tar(lib_path, Path(tmp))
            check_library(lib_path)
        remote_name = f"{uuid.uuid4().hex[:8]}_{lib_path.name}"
        size = lib_path.stat().st_size
        with guard(session, f"upload of {lib_path.name}", timeout, kind="upload", units=size):
            session.upload(str(lib_path), remote_name)
        try:
            with guard(session, f"load of {lib_path.name}", timeout, kind="load", units=size):
                return session.load_module(remote_name)
        except (ConnectionError, TimeoutError):
            raise
        except Exception as err:  # noqa: BLE001
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            raise ValueError(f"{_describe(session)} could not load {lib_path.name} (an {elf_machine(lib_path)} "
                             f"library; built for another architecture?): {lines[-1][:300] if lines else err}") \
                from None
