"""What several test modules share (pytest puts tests/ on sys.path): comparing outputs, the reference conv, running
the CLI, a compiled Relax executable or ONNX Runtime; stable seeds."""
from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


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


# ----------------------------------------------------------------------------------------------- running
def run_cli(*args, timeout=600) -> subprocess.CompletedProcess:
    """``python -m alcs_tvm.cli ARGS`` from the repository root (the package comes from ``PYTHONPATH`` if set);
    arguments may be paths or numbers."""
    return subprocess.run([sys.executable, "-m", "alcs_tvm.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


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
