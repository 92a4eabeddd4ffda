"""What a user meets when things go wrong: a cut-short library, a server that lost its loop, a frozen tracker or
device, Ctrl-C, an output path that cannot be written, a planted symlink. Real processes, a real tracker and real
servers on 127.0.0.1, real compiled code; every fault is made for real (truncation, SIGSTOP, SIGINT)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import helpers
import numpy as np
import pytest

from alcs_tvm import device, rpc
from alcs_tvm.run import run_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alcs(*args, timeout=300):
    """Run the real CLI; return (exit code, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "alcs_tvm.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    return res.returncode, res.stdout, res.stderr, time.monotonic() - t0


def start_alcs(*args):
    """The real CLI in its own process group, with Python's Ctrl-C handling (:func:`helpers.default_sigint`)."""
    return subprocess.Popen([sys.executable, "-m", "alcs_tvm.cli", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=helpers.default_sigint)


def ctrl_c(proc, timeout=120):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group); (exit code, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, out, err, time.monotonic() - t0


def cpu_seconds(pid) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


def files_in(directory) -> list:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, cross_cxx):
    """A tiny CNN through ``alcs_tvm.compiler`` (ONNX import, sparse pass, export with sidecar) for this host and
    for arm64, plus cut-short copies of both libraries."""
    from alcs_tvm import compiler
    from alcs_tvm.run import write_sidecar
    from alcs_tvm.target import resolve_target

    tmp = tmp_path_factory.mktemp("tiny")
    _, x = helpers.export_tiny_cnn(tmp / "net.onnx", 16)
    libs, cut = {}, {}
    for name in ("x86", "arm64"):
        info = resolve_target(name)
        executable, report = compiler.compile(str(tmp / "net.onnx"), info)
        libs[name] = tmp / f"net_{name}.so"
        compiler.export(executable, str(libs[name]), info)
        write_sidecar(libs[name], report.relax_module, target=info.target)
        data = libs[name].read_bytes()
        cut[name] = tmp / f"cut_{name}.so"
        cut[name].write_bytes(data[:len(data) // 2])  # a copy that stopped halfway
        shutil.copy(f"{libs[name]}.json", f"{cut[name]}.json")
    np.savez(tmp / "in.npz", data=x.numpy())
    return SimpleNamespace(dir=tmp, onnx=tmp / "net.onnx", libs=libs, cut=cut, in_npz=tmp / "in.npz")


@pytest.fixture(scope="module")
def private_devices(tmp_path_factory):
    """A tracker and an x86 server of this module's own (the tests freeze and break them; the session's
    ``rpc_devices`` stay healthy for the other tests)."""
    state_path = tmp_path_factory.mktemp("private-devices") / "device-state.json"
    port = helpers.free_port(9690)
    setup = SimpleNamespace(state_path=state_path, port=port, tracker=f"127.0.0.1:{port}", key=device.X86_KEY)
    setup.restore = lambda: device.start(tracker_port=port, num_devices=0, x86=True, state_path=state_path,
                                         verbose=False)
    started = [setup.restore()["tracker"]]
    try:
        yield setup
    finally:
        state = device._load_state(state_path)
        started += [state["tracker"]] + state["servers"]
        for entry in state["servers"] + [state["tracker"]]:  # a frozen one must be able to handle SIGTERM
            if entry:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(entry["pid"], signal.SIGCONT)
        device.stop(state_path=state_path, verbose=False)
        left = [e for e in started if e and device._group_alive(e["pid"])]
        assert not left, f"processes left after stop: {left}"


def server_entry(setup) -> dict:
    (entry,) = device.status(setup.state_path)["servers"]
    return entry


@pytest.fixture(scope="module")
def prune_setup(tmp_path_factory):
    """small_cnn on digits with a latency table measured on this host, and a budget between its extremes."""
    import torch

    from alcs_tvm import profiler, pruning
    from alcs_tvm.data import load_dataset
    from alcs_tvm.target import resolve_target
    from alcs_tvm.zoo import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_dataset("digits")
        model = load_model("small_cnn", data.num_classes, data.x_train.shape[1], None)
        table = profiler.measure_latency_table(model, data.input_shape, "x86", model_name="small_cnn",
                                               sparsities=(0.0, 0.6, 0.95), repeat=3)
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("prune") / "table.json"
    table.save(str(path))
    layers = pruning.find_prunable_layers(model, data.input_shape, resolve_target("x86"))
    latency = pruning.LatencyModel(table, layers, table.rest_ms["small_cnn"], "small_cnn")
    budget = (latency.min_ms(0.01) + latency.dense_ms()) / 2
    return SimpleNamespace(table=path, budget=budget)


# ----------------------------------------------------------------------------- 1. a cut-short library (SIGBUS)
def test_cut_short_library_is_refused_before_it_is_loaded(tiny):
    """Loading a truncated library used to kill `alcs run` with SIGBUS: exit 135, no message."""
    code, out, err, _ = alcs("run", tiny.cut["x86"], "--fill-mode", "zeros")
    assert code == 2 and out == "" and one_line(err), (code, err)
    assert err.startswith("alcs run: error: cut_x86.so is cut short") and "copy or build it again" in err
    # one byte short (the section headers at the end) is caught as well, and the whole library still runs
    short = tiny.dir / "short_x86.so"
    short.write_bytes(tiny.libs["x86"].read_bytes()[:-1])
    shutil.copy(f"{tiny.libs['x86']}.json", f"{short}.json")
    with pytest.raises(ValueError, match="short_x86.so is cut short.*section header table"):
        run_model(short, fill_mode="zeros")
    outputs, _ = run_model(tiny.libs["x86"], fill_mode="zeros")
    assert outputs[0].shape == (1, 10)
    # an aarch64 library is read the same way; an ONNX file is no library at all
    with pytest.raises(ValueError, match="cut_arm64.so is cut short"):
        rpc.check_library(tiny.cut["arm64"], relax=True)
    rpc.check_library(tiny.libs["arm64"], relax=True)
    with pytest.raises(ValueError, match="not a shared library"):
        rpc.check_library(tiny.onnx)


def test_cut_short_library_never_reaches_the_device(rpc_devices, tiny):
    """Sent over RPC, it used to kill the emulated device's session worker and with it the server's loop: the
    server stayed up, unregistered, serving nobody."""
    code, out, err, _ = alcs("run", tiny.cut["arm64"], "--rpc-tracker", rpc_devices.tracker, "--rpc-key",
                             rpc_devices.arm64_key)
    assert code == 2 and out == "" and one_line(err) and "cut_arm64.so is cut short" in err, err
    servers = device.status(rpc_devices.state_path)["servers"]
    assert servers and all(s["registered"] for s in servers), servers


def test_status_and_start_handle_a_server_that_lost_its_loop(private_devices, tiny):
    """A client without the check (TVM's own) still crashes the server's session; `alcs device status` used to
    call such a server fine (exit 0) and `alcs device start` left it as it was."""
    from tvm import rpc as tvm_rpc

    setup = private_devices
    before = server_entry(setup)
    session = tvm_rpc.connect_tracker("127.0.0.1", setup.port).request(setup.key, session_timeout=60)
    session.upload(str(tiny.cut["x86"]), "cut.so")
    with pytest.raises(Exception):  # noqa: B017 - the session worker dies of SIGBUS: any error
        session.load_module("cut.so")
    del session
    deadline = time.monotonic() + 30
    while device.status(setup.state_path)["servers"][0]["registered"] and time.monotonic() < deadline:
        time.sleep(0.2)

    code, out, _, _ = alcs("device", "status", "--state", setup.state_path)
    assert code == 1 and "NOT REGISTERED" in out and "alcs device start" in out, out
    code, out, err, _ = alcs("device", "start", "--state", setup.state_path, "--tracker-port", setup.port,
                             "--num-devices", 0)
    assert code == 0, err
    assert "not registered: restarting it" in err
    after = server_entry(setup)
    assert after["registered"] and after["pid"] != before["pid"]
    assert not device._group_alive(before["pid"])  # the broken server is gone, not orphaned
    code, out, _, _ = alcs("device", "status", "--state", setup.state_path)
    assert code == 0 and "registered" in out


class PortTaker:
    """Binds and listens on the port named by the first log matching ``pattern`` in ``directory`` (``*-PORT.log``)
    as soon as it appears: long before the server or tracker that writes it has imported TVM and bound the port,
    as another run scanning the same range would."""

    def __init__(self, directory, pattern):
        self.port, self.socket = None, socket.socket()
        self.thread = threading.Thread(target=self._take, args=(Path(directory), pattern), daemon=True)
        self.thread.start()

    def _take(self, directory, pattern):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.port is None:
            for log in directory.glob(pattern):
                port = int(log.stem.rsplit("-", 1)[1])
                self.socket.bind(("127.0.0.1", port))
                self.socket.listen(1)
                self.port = port
                break
            time.sleep(0.002)

    def close(self):
        self.thread.join(10)
        self.socket.close()


@pytest.mark.parametrize("standalone", [False, True], ids=["registered", "standalone"])
def test_a_server_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path, standalone):
    """Servers scan the same range from 9090 for a free port, and the port found free can be taken before the
    server binds it (an emulated one needs seconds to get there): with test sessions and `alcs device start`s
    running side by side, test_device_faults_then_retry failed so ("cannot bind to any port in [9110, 9111)").
    A standalone server must not count as ready because *someone* listens on its port: test_direct_rpc_server
    once connected to another worker's server so."""
    tracker = None if standalone else device.start_tracker(helpers.free_port(9790), log_dir=tmp_path)
    taker = PortTaker(tmp_path, "server-contested-*.log")
    entry = None
    try:
        entry = device.start_x86_server(tracker and device.tracker_addr(tracker), key="contested", log_dir=tmp_path)
        taker.thread.join(10)
        assert taker.port and entry["port"] != taker.port
        assert "cannot bind" in (tmp_path / f"server-contested-{taker.port}.log").read_text()
        assert device._registered(entry)
    finally:
        taker.close()
        device.stop_process(entry)
        device.stop_process(tracker)


def test_a_tracker_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path):
    """Two `tools/validate_latency.py` runs started at the same instant both found port 9490 free; the second
    tracker failed to bind it, yet counted as started because the first run's tracker answered on the port, and
    the two runs shared one x86 server. A tracker is ready when its own process listens, and `device.started`
    moves to the next free port when the one it found is lost."""
    taker = PortTaker(tmp_path / "logs", "tracker-*.log")
    try:
        with device.started(tmp_path, first_port=helpers.free_port(9690)) as addr:
            taker.thread.join(10)
            port = int(addr.rsplit(":", 1)[1])
            assert taker.port and port != taker.port
            assert "cannot bind" in (tmp_path / "logs" / f"tracker-{taker.port}.log").read_text()
            status = device.status(tmp_path / "device-state.json")
            assert status["tracker"]["port"] == port and status["tracker"]["answering"]
            assert status["servers"] and all(server["registered"] for server in status["servers"])
    finally:
        taker.close()


# ----------------------------------------------------------------------------------------- 2. a frozen tracker
def test_status_reports_a_frozen_tracker_and_start_replaces_it(private_devices):
    setup = private_devices
    tracker = device.status(setup.state_path)["tracker"]
    os.killpg(tracker["pid"], signal.SIGSTOP)  # the tracker and the worker that serves for it
    try:
        code, out, _, _ = alcs("device", "status", "--state", setup.state_path)
        assert code == 1 and "NOT ANSWERING" in out and "process stopped" in out, out  # was "running", exit 0
        t0 = time.monotonic()
        info = device.status(setup.state_path)
        assert time.monotonic() - t0 < device.PROBE_TIMEOUT + 10  # bounded, not hanging
        assert info["tracker"]["alive"] and not info["tracker"]["answering"] and info["tracker"]["stopped"]
        assert info["servers"][0]["registered"] is None  # unknown: nobody to ask
        code, out, err, _ = alcs("device", "start", "--state", setup.state_path, "--tracker-port", setup.port,
                                 "--num-devices", 0)
        assert code == 0, err
        assert "does not answer: restarting it" in err
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(tracker["pid"], signal.SIGCONT)
    info = device.status(setup.state_path)
    assert info["tracker"]["answering"] and info["tracker"]["pid"] != tracker["pid"]
    assert not device._group_alive(tracker["pid"])
    assert all(s["registered"] for s in info["servers"])


# ------------------------------------------------------------------------------------------------- 3. Ctrl-C
def test_an_import_error_a_ctrl_c_caused_counts_as_the_interrupt():
    """A Ctrl-C while ONNX Runtime's extension initialises surfaces as ``ImportError: initialization failed`` raised
    from the KeyboardInterrupt (seen in test_ctrl_c_during_compile: exit 1 with a traceback)."""
    from alcs_tvm.cli import _caused_by_ctrl_c

    def import_interrupted():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise ImportError("initialization failed") from err

    with pytest.raises(ImportError) as caught:
        import_interrupted()
    assert _caused_by_ctrl_c(caught.value) and _caused_by_ctrl_c(KeyboardInterrupt())
    assert not _caused_by_ctrl_c(ImportError("no module named onnxruntime")) and not _caused_by_ctrl_c(None)


def test_ctrl_c_during_compile(tmp_path):
    """Ctrl-C in the middle of a compile used to print a 70-300 line traceback (exit 1), or to be swallowed by
    TVM's FoldConstant, the compile finishing and writing its library (exit 0)."""
    import onnx

    model = os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_resnet50.onnx")
    # loading TVM; importing and folding; the rewrite and the build (the whole compile takes ~12 s of CPU here)
    for cpu in (1, 4, 7):
        out_dir = tmp_path / f"cpu{cpu}"
        out_dir.mkdir()
        proc = start_alcs("compile", model, "-o", out_dir / "model.so")
        while proc.poll() is None and cpu_seconds(proc.pid) < cpu:
            time.sleep(0.1)
        assert proc.poll() is None, f"the compile ended before {cpu} s of CPU: {proc.communicate()}"
        code, out, err, seconds = ctrl_c(proc)
        assert code == 130 and err == "alcs compile: interrupted\n", (cpu, code, err[-3000:])
        assert seconds < 30, seconds
        assert files_in(out_dir) == [], (cpu, files_in(out_dir))  # no library, sidecar, report or temporary


def test_ctrl_c_during_prunes_measuring_step(prune_setup, tmp_path):
    """Ctrl-C while `alcs prune` compiled and timed its result used to print a traceback and leave the pruned
    ONNX (and the dense one it was measuring) behind, without its plot and summary."""
    proc = start_alcs("prune", "--model", "small_cnn", "--data", "digits", "--latency-table", prune_setup.table,
                      "--budget-ms", f"{prune_setup.budget:.6f}", "-o", tmp_path / "pruned.onnx",
                      "--pretrain-epochs", 1, "--epochs", 1, "--finetune-epochs", 1)
    # the measuring step starts once the pruned model is exported (to its temporary, or before the fix in place)
    while proc.poll() is None and not any("pruned.onnx" in f and "dense" not in f for f in files_in(tmp_path)):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1.0)  # into the compile of the dense model
    code, out, err, seconds = ctrl_c(proc)
    assert code == 130 and "Traceback" not in err and err.splitlines()[-1] == "alcs prune: interrupted", err[-3000:]
    assert "epoch" in out  # it got as far as meant
    assert seconds < 30
    assert files_in(tmp_path) == [], files_in(tmp_path)


# -------------------------------------------------------------------------------- 4. output paths, checked first
def test_output_paths_are_checked_before_the_work(tiny, prune_setup, tmp_path):
    """Each used to fail after the work (a compile's traceback, `IsADirectoryError` with `out.tmp<pid>.so` left
    behind) or, for the resumable tables, to create the missing directory."""
    missing = tmp_path / "no" / "such"
    taken = tmp_path / "a-directory"
    taken.mkdir()
    cases = [
        (["compile", tiny.onnx, "-o", missing / "m.so"], "-o"),
        (["compile", tiny.onnx, "-o", taken], "-o"),
        (["compile", tiny.onnx, "-o", tmp_path / "m.so", "--report", missing / "r.json"], "--report"),
        (["run", tiny.libs["x86"], "--outputs", missing / "o.npz"], "--outputs"),
        (["profile", tiny.onnx, "--local", "-o", missing / "t.json", "--sparsities", "0.5", "--repeat", 2], "-o"),
        (["tune", tiny.onnx, "--local", "-o", taken, "--candidates", 2], "-o"),
        (["prune", "--model", "small_cnn", "--data", "digits", "--latency-table", prune_setup.table, "--budget-ms",
          f"{prune_setup.budget:.6f}", "-o", missing / "p.onnx", "--epochs", 1, "--finetune-epochs", 1], "-o"),
    ]
    for args, option in cases:
        code, out, err, _ = alcs(*args)
        command = args[0]
        assert code == 2 and one_line(err), (args, code, err[-2000:])
        assert err.startswith(f"alcs {command}: error: {option} ") and str(args[args.index(option) + 1]) in err
        assert out == "", (args, out)  # nothing compiled, run, trained or measured first
    assert not (tmp_path / "no").exists()
    assert files_in(tmp_path) == ["a-directory"] and files_in(taken) == []


# ------------------------------------------------------------------------- 5. the state file and a planted link
def test_state_file_is_not_written_through_a_planted_symlink(tmp_path):
    state_path = tmp_path / "device-state.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "device-state.tmp").symlink_to(victim)  # the fixed temporary name the state used to go through
    device.stop(state_path=state_path, verbose=False)  # saves the (empty) state
    assert victim.read_text() == "precious\n"
    assert json.loads(state_path.read_text()) == {"tracker": None, "servers": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-state.json", "device-state.lock",
                                                         "device-state.tmp", "victim.txt"]


# ------------------------------------------------------------------- 7. a frozen device: bounded by what it took
def test_frozen_device_mid_session_fails_within_the_learnt_bound(private_devices, tiny, monkeypatch):
    """With no --device-timeout, a device frozen in the middle of a session used to block for 300 s per step;
    now a step may take 10x what the same kind of step took before, at least ``MIN_STEP_TIMEOUT`` (30 s; 8 s
    here, so the test waits out 8 s and not 30: the bound's rule is what is checked)."""
    assert rpc.MIN_STEP_TIMEOUT == 30
    monkeypatch.setattr(rpc, "MIN_STEP_TIMEOUT", 8)
    setup = private_devices
    session = rpc.connect(tracker=setup.tracker, key=setup.key)
    run_model(tiny.libs["x86"], fill_mode="zeros", session=session, repeat=2)  # the steps' times are learnt
    entry = server_entry(setup)
    os.killpg(entry["pid"], signal.SIGSTOP)
    result = {}

    def again():
        t0 = time.monotonic()
        try:
            run_model(tiny.libs["x86"], fill_mode="zeros", session=session, repeat=2)
        except Exception as err:  # noqa: BLE001
            result["err"] = err
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=again, daemon=True)
    thread.start()
    try:
        thread.join(8 + 30)
        assert not thread.is_alive(), "still blocked well after the learnt bound"
        assert isinstance(result.get("err"), TimeoutError), repr(result.get("err"))
        message = str(result["err"])
        assert "did not answer within 8 s during upload of net_x86.so" in message, message
        assert "--device-timeout" in message and "\n" not in message
        assert 8 <= result["seconds"] < 8 + 15  # the learnt bound: max(8 s, 10x a millisecond upload)
    finally:
        device.stop_process(entry)
        del session
        setup.restore()


def test_frozen_device_fails_alcs_run_with_one_line(private_devices, tiny):
    setup = private_devices
    entry = server_entry(setup)
    os.killpg(entry["pid"], signal.SIGSTOP)  # registered, so the tracker hands it out
    run = ["run", tiny.libs["x86"], "--fill-mode", "zeros", "--rpc-tracker", setup.tracker, "--rpc-key", setup.key]
    first = start_alcs(*run)
    try:
        # while the first run waits on the frozen server, the tracker has no other: an explicit --device-timeout
        # rules for the next request
        helpers.wait_busy(setup.tracker, setup.key)
        code, _, err, _ = alcs(*run, "--device-timeout", 5)
        assert code == 2 and one_line(err) and f"no free '{setup.key}' device" in err and "within 5 s" in err
        out, err = first.communicate(timeout=300)
        assert first.returncode == 2 and out == "" and one_line(err), (first.returncode, err)
        assert "did not answer within 30 s during connect" in err and setup.key in err  # was 60 s
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
        device.stop_process(entry)
        setup.restore()


# ------------------------------------------------------------------ 6. NaN/Inf and pruned positions, documented
def test_nan_does_not_propagate_through_pruned_positions_as_documented():
    """The sparse kernel never reads an input at a pruned (cin, kh, kw): a NaN or Inf there does not reach the
    output, which a dense convolution of the same weights (0 * NaN = NaN) spreads. Users comparing against a
    dense run need to know; the README's design notes say it."""
    import torch

    from alcs_tvm.kernels import build_sparse_conv2d

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 4, 3, 3)).astype(np.float32)
    weight[:, 0] = 0.0  # input channel 0 pruned at every tap
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x[0, 0, 3, 3], x[0, 0, 6, 1] = np.nan, np.inf
    dense = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), padding=1).numpy()
    assert np.isnan(dense).any()  # what ONNX Runtime, PyTorch or --no-sparse give
    sparse = build_sparse_conv2d(weight, input_shape=x.shape, padding=1).run(x)
    assert np.isfinite(sparse).all()
    clean = np.nan_to_num(x, nan=0.0, posinf=0.0)
    expected = torch.nn.functional.conv2d(torch.from_numpy(clean), torch.from_numpy(weight), padding=1).numpy()
    np.testing.assert_allclose(sparse, expected, rtol=1e-4, atol=1e-4)
    notes = Path(REPO, "README.md").read_text().split("## Design notes", 1)[1]
    assert "NaN" in notes and "Inf" in notes and "pruned" in notes and "does not reach an output" in notes
