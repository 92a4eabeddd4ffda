"""Shared fixtures: the RPC tracker with one emulated ARM64 device and the local x86 server (session scoped), the
aarch64 cross compiler; every test starts from the same global random state; a test that uses the tracker is
marked ``device``. (Shared helper functions are in helpers.py.)

``rpc_devices`` runs ``alcs_tvm.device.setup()`` (cached under ``$ALCS_TVM_CACHE`` or ``~/.cache/alcs_tvm``; the
first run on a fresh machine installs packages and builds the device image, ~20-60 s), starts a tracker on a
free port with its own state file (so it never touches a user's ``alcs device start``), and stops everything at
the end of the session, checking that no process of theirs is left.

The suite runs in two pytest-xdist worker processes (setup.cfg's ``addopts``; ``-n 0`` runs it in one). Each
worker is a session of its own: its own ``rpc_devices`` (on ports of its own: ``helpers.free_port``), its own
temporary directories, and half the cores for TVM's and torch's thread pools. Which tests share a worker, and
in what order the workers take them, is decided in :func:`pytest_collection_modifyitems` (``WORK_UNITS``).
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import helpers
import numpy as np
import pytest

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    # Each worker's share of the cores for TVM's and torch's (OpenMP) thread pools, set before either starts its
    # pool; the CLI processes a test starts inherit it. Unset, two workers would each run as many threads as the
    # machine has cores (torch), and OpenMP threads that spin-wait for a core the other worker holds waste it.
    # A value the user set wins.
    _share = str(max(1, (os.cpu_count() or 2) // WORKERS))
    os.environ.setdefault("TVM_NUM_THREADS", _share)
    os.environ.setdefault("OMP_NUM_THREADS", _share)


@dataclass
class RpcDevices:
    tracker: str          # "127.0.0.1:PORT"
    arm64_key: str        # key of the emulated ARM64 device ("arm64-qemu")
    x86_key: str          # key of the local x86 server ("x86-local")
    state_path: Path      # the state file (alcs_tvm.device.status(state_path) etc.)
    log_dir: Path

    @property
    def tracker_port(self) -> int:
        return int(self.tracker.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def cross_cxx() -> str:
    """Path of aarch64-linux-gnu-g++ (installed if missing)."""
    from alcs_tvm import toolchain
    return toolchain.ensure_cross_toolchain()


@pytest.fixture(scope="session")
def rpc_devices(tmp_path_factory) -> RpcDevices:
    """Tracker + one emulated ARM64 RPC server (``arm64-qemu``) + the local x86 RPC server (``x86-local``)."""
    from alcs_tvm import device

    state_path = tmp_path_factory.mktemp("rpc-devices") / "device-state.json"
    port = helpers.free_port(9390)
    state = device.start(tracker_port=port, key=device.DEFAULT_KEY, num_devices=1, x86=True,
                         state_path=state_path, verbose=False)
    started = [state["tracker"]] + list(state["servers"])
    try:
        yield RpcDevices(tracker=f"127.0.0.1:{port}", arm64_key=device.DEFAULT_KEY, x86_key=device.X86_KEY,
                         state_path=state_path, log_dir=state_path.parent / "logs")
    finally:
        device.stop(state_path=state_path, verbose=False)
        left = [e for e in started if device._group_alive(e["pid"])]
        assert not left, f"processes left after stop: {left}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Seed the global random generators (Python, numpy, torch) before each test and its fixtures are set up:
    what a test draws from them, and what a module fixture set up for it draws (e.g. a zoo model's initial
    weights), does not depend on which tests ran before it, so a failure replays when the test is run alone."""
    random.seed(0)
    np.random.seed(0)
    if "torch" in sys.modules:  # not imported yet: its generator still has its fixed default seed
        sys.modules["torch"].manual_seed(0)


#: How the parallel run is split. A work unit is a set of tests one worker runs, in collection order; a worker
#: takes the next unit when it is about to run out (``--dist loadgroup --no-loadscope-reorder``), so the units
#: go out longest first and the workers end together. Its name ends the test ids in the report
#: (``tests/test_zoo.py::test_registry@test_zoo``). By default a unit is one test module (its module fixtures
#: are then built once); every ``device`` test is in the unit ``devices`` (one worker starts the emulated device,
#: and ``*_MODULES`` whose fixtures the device tests share go there whole); ``private_devices``'s tests are a
#: unit of their own (they wait out 30 s timeouts, overlapping the other worker's work). The seconds are one
#: worker's time for the unit on the 2-core test machine (``--durations``); a unit not listed counts 5 s.
#: ``test_tuning`` goes first whatever its time: MetaSchedule's first use imports TVM's tensor intrinsics,
#: whose registration looks every caller frame's module up in ``sys.modules`` and so takes about twice as long
#: once a worker has run other tests and imported their modules (50 s -> 100 s).
WORK_UNITS = {
    "test_tuning": 10_000,
    "devices": 380,
    "devices_rpc": 200,
    "devices_measuring": 160,
    "private_devices": 135,
    "test_reliability_files": 100,
    "test_reliability_cli": 80,
    "test_compile": 75,
    "test_zoo_real_nets": 43,
    "test_blocked_concat": 38,
    "test_expand_depthwise": 37,
    "test_sparse_conv2d": 36,
    "test_winograd": 33,
    "test_reliability_import": 33,
    "test_conv_kinds": 27,
    "test_estimate": 22,
    "test_latency_transfer": 16,
    "test_pruning": 14,
    "test_frontend": 12,
    "test_dense_cpu": 11,
    "test_kernel_profile": 11,
}
#: modules that go to the device unit whole (their module fixtures serve device and other tests alike)
DEVICE_MODULES = ("test_arm64_device", "test_device_rpc", "test_flow")
#: with more than two workers the device tests are two units, each on its own emulated device: one would hold
#: its worker longer than the run should take. These modules' device tests (profiling, tuning, the flow: mostly
#: the x86 server) are the second.
MEASURING_MODULES = ("test_latency", "test_autotune", "test_flow", "test_reliability_cli")


def work_unit(item) -> str:
    module = item.path.stem
    if item.get_closest_marker("device") is not None or module in DEVICE_MODULES:
        if WORKERS <= 2:
            return "devices"
        return "devices_measuring" if module in MEASURING_MODULES else "devices_rpc"
    if "private_devices" in getattr(item, "fixturenames", ()):
        return "private_devices"
    return module


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items):
    """Every test that uses the tracker (``rpc_devices``, directly or through another fixture) is marked
    ``device``, also where its module forgot to: ``-m "not device"`` never starts the tracker. In a parallel run
    each test is put in its work unit (an ``xdist_group``) and the units are ordered longest first
    (``WORK_UNITS``); a run in one process keeps the collection order."""
    for item in items:
        if "rpc_devices" in getattr(item, "fixturenames", ()) and item.get_closest_marker("device") is None:
            item.add_marker(pytest.mark.device)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    units = {}
    for item in items:
        units.setdefault(work_unit(item), []).append(item)
    order = sorted(units, key=lambda unit: -WORK_UNITS.get(unit, 5))  # stable: otherwise collection order
    items[:] = [item for unit in order for item in units[unit]]
    for item in items:
        item.add_marker(pytest.mark.xdist_group(work_unit(item)))
