"""What several test modules share (pytest puts tests/ on sys.path): comparing outputs, the reference conv, small
ONNX graphs, running the CLI, a compiled Relax executable or ONNX Runtime; stable seeds; the host CPU check; the
ELF header check."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

EM_AARCH64 = 183  # ELF e_machine of aarch64 objects

# the CPU features LLVM may use for each x86 target family (``-mcpu=skylake-avx512`` for x86-avx512, see
# alcs_tvm/target.py): code built for one of them runs only on a host that has all of them
HOST_FEATURES = {
    "x86-avx512": ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),
    "x86-avx2": ("avx2", "fma"),
}


# ----------------------------------------------------------------------------------------------- parallel workers
def worker_index() -> int:
    """Which pytest-xdist worker runs this process (``PYTEST_XDIST_WORKER`` is ``gw0``, ``gw1``, ...); 0 without
    xdist (setup.cfg runs the suite in two workers, ``-n 0`` in one process)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(name[2:]) if name[2:].isdigit() else 0


#: ports between one worker's first port and the next worker's
WORKER_PORT_STRIDE = 50


def free_port(first: int) -> int:
    """The first free TCP port from ``first`` on, each worker from its own ``first`` (50 ports apart): two workers
    that scan one range at once both find its first port free, and the one that binds second fails."""
    from alcs_tvm import device

    return device._free_port(first + WORKER_PORT_STRIDE * worker_index())


# ----------------------------------------------------------------------------------------------- comparing
def assert_close(actual, expected, rtol, atol=None, scale_floor=0.0):
    """``actual == expected`` (same shape) up to ``rtol`` relative and ``atol`` absolute error; ``atol`` defaults
    to ``rtol`` times the largest magnitude of ``expected`` (at least ``scale_floor``). Each test module keeps its
    own tolerances: pass them explicitly."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    if atol is None:
        atol = rtol * max(float(scale_floor), float(np.abs(expected).max()) if expected.size else 0.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def torch_conv(x, weight, bias, stride, padding, dilation, activation):
    """``torch.nn.functional.conv2d`` (+ relu / relu6) on numpy arrays: the reference of the sparse conv tests;
    ``padding`` may be (top, left, bottom, right)."""
    import torch

    xt = torch.from_numpy(x)
    if isinstance(padding, tuple) and len(padding) == 4:
        top, left, bottom, right = padding
        xt = torch.nn.functional.pad(xt, (left, right, top, bottom))
        padding = 0
    out = torch.nn.functional.conv2d(xt, torch.from_numpy(weight), None if bias is None else torch.from_numpy(bias),
                                     stride, padding, dilation)
    if activation == "relu":
        out = out.relu()
    elif activation == "relu6":
        out = out.clamp(0, 6)
    return out.numpy()


def export_tiny_cnn(path, size: int):
    """A tiny PyTorch CNN (two 3x3 convs with ReLU, the second strided, global mean pool, a 10-class linear layer;
    weights and input from seed 0) exported to ONNX at ``path`` for a ``1x3xSIZExSIZE`` input named ``data`` (the
    output ``logits``). Returns ``(model, input tensor)``."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["data"], output_names=["logits"])
    return net, x


class OnnxGraph:
    """A small ONNX graph built node by node (onnx.helper): He-normal conv weights and small biases from ``rng``,
    one float input ``x``."""

    def __init__(self, rng):
        self.rng, self.nodes, self.inits = rng, [], []

    def conv(self, src, name, cout, cin, kernel=3, stride=1, groups=1, act="Relu", pads=None):
        """``Conv`` (+ ``act``) reading ``src``, named ``name``; ``pads`` (top, left, bottom, right) defaults to
        ``kernel // 2`` all round. Returns the output's name."""
        from onnx import helper, numpy_helper

        w = self.rng.standard_normal((cout, cin // groups, kernel, kernel)) * np.sqrt(2 / (cin // groups * kernel ** 2))
        b = self.rng.uniform(-0.1, 0.1, cout)
        self.inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}_w"),
                       numpy_helper.from_array(b.astype(np.float32), f"{name}_b")]
        top, left, bottom, right = pads if pads is not None else (kernel // 2,) * 4
        self.nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [f"{name}_y"], name=name,
                                           kernel_shape=[kernel, kernel], strides=[stride, stride],
                                           pads=[top, left, bottom, right], group=groups))
        if act is None:
            return f"{name}_y"
        self.nodes.append(helper.make_node(act, [f"{name}_y"], [f"{name}_a"], name=f"{name}_{act.lower()}"))
        return f"{name}_a"

    def model(self, out, in_shape, out_shape):
        from onnx import TensorProto, helper

        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ----------------------------------------------------------------------------------------------- running
def run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
    """``python -m alcs_tvm.cli ARGS`` from the repository root (the package comes from ``PYTHONPATH`` if set);
    arguments may be paths or numbers."""
    return subprocess.run([sys.executable, "-m", "alcs_tvm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts: Python's Ctrl-C handling whatever the test runner
    inherited (a shell starts background jobs with SIGINT ignored, and a child inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def blocked(a, block, border=(0, 0, 0, 0)):
    """NCHW -> NCHW[block]c with a zero border (top, left, bottom, right), channels zero-padded to a multiple of
    ``block``; with ``block == 1`` the bordered NCHW array itself."""
    top, left, bottom, right = border
    a = np.pad(a, ((0, 0), (0, (-a.shape[1]) % block), (top, bottom), (left, right)))
    if block == 1:
        return a
    n, c, h, w = a.shape
    return np.ascontiguousarray(a.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))


def run_vm(executable, *inputs):
    """Run ``main`` of a compiled Relax executable (or a library loaded with ``tvm.runtime.load_module``) on the
    local CPU; returns its output as a numpy array."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]).numpy()


def run_onnxruntime(model, x):
    """The first output of an ONNX model (a path or the serialised bytes) on ONNX Runtime's CPU provider, ``x``
    fed to its first input."""
    import onnxruntime as ort

    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------------------------- seeds
def stable_seed(*parts) -> int:
    """A seed from ``parts`` (strings, numbers, None, tuples of them) that is the same in every process, unlike
    ``hash()`` of a string (randomised per process): a failing case can be replayed."""
    return zlib.crc32(repr(parts).encode())


# ----------------------------------------------------------------------------------------------- the host
@functools.lru_cache(maxsize=None)
def host_cpu_flags() -> frozenset:
    """The host CPU's feature flags (``/proc/cpuinfo``), or LLVM's view of the host CPU where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    from tvm.target import Target, codegen

    host = Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return frozenset(f for features in HOST_FEATURES.values() for f in features
                     if codegen.llvm_cpu_has_features([f], host))


def skip_unless_host_runs(family: str):
    """A skip mark for tests that *run* code compiled for the x86 target ``family`` (``x86-avx512``,
    ``x86-avx2``): they skip on a host whose CPU lacks one of its features. (Compiling works on every host.)"""
    missing = sorted(set(HOST_FEATURES[family]) - host_cpu_flags())
    return pytest.mark.skipif(bool(missing), reason=f"runs {family} code; the host CPU lacks {', '.join(missing)}")


requires_avx512 = skip_unless_host_runs("x86-avx512")


@functools.lru_cache(maxsize=None)
def host_vector_width() -> int:
    """The SIMD width V of this host's x86 target (16 with AVX-512, 8 with AVX2): what a build for ``"x86"``
    blocks its layouts in and prunes in where no wider group applies."""
    from alcs_tvm.target import resolve_target

    return resolve_target("x86").vector_width


# ----------------------------------------------------------------------------------------------- files
def assert_aarch64_elf(path):
    """``path`` is a 64-bit little-endian ELF object for aarch64 (e_machine 183), read from its header, and the
    package's own ``rpc.elf_machine`` says so too."""
    from alcs_tvm import rpc

    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file: {header[:4]!r}"
    assert header[4] == 2 and header[5] == 1, f"{path}: not 64-bit little-endian (EI_CLASS/EI_DATA {header[4:6]})"
    machine = int.from_bytes(header[18:20], "little")
    assert machine == EM_AARCH64, f"{path}: e_machine {machine}, not aarch64 ({EM_AARCH64})"
    assert rpc.elf_machine(path) == "aarch64"


def wait_busy(tracker: str, key: str, timeout: float = 60) -> None:
    """Wait until the tracker at ``tracker`` has handed out its (single) server under ``key`` to a session."""
    from alcs_tvm.tracker import tracker_summary

    t0 = time.time()
    while time.time() - t0 < timeout:
        queue = tracker_summary(tracker).get("queue_info", {}).get(key, {})
        if queue.get("free", 1) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"{key} never became busy")

