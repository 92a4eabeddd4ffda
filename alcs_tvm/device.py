"""The emulated ARM64 phone, the RPC tracker and the RPC servers (``alcs device setup|start|stop|status``).

There is no ARM hardware on the build machines, so an ARM64 "phone" is emulated with qemu-user:

* ``setup()`` installs the Debian packages it needs (``qemu-user-static``, ``mmdebstrap`` and the aarch64 cross
  toolchain), builds an arm64 Debian bookworm userland with Python 3.11 (``mmdebstrap --variant=extract``: nothing
  runs under emulation, no binfmt or chroot needed), downloads the aarch64 cp311 wheels of TVM's runtime and its
  dependencies and unzips them into the userland, and compiles its Python modules to bytecode (the device's
  processes then import TVM without compiling it under qemu). Everything is cached under ``cache_dir()``
  (``~/.cache/alcs_tvm`` or ``$ALCS_TVM_CACHE``); a second call only checks a stamp file.
* The device's Python runs as ``qemu-aarch64-static -L ROOTFS ROOTFS/usr/bin/python3.11`` with ``QEMU_CPU`` set to
  a phone core and ``TVM_USE_RUNTIME_LIB=1`` (runtime-only import). TVM's RPC server re-executes
  ``sys.executable`` for its worker, which the host kernel cannot run without binfmt; a ``.pth`` file in the
  userland sets ``sys.executable`` from ``$ALCS_DEVICE_PYTHON``, a host shell script that re-enters qemu.
* ``start()`` runs a TVM RPC tracker on 127.0.0.1 (port 9190), one or more emulated ARM64 RPC servers registered
  under a key (``arm64-qemu``) and a local x86 RPC server (key ``x86-local``). Each process is its own process
  group, so ``stop()`` also ends the server's worker and session processes (no orphaned qemu). PIDs and ports are
  kept in a JSON state file (``cache_dir()/device-state.json`` unless ``state_path`` is given).

Emulated timings are *not* phone timings: use the device for correctness and for plumbing; measure on a phone.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .files import cache_dir, file_lock, write_json_atomic
from .toolchain import CROSS_PACKAGES, ensure_debian_packages
from .tracker import tracker_summary

__all__ = [
    "DEFAULT_TRACKER_PORT", "DEFAULT_KEY", "X86_KEY", "QEMU_CPUS", "DeviceImage",
    "default_state_path", "setup",
    "start", "stop", "started", "status", "start_tracker", "start_arm64_server", "start_x86_server", "stop_process",
    "wait_for_server", "tracker_addr",
]

DEFAULT_TRACKER_PORT = 9190
DEFAULT_KEY = "arm64-qemu"
X86_KEY = "x86-local"
DEFAULT_QEMU_CPU = "cortex-a76"
#: short names accepted for --qemu-cpu (any CPU qemu knows is accepted too).
QEMU_CPUS = {"a53": "cortex-a53", "a72": "cortex-a72", "a76": "cortex-a76"}

SUITE = "bookworm"
DEVICE_PACKAGES = ("qemu-user-static", "mmdebstrap") + CROSS_PACKAGES
QEMU = "qemu-aarch64-static"
#: bump when the recipe changes, so cached images are rebuilt.
RECIPE_VERSION = 1
_WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")


def default_state_path() -> Path:
    return cache_dir() / "device-state.json"


def _log(verbose, msg):
    if verbose:
        print(f"[alcs device] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- the image
@dataclass(frozen=True)
class DeviceImage:
    """A built device image: the arm64 userland and the host wrapper that runs its Python under qemu."""

    root: Path      # cache_dir()/arm64-bookworm
    rootfs: Path    # the arm64 Debian userland
    python: Path    # host shell script: runs the device's python3.11 under qemu (also its sys.executable)
    qemu: str       # path of qemu-aarch64-static

    def env(self, qemu_cpu: str = DEFAULT_QEMU_CPU) -> dict:
        """Environment for running the device's Python."""
        env = dict(os.environ)
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD"):
            env.pop(var, None)
        env.update(QEMU_CPU=_qemu_cpu(qemu_cpu), TVM_USE_RUNTIME_LIB="1", ALCS_DEVICE_PYTHON=str(self.python),
                   PYTHONDONTWRITEBYTECODE="1", PYTHONNOUSERSITE="1")
        return env


def _qemu_cpu(name: str) -> str:
    return QEMU_CPUS.get(name, name)


def _debian_mirror() -> str:
    """The Debian mirror apt is configured with (this machine may only reach that one)."""
    if os.environ.get("ALCS_DEBIAN_MIRROR"):
        return os.environ["ALCS_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        k, v = line.split(":", 1)
                        fields[k.strip().lower()] = v.strip()
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and SUITE in suites:
                    for uri in fields.get("uris", "").split():
                        if "security" not in uri:
                            return uri
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = [p for p in parts[1:] if not p.startswith("[")]
                    if len(rest) >= 2 and rest[1] == SUITE and "security" not in rest[0]:
                        return rest[0]
    return "http://deb.debian.org/debian"


def _host_versions() -> dict:
    from importlib import metadata
    pins = {}
    for dist, pkg in (("apache-tvm", "apache-tvm"), ("apache-tvm-ffi", "apache-tvm-ffi"), ("numpy", "numpy")):
        try:
            pins[pkg] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    pins.setdefault("apache-tvm", "0.27.0.post1")
    pins.setdefault("apache-tvm-ffi", "0.1.14.post0")
    return pins


def _wheel_requirements() -> list[str]:
    pins = _host_versions()
    reqs = [f"{name}=={ver}" for name, ver in sorted(pins.items())]
    return reqs + ["ml_dtypes", "typing_extensions", "cloudpickle", "psutil"]


def _image_paths(root: Path) -> DeviceImage:
    return DeviceImage(root=root, rootfs=root / "rootfs", python=root / "device-python",
                       qemu=shutil.which(QEMU) or f"/usr/bin/{QEMU}")


def _write_wrapper(image: DeviceImage) -> None:
    text = ("#!/bin/sh\n"
            "# The emulated ARM64 device's python3.11 (generated by alcs_tvm.device; also its sys.executable)\n"
            f"exec {image.qemu} -L '{image.rootfs}' '{image.rootfs}/usr/bin/python3.11' \"$@\"\n")
    # a fresh temporary (O_EXCL) beside it: a fixed name could be a planted symlink, followed on write
    fd, tmp = tempfile.mkstemp(prefix=".device-python-", dir=image.root)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, image.python)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def setup(force: bool = False, verbose: bool = True) -> DeviceImage:
    """Build (or find cached) the emulated ARM64 device image. Idempotent; seconds when cached."""
    ensure_debian_packages(DEVICE_PACKAGES, verbose=verbose)
    root = cache_dir() / f"arm64-{SUITE}"
    image = _image_paths(root)
    stamp_path = root / "stamp.json"
    want = {"recipe": RECIPE_VERSION, "suite": SUITE, "wheels": _wheel_requirements()}
    with file_lock(cache_dir() / ".device-setup.lock"):
        try:
            have = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            have = None
        if not force and have == want and (image.rootfs / "usr/bin/python3.11").exists():
            _write_wrapper(image)  # cheap; keeps the qemu path current
            _compile_bytecode(image, verbose)  # images built before the bytecode step get it once
            _log(verbose, f"device image cached at {root}")
            return image
        t0 = time.time()
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        build = Path(tempfile.mkdtemp(prefix="build-", dir=root))
        rootfs = build / "rootfs"
        mirror = _debian_mirror()
        _log(verbose, f"building arm64 {SUITE} userland from {mirror}")
        res = subprocess.run(["mmdebstrap", "--mode=auto", "--variant=extract", "--architectures=arm64",
                              "--include=python3.11,libstdc++6", SUITE, str(rootfs), mirror],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if res.returncode != 0 or not (rootfs / "usr/bin/python3.11").exists():
            raise RuntimeError(f"mmdebstrap failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        wheels = build / "wheels"
        reqs = _wheel_requirements()
        _log(verbose, f"downloading aarch64 wheels: {' '.join(reqs)}")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
               "--implementation", "cp", "-d", str(wheels)]
        for plat in _WHEEL_PLATFORMS:
            cmd += ["--platform", plat]
        res = subprocess.run(cmd + reqs, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"pip download of aarch64 wheels failed:\n{res.stderr[-3000:]}")
        site = rootfs / "usr/local/lib/python3.11/dist-packages"
        site.mkdir(parents=True, exist_ok=True)
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(site)
        # Make the device's sys.executable a host-runnable wrapper when $ALCS_DEVICE_PYTHON is set.
        (site / "zz_alcs_device_executable.pth").write_text(
            "import os, sys; sys.executable = os.environ.get('ALCS_DEVICE_PYTHON') or sys.executable\n")
        shutil.rmtree(wheels)
        rootfs.rename(image.rootfs)
        shutil.rmtree(build)
        _write_wrapper(image)
        _compile_bytecode(image, verbose)
        # Smoke test: the device imports TVM's runtime and sees the wrapper as sys.executable.
        res = subprocess.run([str(image.python), "-c", "import sys, tvm, tvm.rpc.server; print(sys.executable)"],
                             env=image.env(), capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or res.stdout.strip() != str(image.python):
            raise RuntimeError(f"device image smoke test failed:\n{res.stdout[-1000:]}{res.stderr[-3000:]}")
        stamp_path.write_text(json.dumps(want, indent=1))
        _log(verbose, f"device image ready at {root} ({time.time() - t0:.1f} s)")
        return image


#: the device's Python (``usr/bin/python3.11`` in the userland); its bytecode is this version's
DEVICE_PYTHON_VERSION = (3, 11)


def _compile_bytecode(image: DeviceImage, verbose: bool) -> None:
    """Compile the userland's Python modules (the standard library and the unzipped wheels) to bytecode, once.

    The device's processes do not write bytecode (``PYTHONDONTWRITEBYTECODE``: the image stays as built), so
    without it every emulated server compiles TVM's Python package under qemu again, most of its
    start-up time. Bytecode depends on the Python version only, not on the CPU: a host Python of the device's
    version compiles it natively, in seconds; another one leaves it to the device's Python under qemu."""
    marker = image.root / "bytecode.json"
    if marker.exists():
        return
    t0 = time.time()
    same_version = sys.version_info[:2] == DEVICE_PYTHON_VERSION
    python = sys.executable if same_version else str(image.python)
    dirs = [image.rootfs / "usr/lib/python3.11", image.rootfs / "usr/local/lib/python3.11/dist-packages"]
    res = subprocess.run([python, "-m", "compileall", "-q", "-j", "0", *map(str, dirs)],
                         env=image.env() if not same_version else None, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True)
    if res.returncode != 0:  # a module that does not compile fails when imported, as it would without this step
        _log(verbose, f"some device modules did not compile to bytecode:\n{res.stdout[-2000:]}{res.stderr[-1000:]}")
    write_json_atomic(marker, {"python": python, "exit": res.returncode}, prefix=".bytecode-")
    _log(verbose, f"device bytecode compiled ({time.time() - t0:.1f} s)")


# -------------------------------------------------------------------------------------------------- processes
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this Python process (reaped on stop)


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        state = {}
    state.setdefault("tracker", None)
    state.setdefault("servers", [])
    return state


def _save_state(path: Path, state: dict) -> None:
    # through a fresh temporary in the same directory (mkstemp, O_EXCL): a fixed "<state>.tmp" would be followed
    # if someone made it a symlink, overwriting whatever it points to
    write_json_atomic(path, state, prefix=f".{Path(path).name}-")


def _proc_start_time(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(entry: dict | None) -> bool:
    """True when the process recorded in ``entry`` still runs (same PID *and* same start time)."""
    if not entry:
        return False
    pid = entry["pid"]
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False
    start = _proc_start_time(pid)
    if start is None or start != entry.get("start_time"):
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stopped(entry: dict | None) -> bool:
    """True when a process of the recorded process group is stopped (SIGSTOP, a debugger): it runs but cannot
    answer. (TVM's tracker serves from a worker process in its group.)"""
    return bool(entry) and any(state in ("T", "t") for _, state in _group_members(entry["pid"]))


def _group_members(pgid: int):
    """``(/proc entry, state letter)`` of every process in process group ``pgid``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            yield proc, fields[0]


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets that listen on ``port`` (any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _listens(entry: dict) -> bool:
    """Whether a process of ``entry``'s process group listens on ``entry["port"]``.

    "The port is taken" is not enough: another test session or `alcs device start` may hold it while this
    process failed to bind it (then it exits and is started again on another port)."""
    inodes = _listening_inodes(entry["port"])
    if not inodes:
        return False
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc, _ in _group_members(entry["pid"]):
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(fd) in targets:
                    return True
    return False


def _free_port(start: int, taken=()) -> int:
    for port in range(start, start + 500):
        if port not in taken and _port_free(port):
            return port
    raise RuntimeError(f"no free TCP port in [{start}, {start + 500})")


def _spawn(cmd, env, log_path: Path, kind: str, **info) -> dict:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log_offset = log.tell()  # the log is appended to: this process's lines start here
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(log_path.parent))
    _CHILDREN[proc.pid] = proc
    start_time = None
    for _ in range(100):
        start_time = _proc_start_time(proc.pid)
        if start_time is not None:
            break
        time.sleep(0.01)
    return dict(kind=kind, pid=proc.pid, start_time=start_time, log=str(log_path), log_offset=log_offset, **info)


def _log_tail(entry, n=15) -> str:
    try:
        with open(entry["log"], "rb") as fh:
            fh.seek(entry.get("log_offset", 0))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop_process(entry: dict | None, grace: float = 3.0) -> bool:
    """Stop a recorded tracker/server and its whole process group (worker, sessions). True if it was running."""
    if not entry:
        return False
    was_alive = _alive(entry)
    pid = entry["pid"]
    if was_alive:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
                os.killpg(pid, signal.SIGCONT)  # a stopped (frozen) process must run to handle SIGTERM
            deadline = time.time() + grace
            while time.time() < deadline and _group_alive(pid):
                _reap(pid)
                time.sleep(0.05)
            if not _group_alive(pid):
                break
    _reap(pid)
    return was_alive


def _group_alive(pgid: int) -> bool:
    """True while a process of process group ``pgid`` still runs any thread.

    A multi-threaded process's leader turns zombie before its other threads finish exiting, and until the last
    one has, the process's sockets stay open: the tracker's listening port is not free yet."""
    return any(state != "Z" or _threads_running(proc) for proc, state in _group_members(pgid))


def _threads_running(proc: Path) -> bool:
    for task in (proc / "task").glob("*"):
        try:
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except OSError:
            continue
    return False


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.05)
            _CHILDREN.pop(pid, None)


def tracker_addr(entry) -> str:
    return f"{entry['host']}:{entry['port']}"


def start_tracker(port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1", log_dir: Path | None = None,
                  timeout: float = 30.0) -> dict:
    """Start a TVM RPC tracker on ``host:port``; return its state entry once it answers."""
    if not _port_free(port, host):
        raise ConnectionError(f"port {host}:{port} is already in use; choose another --tracker-port")
    log_dir = Path(log_dir or cache_dir() / "logs")
    cmd = _host_module_cmd("tvm.exec.rpc_tracker") + ["--host", host, "--port", str(port), "--port-end",
                                                        str(port + 1)]
    entry = _spawn(cmd, _host_env(), log_dir / f"tracker-{port}.log", "tracker", host=host, port=port)
    deadline = time.time() + timeout
    while True:
        # listening first: an answer on the port could otherwise come from another tracker that holds it
        if _listens(entry):
            with contextlib.suppress(ConnectionError):
                tracker_summary(tracker_addr(entry), timeout=2)
                return entry
        if not _alive(entry) or time.time() > deadline:
            stop_process(entry)
            if _port_lost(entry):
                raise ConnectionError(f"port {host}:{port} was taken before the tracker bound it; choose another "
                                      f"--tracker-port")
            raise RuntimeError(f"RPC tracker on {host}:{port} did not start:\n{_log_tail(entry)}")
        time.sleep(0.2)


def _host_module_cmd(module: str) -> list[str]:
    """``python -m MODULE`` for a TVM entry point run by this host's Python, TVM imported without torch
    (:mod:`alcs_tvm.startup`)."""
    return [sys.executable, "-m", "alcs_tvm.startup", module]


def _host_env() -> dict:
    """This process's environment, with this package importable also when it runs from a source tree (a
    site-packages directory is never put on ``PYTHONPATH``: its packages would shadow the standard library's)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _server_cmd(launcher: list[str], tracker: str | None, key: str, port: int):
    """``launcher`` runs ``tvm.exec.rpc_server``: the device's ``python -m`` or :func:`_host_module_cmd`."""
    cmd = launcher + ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    if tracker:  # without a tracker the server is standalone: clients connect with --rpc 127.0.0.1:PORT
        cmd += ["--tracker", tracker, "--key", key]
    return cmd


#: tries at starting a server whose free port another process takes before the server binds it
PORT_ATTEMPTS = 5


def _port_lost(entry: dict) -> bool:
    """Whether the server (or tracker) exited because its port was taken between the check that found it free
    and its own bind: another `alcs device start` or test session scans the same range, and the emulated server
    needs seconds to get to its bind."""
    return not _alive(entry) and "cannot bind to any port" in _log_tail(entry, 40)


def _start_server(spawn, port, taken_ports, wait, timeout) -> dict:
    """``spawn(port)`` -> state entry; without a ``port`` a free one, and another if that one is lost."""
    taken = set(taken_ports)
    for attempt in range(PORT_ATTEMPTS):
        entry = spawn(port or _free_port(9090, taken))
        if not wait:
            return entry
        try:
            wait_for_server(entry, timeout=timeout)
            return entry
        except RuntimeError:
            if port or attempt == PORT_ATTEMPTS - 1 or not _port_lost(entry):
                raise
            taken.add(entry["port"])
    raise AssertionError("unreachable")


def start_arm64_server(tracker: str | None, key: str = DEFAULT_KEY, qemu_cpu: str = DEFAULT_QEMU_CPU,
                       port: int | None = None, image: DeviceImage | None = None, log_dir: Path | None = None,
                       wait: bool = True, timeout: float = 120.0, taken_ports=()) -> dict:
    """Start one emulated ARM64 RPC server registered at ``tracker`` under ``key``; return its state entry.

    With ``tracker=None`` the server is standalone (``connect(rpc="127.0.0.1:PORT")``)."""
    image = image or setup(verbose=False)
    log_dir = Path(log_dir or cache_dir() / "logs")

    def spawn(port):
        launcher = [str(image.python), "-m", "tvm.exec.rpc_server"]
        return _spawn(_server_cmd(launcher, tracker, key, port), image.env(qemu_cpu),
                      log_dir / f"server-{key}-{port}.log", "arm64-qemu", key=key, port=port, tracker=tracker,
                      qemu_cpu=_qemu_cpu(qemu_cpu))

    return _start_server(spawn, port, taken_ports, wait, timeout)


def start_x86_server(tracker: str | None, key: str = X86_KEY, port: int | None = None, log_dir: Path | None = None,
                     wait: bool = True, timeout: float = 60.0, taken_ports=()) -> dict:
    """Start a local (host CPU) RPC server registered at ``tracker`` under ``key``; return its state entry.

    With ``tracker=None`` the server is standalone (``connect(rpc="127.0.0.1:PORT")``)."""
    log_dir = Path(log_dir or cache_dir() / "logs")

    def spawn(port):
        return _spawn(_server_cmd(_host_module_cmd("tvm.exec.rpc_server"), tracker, key, port), _host_env(),
                      log_dir / f"server-{key}-{port}.log", "x86-local", key=key, port=port, tracker=tracker)

    return _start_server(spawn, port, taken_ports, wait, timeout)


def _registered(entry: dict) -> bool:
    """Whether the server in ``entry`` is listed at its tracker (standalone: listens on its port)."""
    tracker, key, port = entry["tracker"], entry["key"], entry["port"]
    if not tracker:
        return _listens(entry)
    try:
        summary = tracker_summary(tracker, timeout=2)
    except (ConnectionError, TimeoutError):
        return False
    return _registered_in(summary, key, port)


def _registered_in(summary: dict, key: str, port: int) -> bool:
    """Whether a tracker's summary lists the server on ``port`` under ``key``. A server whose session worker
    crashed (SIGBUS, SIGSEGV in a model) keeps running with its server loop ended: it is then not listed."""
    return any(item.get("key") == f"server:{key}" and int(item.get("addr", [None, -1])[1]) == port
               for item in summary.get("server_info", []))


#: seconds a tracker has to answer before it counts as frozen (stopped or hung): generous, because a tracker on
#: a host whose cores are all busy (parallel test sessions) answers in seconds, not milliseconds, and a wrongly
#: "frozen" tracker gets restarted under its servers
PROBE_TIMEOUT = 10.0


def _tracker_summary(tracker: dict) -> tuple[dict | None, str]:
    """``(summary, "")`` from a running tracker, or ``(None, why not)`` if it did not answer within
    ``PROBE_TIMEOUT`` s: a stopped or hung tracker still runs, so only asking it tells (a stopped one needs no
    asking)."""
    if _stopped(tracker):
        return None, f"the tracker's process group (pid {tracker['pid']}) is stopped"
    try:
        return tracker_summary(tracker_addr(tracker), timeout=PROBE_TIMEOUT), ""
    except (ConnectionError, TimeoutError) as err:
        return None, str(err)


def wait_for_server(entry: dict, timeout: float = 120.0) -> float:
    """Wait until the server in ``entry`` is registered at its tracker (standalone: listens); return the seconds."""
    t0 = time.time()
    while not _registered(entry):
        if not _alive(entry):
            stop_process(entry)
            raise RuntimeError(f"RPC server {entry['key']} on port {entry['port']} exited:\n{_log_tail(entry)}")
        if time.time() - t0 > timeout:
            stop_process(entry)
            raise TimeoutError(f"RPC server {entry['key']} on port {entry['port']} did not register at "
                               f"{entry['tracker']} within {timeout:.0f} s:\n{_log_tail(entry)}")
        time.sleep(0.25)
    entry["ready_s"] = round(time.time() - t0, 2)
    return time.time() - t0


def start(tracker_port: int = DEFAULT_TRACKER_PORT, key: str = DEFAULT_KEY, num_devices: int = 1,
          qemu_cpu: str = DEFAULT_QEMU_CPU, x86: bool = True, x86_key: str = X86_KEY,
          state_path: Path | str | None = None, timeout: float = 180.0, verbose: bool = True) -> dict:
    """Start (or keep) the tracker, ``num_devices`` emulated ARM64 servers under ``key`` and the x86 server.

    Idempotent: processes from the state file that still run are kept. Returns the state dict:
    ``{"tracker": {...,"host","port","pid"}, "servers": [{"kind","key","port","pid","qemu_cpu",...}, ...]}``.
    """
    state_path = Path(state_path or default_state_path())
    image = setup(verbose=verbose) if num_devices > 0 else None
    with file_lock(state_path.with_suffix(".lock")):
        state = _load_state(state_path)
        log_dir = state_path.parent / "logs"
        tracker = state["tracker"]
        if _alive(tracker) and _tracker_summary(tracker)[0] is None:
            _log(verbose, f"tracker on {tracker_addr(tracker)} (pid {tracker['pid']}) does not answer: restarting it")
            stop_process(tracker)
        if _alive(tracker) and tracker["port"] != tracker_port:
            raise ValueError(f"a tracker from this state file already runs on port {tracker['port']}; "
                             f"stop it first (alcs device stop)")
        if not _alive(tracker):
            for entry in state["servers"]:  # servers of a dead tracker are useless
                stop_process(entry)
            state["servers"] = []
            tracker = state["tracker"] = start_tracker(tracker_port, log_dir=log_dir)
            _log(verbose, f"tracker on {tracker_addr(tracker)} (pid {tracker['pid']})")
        _save_state(state_path, state)
        addr = tracker_addr(tracker)
        summary = _tracker_summary(tracker)[0] or {}
        kept = []
        for entry in state["servers"]:
            if _alive(entry) and entry["tracker"] == addr and not _registered_in(summary, entry["key"], entry["port"]):
                # running but not registered: its server loop ended (a session crashed); only a restart helps
                _log(verbose, f"server {entry['key']} on 127.0.0.1:{entry['port']} (pid {entry['pid']}) is not "
                              f"registered: restarting it")
                stop_process(entry)
            if _alive(entry):
                kept.append(entry)
        state["servers"] = kept
        taken = {e["port"] for e in state["servers"]} | {tracker_port}
        new = []
        have = [e for e in state["servers"] if e["kind"] == "arm64-qemu" and e["key"] == key]
        for _ in range(max(0, num_devices - len(have))):
            entry = start_arm64_server(addr, key, qemu_cpu, image=image, log_dir=log_dir, wait=False,
                                       taken_ports=taken)
            taken.add(entry["port"])
            new.append(entry)
        if x86 and not any(e["kind"] == "x86-local" and e["key"] == x86_key for e in state["servers"]):
            entry = start_x86_server(addr, x86_key, log_dir=log_dir, wait=False, taken_ports=taken)
            taken.add(entry["port"])
            new.append(entry)
        state["servers"] += new
        _save_state(state_path, state)

        def spawn_again(entry):  # the same server on another port
            taken.add(entry["port"])
            if entry["kind"] == "arm64-qemu":
                return start_arm64_server(addr, entry["key"], entry["qemu_cpu"], image=image, log_dir=log_dir,
                                          wait=False, taken_ports=taken)
            return start_x86_server(addr, entry["key"], log_dir=log_dir, wait=False, taken_ports=taken)

        try:
            for i, entry in enumerate(new):
                for attempt in range(3):
                    try:
                        wait_for_server(entry, timeout=timeout)
                        break
                    except RuntimeError as err:
                        # another process bound the free port between our check and the server's bind: the
                        # port race of several starts at once (parallel test sessions); another port settles it
                        if "cannot bind" not in str(err) or attempt == 2:
                            raise
                        replacement = spawn_again(entry)
                        state["servers"] = [replacement if e is entry else e for e in state["servers"]]
                        entry = new[i] = replacement
                _log(verbose, f"server {entry['key']} on 127.0.0.1:{entry['port']} (pid {entry['pid']}"
                              + (f", {entry['qemu_cpu']}" if entry.get("qemu_cpu") else "")
                              + f") ready after {entry['ready_s']} s")
        finally:
            state["servers"] = [e for e in state["servers"] if _alive(e)]
            _save_state(state_path, state)
        return state


def stop(state_path: Path | str | None = None, verbose: bool = True, servers_only: bool = False) -> list[dict]:
    """Stop everything recorded in the state file (servers first, then the tracker); return what was stopped."""
    state_path = Path(state_path or default_state_path())
    with file_lock(state_path.with_suffix(".lock")):
        state = _load_state(state_path)
        stopped = []
        for entry in state["servers"] + ([] if servers_only else [state["tracker"]]):
            if entry and stop_process(entry):
                stopped.append(entry)
                _log(verbose, f"stopped {entry['kind']} pid {entry['pid']} port {entry['port']}")
        state["servers"] = []
        if not servers_only:
            state["tracker"] = None
        _save_state(state_path, state)
        return stopped


@contextlib.contextmanager
def started(state_dir, *, first_port: int = DEFAULT_TRACKER_PORT, x86_key: str = X86_KEY,
            arm64_key: str | None = None):
    """A tracker on the first free port from ``first_port`` with the x86 server under ``x86_key`` (and, with
    ``arm64_key``, one emulated ARM64 device under it), its state in ``state_dir``, for the duration of the block,
    which gets the tracker's ``"127.0.0.1:PORT"``. Everything stops when the block ends, however it ends: while it
    runs, a SIGTERM (a timeout, kill) becomes ``SystemExit``, which would otherwise skip the stop."""
    state_path = Path(state_dir) / "device-state.json"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    taken = set()
    try:
        for attempt in range(PORT_ATTEMPTS):  # another run may take the free port first (see _port_lost)
            port = _free_port(first_port, taken)
            try:
                start(tracker_port=port, key=arm64_key or DEFAULT_KEY, num_devices=1 if arm64_key else 0, x86=True,
                      x86_key=x86_key, state_path=state_path, verbose=False)
                break
            except ConnectionError:
                if attempt == PORT_ATTEMPTS - 1:
                    raise
                taken.add(port)
        yield f"127.0.0.1:{port}"
    finally:
        stop(state_path=state_path, verbose=False)
        signal.signal(signal.SIGTERM, previous)


def status(state_path: Path | str | None = None) -> dict:
    """The state file's processes with ``alive``/``registered`` flags, plus the tracker's key counts.

    The tracker is asked for its summary (at most ``PROBE_TIMEOUT`` s): ``answering`` says whether it did (with
    ``error`` when not), ``stopped`` whether its process is stopped. A server's ``registered`` is None when the
    tracker did not answer (unknown)."""
    state = _load_state(Path(state_path or default_state_path()))
    tracker = state["tracker"]
    out = {"tracker": None, "servers": [], "keys": {}}
    summary, addr = None, None
    if tracker:
        addr = tracker_addr(tracker)
        alive = _alive(tracker)
        out["tracker"] = dict(tracker, alive=alive, answering=False, stopped=alive and _stopped(tracker))
        if alive:
            summary, error = _tracker_summary(tracker)
            out["tracker"]["answering"] = summary is not None
            if error:
                out["tracker"]["error"] = error
        for item in (summary or {}).get("server_info", []):
            key = str(item.get("key", ""))
            if key.startswith("server:"):
                out["keys"][key[len("server:"):]] = out["keys"].get(key[len("server:"):], 0) + 1
    for entry in state["servers"]:
        alive = _alive(entry)
        if not alive:
            registered = False
        elif entry["tracker"] == addr:
            registered = None if summary is None else _registered_in(summary, entry["key"], entry["port"])
        else:
            registered = _registered(entry)
        out["servers"].append(dict(entry, alive=alive, registered=registered))
    return out
