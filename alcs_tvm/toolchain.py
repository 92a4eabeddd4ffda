"""The host's build tools: Debian packages installed on demand, the aarch64 cross compiler, and LLVM's machine
code analyser (``llvm-mca``, whose scheduling models of phone cores the estimator uses)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .files import cache_dir, file_lock

__all__ = ["ensure_debian_packages", "ensure_cross_toolchain", "cross_compile_function", "ensure_llvm_mca",
           "CROSS_PACKAGES", "CROSS_CXX", "LLVM_MCA_PACKAGE", "LLVM_MCA"]

CROSS_PACKAGES = ("g++-aarch64-linux-gnu", "binutils-aarch64-linux-gnu")
CROSS_CXX = "aarch64-linux-gnu-g++"
# LLVM 19 is the oldest Debian release of llvm-mca whose Neoverse N1 model describes the by-element FMLA and the
# load pipes of the Cortex-A76 design; Debian 12 ships it as a versioned package
LLVM_MCA_PACKAGE = "llvm-19"
LLVM_MCA = "llvm-mca-19"


def _log(verbose, msg):
    if verbose:
        print(f"[alcs] {msg}", file=sys.stderr, flush=True)


_APT_UPDATED = False


def _missing_debs(packages) -> list[str]:
    missing = []
    for pkg in packages:
        res = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if res.returncode != 0 or "install ok installed" not in res.stdout:
            missing.append(pkg)
    return missing


def ensure_debian_packages(packages, verbose: bool = True) -> None:
    """Install the Debian ``packages`` that are missing (``apt-get update`` once per process, then install).

    Two processes that both find packages missing (parallel test workers, two ``alcs`` commands on a fresh
    machine) take turns: ``apt-get update`` fails at once on the lists lock another ``apt-get`` holds, whatever
    its lock timeout."""
    if not _missing_debs(packages):
        return
    with file_lock(cache_dir() / ".apt.lock"):
        _install_missing(packages, verbose)


def _install_missing(packages, verbose: bool) -> None:
    global _APT_UPDATED
    missing = _missing_debs(packages)  # again: the process that held the lock may have installed them
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"missing Debian packages {' '.join(missing)} and no apt-get on this machine")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        raise PermissionError(f"missing Debian packages {' '.join(missing)}; install them as root: "
                              f"apt-get install -y {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    if not _APT_UPDATED:
        _log(verbose, "apt-get update")
        subprocess.run(sudo + ["apt-get", *lock, "update", "-q"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        _APT_UPDATED = True
    _log(verbose, f"apt-get install -y {' '.join(missing)}")
    res = subprocess.run(sudo + ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *missing],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"apt-get install {' '.join(missing)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")


def ensure_cross_toolchain(verbose: bool = True) -> str:
    """Make sure the aarch64 cross toolchain is installed; return the path of ``aarch64-linux-gnu-g++``.

    Use it before cross compiling, e.g.
    ``lib.export_library(path, fcompile=tvm.support.cc.cross_compiler(ensure_cross_toolchain()))``.
    """
    path = shutil.which(CROSS_CXX)
    if path is None or _missing_debs(CROSS_PACKAGES):
        ensure_debian_packages(CROSS_PACKAGES, verbose=verbose)
        path = shutil.which(CROSS_CXX)
    if path is None:
        raise RuntimeError(f"{CROSS_CXX} not found after installing {' '.join(CROSS_PACKAGES)}")
    return path


def cross_compile_function(cross_compiler: str | None = None):
    """TVM's ``fcompile`` linking aarch64 objects with ``cross_compiler`` (default: the Debian cross g++,
    installed if missing)."""
    from tvm.support import cc  # deferred: this module is also used where TVM is not needed

    return cc.cross_compiler(cross_compiler or ensure_cross_toolchain(verbose=False))


def ensure_llvm_mca(verbose: bool = True) -> str:
    """Make sure LLVM 19's ``llvm-mca`` is installed (Debian package ``llvm-19``); return its path."""
    path = shutil.which(LLVM_MCA)
    if path is None:
        ensure_debian_packages([LLVM_MCA_PACKAGE], verbose=verbose)
        path = shutil.which(LLVM_MCA)
    if path is None:
        raise RuntimeError(f"{LLVM_MCA} not found after installing {LLVM_MCA_PACKAGE}")
    return path
