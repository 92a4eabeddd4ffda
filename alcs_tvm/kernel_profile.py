"""Where a compiled model's time goes: every kernel of one inference, timed on its own (``alcs run --profile``).

The Relax VM calls an instrument function around every call it makes; one inference under it records each
kernel's symbol and its argument tensors (the model's own constants and activations). Each distinct kernel call is
then timed with TVM's ``time_evaluator`` on exactly those arguments, so a row is the kernel's cost in the model
(with warm caches), free of the Python overhead an instrument adds. Calls the VM makes to its own builtins
(allocation, reshapes: no kernel) are left out; the difference between the whole inference and the sum of the rows
is what they, and the VM's dispatch, cost.

TVM's RPC cannot carry a host-side instrument function to a remote VM, so profiles run on this host.
"""
from __future__ import annotations

import collections
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from . import rpc as alcs_rpc
from .run import make_inputs, read_sidecar, sidecar_path, time_model

__all__ = ["KernelCall", "profile_library", "format_profile", "kernel_kind", "call_times", "time_by_kind"]


@dataclass
class KernelCall:
    symbol: str
    kind: str  # what the kernel does, from its symbol (kernel_kind)
    layers: list  # report names of the layers it runs, in call order (empty when the report does not say)
    shape: str  # the output's shape
    calls: int  # times one inference calls it with these shapes
    ms: float  # median time of one call

    @property
    def total_ms(self) -> float:
        return self.ms * self.calls


def kernel_kind(symbol: str) -> str:
    """What a kernel of a compiled model does, from its symbol."""
    if symbol.startswith("alcs_spconv_"):
        return "alcs conv"
    if symbol.startswith("alcs_dwconv_"):
        return "alcs depthwise (blocked)"
    if symbol.startswith("alcs_expand_dwconv_"):
        return "alcs expand + depthwise"
    if symbol.startswith("alcs_winograd"):
        return "alcs Winograd GEMM" if "_gemm" in symbol else "alcs Winograd transform"
    for part, kind in (("conv2d_transpose", "transposed conv"), ("conv2d", "conv (TVM schedule)"),
                       ("matmul", "matmul"), ("pool", "pooling"), ("mean", "pooling"), ("softmax", "softmax"),
                       ("concat", "concat"), ("resize", "resize"), ("transpose", "layout transform"),
                       ("layout_transform", "layout transform"), ("pad", "pad")):
        if part in symbol:
            return kind
    return "elementwise/other"


def _module_with(lib, symbol):
    """The (imported) module that defines ``symbol``: ``time_evaluator`` looks in one module only."""
    if lib.implements_function(symbol, query_imports=False):
        return lib
    for imported in lib.imports:
        found = _module_with(imported, symbol)
        if found is not None:
            return found
    return None


def _report_symbols(lib_path: Path) -> dict:
    """symbol -> layer names in graph order, from the compile report beside the library (if any)."""
    path = Path(f"{lib_path}.report.json")
    if not path.is_file():
        return {}
    try:
        layers = json.loads(path.read_text()).get("layers", [])
    except (OSError, ValueError):
        return {}
    names = {}
    for layer in layers:
        if isinstance(layer, dict) and layer.get("symbol"):
            names.setdefault(layer["symbol"], []).append(layer.get("name"))
    return names


def profile_library(lib_path, inputs=None, *, repeat: int = 20, sample_ms: float = 1.0, function: str = "main"):
    """Profile the Relax executable library ``lib_path`` on this host. Returns ``(rows, whole_ms)``: one
    :class:`KernelCall` per distinct kernel call, most expensive first, and the median time of the whole
    inference. ``inputs``: as for :func:`alcs_tvm.run.run_model` (default: made up from the sidecar)."""
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise FileNotFoundError(f"no such library: {lib_path}")
    machine = alcs_rpc.elf_machine(lib_path)
    if machine and machine != platform.machine():
        raise ValueError(f"{lib_path.name} is an {machine} library: per-kernel profiles run on this host only "
                         f"(TVM's RPC cannot carry the VM's instrument callback to a device)")
    if repeat < 1:
        raise ValueError("--repeat must be >= 1")
    sidecar = read_sidecar(lib_path)
    if inputs is None:
        if sidecar is None:
            raise ValueError(f"{lib_path} has no sidecar {sidecar_path(lib_path).name}; pass the inputs")
        inputs = make_inputs(sidecar)
    # checks the inputs; times the whole model in samples of back-to-back calls, as the kernels are timed below,
    # so that the difference between the two is the VM's and not a difference of timing method
    _, whole = time_model(lib_path, inputs, repeat=repeat)
    lib = tvm.runtime.load_module(str(lib_path))
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(lib, dev)
    names = [str(vm._get_function_param_name(function, i)) for i in range(int(vm._get_function_arity(function)))]
    arrays = [inputs[n] for n in names] if isinstance(inputs, dict) and set(names) <= set(inputs) else list(inputs)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
    calls = []

    def instrument(func, symbol, before, ret, *call_args):
        symbol = str(symbol)
        if before and not symbol.startswith("vm.builtin") and call_args and \
                all(hasattr(a, "shape") for a in call_args):
            calls.append((symbol, list(call_args)))
        return 0

    vm.set_instrument(instrument)
    vm[function](*args)
    layers_of = _report_symbols(lib_path)
    seen = {}
    for symbol, call_args in calls:
        key = (symbol, tuple(tuple(a.shape) for a in call_args))
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [call_args, 1]
    rows, used = [], {}
    for (symbol, shapes), (call_args, count) in seen.items():
        module = _module_with(lib, symbol)
        if module is None:
            continue  # a packed function of the runtime, not a kernel of this library
        probe = module.time_evaluator(symbol, dev, number=1, repeat=3)(*call_args)
        number = max(1, int(sample_ms / max(1e-6, float(np.median(probe.results)) * 1e3)))
        timed = module.time_evaluator(symbol, dev, number=number, repeat=repeat)(*call_args)
        names = layers_of.get(symbol, [])
        start = used.get(symbol, 0)
        used[symbol] = start + count
        rows.append(KernelCall(symbol, kernel_kind(symbol), [n for n in names[start:start + count] if n],
                               "x".join(map(str, shapes[-1])), count, float(np.median(timed.results)) * 1e3))
    rows.sort(key=lambda r: -r.total_ms)
    return rows, whole["median_ms"]


def format_profile(rows, whole_ms: float) -> str:
    """The table ``alcs run --profile`` prints: one row per kernel, the share of the whole inference."""
    table = [["kernel", "kind", "layer", "output", "calls", "ms", "% of total"]]
    for r in rows:
        layer = r.layers[0] + (f" (+{len(r.layers) - 1})" if len(r.layers) > 1 else "") if r.layers else "-"
        table.append([r.symbol, r.kind, layer, r.shape, str(r.calls), f"{r.total_ms:.4f}",
                      f"{100 * r.total_ms / whole_ms:.1f}" if whole_ms > 0 else "-"])
    kernels = sum(r.total_ms for r in rows)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    by_kind = {}
    for r in rows:
        by_kind[r.kind] = by_kind.get(r.kind, 0.0) + r.total_ms
    lines.append(f"whole inference {whole_ms:.4f} ms (median); kernels {kernels:.4f} ms; VM calls and dispatch "
                 f"{max(0.0, whole_ms - kernels):.4f} ms")
    lines.append("by kind: " + ", ".join(f"{k} {100 * v / whole_ms:.0f}%" for k, v in
                                         sorted(by_kind.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def call_times(vm, args, rounds: int, function: str = "main") -> list:
    """Every call one inference of ``vm[function](*args)`` makes, timed in sequence under the VM's call instrument
    (the caches as the inference leaves them; the instrument adds about a microsecond per call): one list of
    ``(symbol, seconds)`` in call order per round, after one inference untimed."""
    vm[function](*args)
    started, calls = [0.0], []

    def instrument(func, symbol, before, ret, *call_args):
        if before:
            started[0] = time.perf_counter()
        else:
            calls.append((str(symbol), time.perf_counter() - started[0]))
        return 0

    vm.set_instrument(instrument)
    rounds_timed = []
    for _ in range(rounds):
        calls = []
        vm[function](*args)
        rounds_timed.append(calls)
    return rounds_timed


def time_by_kind(executable, inputs, rounds: int = 5, function: str = "main") -> dict:
    """Share of one inference's time per kind of kernel (:func:`kernel_kind`; ``vm overhead`` for the VM's
    builtins), from the VM's call instrumentation over ``rounds`` inferences. ``inputs``: the arrays, in order."""
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    spent = collections.defaultdict(float)
    for calls in call_times(vm, args, rounds, function):
        for symbol, seconds in calls:
            spent["vm overhead" if symbol.startswith("vm.builtin") else kernel_kind(symbol)] += seconds
    total = sum(spent.values())
    return {k: round(v / total, 4) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
