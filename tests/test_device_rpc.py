"""The emulated ARM64 device, RPC sessions and ``alcs run``: real compiles, real servers, real faults."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time

import helpers
import numpy as np
import pytest
from helpers import REPO, run_cli, wait_busy

from alcs_tvm import device, rpc
from alcs_tvm.run import read_sidecar, run_model, write_sidecar

alcs = functools.partial(run_cli, timeout=120)  # the real CLI, bounded: a hang fails the test in 2 minutes
assert_close = functools.partial(helpers.assert_close, rtol=1e-4)  # atol: 1e-4 * max |ref|


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory, cross_cxx):
    """A tiny PyTorch CNN (1x3x32x32) via ONNX and Relax, built for arm64 (cross) and for this host."""
    import onnx
    import torch
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from alcs_tvm.target import resolve_target

    tmp = tmp_path_factory.mktemp("tiny_cnn")
    net, x = helpers.export_tiny_cnn(tmp / "net.onnx", 32)
    mod = from_onnx(onnx.load(str(tmp / "net.onnx")), keep_params_in_input=False)
    libs = {}
    for name in ("arm64", "x86"):
        info = resolve_target(name)
        exe = tvm.compile(mod, target=info.target)
        path = tmp / f"net_{name}.so"
        if info.is_cross:
            exe.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(cross_cxx))
        else:
            exe.export_library(str(path))
        write_sidecar(path, mod, target=info.target, output_names=["logits"])
        libs[name] = path
    np.savez(tmp / "in.npz", data=x.numpy())
    with torch.no_grad():
        ref = net(x).numpy()
        ref_ones = net(torch.ones(1, 3, 32, 32)).numpy()
    return {"libs": libs, "x": x.numpy(), "ref": ref, "ref_ones": ref_ones, "in_npz": tmp / "in.npz", "dir": tmp}


def test_sidecar_and_arch(tiny_cnn):
    side = read_sidecar(tiny_cnn["libs"]["arm64"])
    assert side["inputs"] == [{"name": "data", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert side["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert rpc.elf_machine(tiny_cnn["libs"]["arm64"]) == "aarch64"
    # an aarch64 library cannot run here: one-line error pointing at --rpc-tracker
    r = alcs("run", tiny_cnn["libs"]["arm64"], "--inputs", tiny_cnn["in_npz"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "aarch64" in r.stderr and "--rpc-tracker" in r.stderr


@pytest.mark.device
def test_status_lists_servers(rpc_devices):
    info = device.status(rpc_devices.state_path)
    assert info["tracker"]["alive"]
    assert info["keys"] == {rpc_devices.arm64_key: 1, rpc_devices.x86_key: 1}
    kinds = sorted((s["kind"], s["registered"]) for s in info["servers"])
    assert kinds == [("arm64-qemu", True), ("x86-local", True)]
    r = alcs("device", "status", "--state", rpc_devices.state_path)
    assert r.returncode == 0 and "arm64-qemu" in r.stdout and "cortex-a76" in r.stdout


@pytest.mark.device
def test_arm64_cli_run_matches_torch(rpc_devices, tiny_cnn):
    out_npz = tiny_cnn["dir"] / "out_arm64.npz"
    r = alcs("run", tiny_cnn["libs"]["arm64"], "--inputs", tiny_cnn["in_npz"], "--outputs", out_npz, "--print-time",
             "--repeat", 3, "--number", 2, "--rpc-tracker", rpc_devices.tracker, "--rpc-key", rpc_devices.arm64_key,
             "--device-timeout", 60)
    assert r.returncode == 0, r.stderr
    assert "output logits: shape [1, 10] dtype float32" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("time (ms):"))
    mean = float(line.split("mean")[1].split()[0])
    assert mean > 0
    with np.load(out_npz) as data:
        assert_close(data["logits"], tiny_cnn["ref"])


@pytest.mark.device
def test_arm64_fill_mode_from_sidecar(rpc_devices, tiny_cnn):
    out_npz = tiny_cnn["dir"] / "out_ones.npz"
    r = alcs("run", tiny_cnn["libs"]["arm64"], "--fill-mode", "ones", "--outputs", out_npz,
             "--rpc-tracker", rpc_devices.tracker, "--rpc-key", rpc_devices.arm64_key)
    assert r.returncode == 0, r.stderr
    with np.load(out_npz) as data:
        assert_close(data["logits"], tiny_cnn["ref_ones"])


@pytest.mark.device
def test_arm64_python_api(rpc_devices, tiny_cnn):
    outputs, timings = run_model(tiny_cnn["libs"]["arm64"], {"data": tiny_cnn["x"]}, tracker=rpc_devices.tracker,
                                 key=rpc_devices.arm64_key, repeat=3, number=2, timeout=60)
    assert len(outputs) == 1
    assert_close(outputs[0], tiny_cnn["ref"])
    assert timings["repeat"] == 3 and len(timings["results_ms"]) == 3
    assert 0 < timings["min_ms"] <= timings["median_ms"] <= timings["max_ms"]
    # an explicit session, reused for two runs, and a list of inputs
    sess = rpc.connect(tracker=rpc_devices.tracker, key=rpc_devices.arm64_key, timeout=60)
    for _ in range(2):
        outputs, timings = run_model(tiny_cnn["libs"]["arm64"], [tiny_cnn["x"]], session=sess)
        assert timings is None
        assert_close(outputs[0], tiny_cnn["ref"])


@pytest.mark.device
def test_a_model_with_two_outputs_runs_twice_and_frees_the_device(rpc_devices, cross_cxx, tmp_path):
    """Both outputs of a two-output model come back from the device, and the one emulated device is free for the
    next client as soon as run_model returns: the session used to stay open until the garbage collector ran
    (TVM's VM holds the remote library in a reference cycle), so the next client waited up to the session timeout
    (300 s per call in the Winograd device test)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["conv"], ["y"])],
        "two_outputs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 8, 16, 16]) for name in ("conv", "y")],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "two.onnx")
    result = alcs("compile", tmp_path / "two.onnx", "--target", "arm64", "-o", tmp_path / "two.so")
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for _ in range(2):
        outputs, _ = run_model(tmp_path / "two.so", {"x": x}, tracker=rpc_devices.tracker,
                               key=rpc_devices.arm64_key, timeout=120)
        assert len(outputs) == 2
        for out, ref in zip(outputs, expected):
            assert_close(out, ref)
        started = time.monotonic()
        rpc.connect(tracker=rpc_devices.tracker, key=rpc_devices.arm64_key, timeout=10)  # TimeoutError if busy
        assert time.monotonic() - started < 10


@pytest.mark.device
def test_x86_local_and_over_rpc(rpc_devices, tiny_cnn):
    lib = tiny_cnn["libs"]["x86"]
    outputs, _ = run_model(lib, {"data": tiny_cnn["x"]})
    assert_close(outputs[0], tiny_cnn["ref"])
    outputs, timings = run_model(lib, {"data": tiny_cnn["x"]}, tracker=rpc_devices.tracker, key=rpc_devices.x86_key,
                                 repeat=2, timeout=60)
    assert_close(outputs[0], tiny_cnn["ref"])
    assert timings["mean_ms"] > 0
    r = alcs("run", lib, "--inputs", tiny_cnn["in_npz"], "--print-time", "--repeat", 2)
    assert r.returncode == 0, r.stderr
    assert "on local cpu" in r.stdout and "time (ms): mean" in r.stdout
    # an x86 library on the ARM device: clear one-line error
    r = alcs("run", lib, "--inputs", tiny_cnn["in_npz"], "--rpc-tracker", rpc_devices.tracker,
             "--rpc-key", rpc_devices.arm64_key)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "could not load" in r.stderr and "x86_64" in r.stderr


#: run on the device: every Python source module an RPC server imports, and whether its bytecode is in the image
#: and current (the header's source mtime and size, which is how Python itself decides to recompile)
_SERVER_BYTECODE = """
import importlib.util, os, struct, sys
import tvm.exec.rpc_server, tvm.rpc.server
stale = []
for module in list(sys.modules.values()):
    source = getattr(module, "__file__", None) or ""
    if not source.endswith(".py"):
        continue
    try:
        header = open(importlib.util.cache_from_source(source), "rb").read(16)
    except OSError:
        header = b""
    stat = os.stat(source)
    if header[:4] != importlib.util.MAGIC_NUMBER or struct.unpack("<II", header[8:16]) != (
            int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF):
        stale.append(source)
print(len(sys.modules), len(stale), *stale[:5])
"""


@pytest.mark.device
def test_device_servers_import_tvm_from_bytecode(rpc_devices):
    """The device image holds current bytecode for every module an emulated RPC server imports: its processes
    never write bytecode, so anything missing would be compiled under qemu again at every server start."""
    image = device.setup(verbose=False)
    result = subprocess.run([str(image.python), "-c", _SERVER_BYTECODE], env=image.env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported, stale, *names = result.stdout.split()
    assert int(imported) > 100 and int(stale) == 0, result.stdout


def test_direct_rpc_server(tiny_cnn, tmp_path):
    """``--rpc HOST:PORT`` with a server that runs without a tracker (as a phone app in standalone mode)."""
    entry = device.start_x86_server(tracker=None, log_dir=tmp_path)
    try:
        addr = f"127.0.0.1:{entry['port']}"
        r = alcs("run", tiny_cnn["libs"]["x86"], "--inputs", tiny_cnn["in_npz"], "--rpc", addr,
                 "--outputs", tmp_path / "o.npz")
        assert r.returncode == 0, r.stderr
        with np.load(tmp_path / "o.npz") as data:
            assert_close(data["logits"], tiny_cnn["ref"])
    finally:
        assert device.stop_process(entry)
    assert not device._group_alive(entry["pid"])


def test_tracker_not_running(tiny_cnn):
    port = helpers.free_port(9590)
    t0 = time.time()
    r = alcs("run", tiny_cnn["libs"]["arm64"], "--inputs", tiny_cnn["in_npz"],
             "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "arm64-qemu")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("alcs run: error:")
    assert f"127.0.0.1:{port}" in r.stderr
    assert time.time() - t0 < 30
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        rpc.connect(tracker=f"127.0.0.1:{port}", key="arm64-qemu", timeout=5)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        rpc.connect(rpc=f"127.0.0.1:{port}", timeout=5)


@pytest.mark.device
def test_unknown_key(rpc_devices, tiny_cnn):
    r = alcs("run", tiny_cnn["libs"]["arm64"], "--inputs", tiny_cnn["in_npz"],
             "--rpc-tracker", rpc_devices.tracker, "--rpc-key", "pixel-9")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "'pixel-9'" in r.stderr and rpc_devices.arm64_key in r.stderr and rpc_devices.x86_key in r.stderr
    with pytest.raises(rpc.UnknownKeyError, match=rpc_devices.arm64_key):
        rpc.connect(tracker=rpc_devices.tracker, key="pixel-9", timeout=5)


@pytest.mark.device
def test_device_faults_then_retry(rpc_devices, tiny_cnn):
    """A frozen device times out (bounded), a killed device fails fast, a restarted one works again."""
    key = "arm64-victim"
    lib = tiny_cnn["libs"]["arm64"]
    long_run = dict(repeat=20, number=2000)  # ~1 min on the emulated device: certainly still running when hit
    entry = device.start_arm64_server(rpc_devices.tracker, key=key, log_dir=rpc_devices.log_dir)
    spare = {}  # the server of step 2, started during step 1
    restarted = {}  # the server of step 3, started during step 2

    starters = []

    def start_server(into):
        starter = threading.Thread(target=lambda: into.update(entry=device.start_arm64_server(
            rpc_devices.tracker, key=key, log_dir=rpc_devices.log_dir)))
        starter.start()
        starters.append(starter)
        return starter

    try:
        # 1. frozen device (SIGSTOP): the client gives up after its timeout instead of hanging
        result = {}

        def run():
            t0 = time.time()
            try:
                run_model(lib, {"data": tiny_cnn["x"]}, tracker=rpc_devices.tracker, key=key, timeout=8, **long_run)
            except Exception as err:  # noqa: BLE001
                result["err"] = err
            result["t"] = time.time() - t0

        thread = threading.Thread(target=run)
        thread.start()
        wait_busy(rpc_devices.tracker, key)
        time.sleep(1.0)
        os.killpg(entry["pid"], signal.SIGSTOP)
        # the next step's server starts while the frozen one is waited out: the run above holds the frozen one, so
        # the tracker can hand out only the new one
        starter = start_server(spare)
        thread.join(60)
        assert not thread.is_alive(), "run_model hung on a frozen device"
        assert isinstance(result["err"], TimeoutError), repr(result.get("err"))
        assert "did not answer within 8 s" in str(result["err"]) and key in str(result["err"])
        assert result["t"] < 30
        assert device.stop_process(entry)
        starter.join(180)
        entry = spare["entry"]

        # 2. device server killed in the middle of a run: `alcs run` fails fast with one clear line
        proc = subprocess.Popen([sys.executable, "-m", "alcs_tvm.cli", "run", str(lib), "--inputs",
                                 str(tiny_cnn["in_npz"]), "--print-time", "--repeat", "20", "--number", "2000",
                                 "--rpc-tracker", rpc_devices.tracker, "--rpc-key", key, "--device-timeout", "120"],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_busy(rpc_devices.tracker, key)
            # step 3's server starts while this run goes on: the run holds the server killed below and does not
            # retry, so the new one only serves step 3
            starter = start_server(restarted)
            time.sleep(1.5)
            t_kill = time.time()
            assert device.stop_process(entry)  # SIGTERM/SIGKILL to the server's whole process group
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert time.time() - t_kill < 20
        assert proc.returncode == 2
        assert err.count("\n") == 1 and "closed the connection" in err and key in err, err

        # 3. retry on a restarted server succeeds
        starter.join(180)
        entry = restarted["entry"]
        outputs, _ = run_model(lib, {"data": tiny_cnn["x"]}, tracker=rpc_devices.tracker, key=key, timeout=60)
        assert_close(outputs[0], tiny_cnn["ref"])
    finally:
        device.stop_process(entry)
        for starter in starters:
            starter.join(180)
        for started in (spare, restarted):  # servers of steps the test did not reach
            if started.get("entry") is not None and started["entry"] is not entry:
                device.stop_process(started["entry"])
    assert not device._group_alive(entry["pid"])
