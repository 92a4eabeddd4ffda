"""Shared fixtures: the RPC tracker with one emulated ARM64 device and the local x86 server (session scoped), the
aarch64 cross compiler; every test starts from the same global random state; a test that uses the tracker is
marked ``device``. (Shared helper functions are in helpers.py.)

``rpc_devices`` runs ``alcs_tvm.device.setup()`` (cached under ``$ALCS_TVM_CACHE`` or ``~/.cache/alcs_tvm``; the
first run on a fresh machine installs packages and builds the device image, ~20-60 s), starts a tracker on a
free port with its own state file (so it never touches a user's ``alcs device start``), and stops everything at
the end of the session, checking that no process of theirs is left.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


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
    port = device._free_port(9390)
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


def pytest_collection_modifyitems(items):
    """Every test that uses the tracker (``rpc_devices``, directly or through another fixture) is marked
    ``device``, also where its module forgot to: ``-m "not device"`` never starts the tracker."""
    for item in items:
        if "rpc_devices" in getattr(item, "fixturenames", ()) and item.get_closest_marker("device") is None:
            item.add_marker(pytest.mark.device)
