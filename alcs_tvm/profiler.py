"""Everything measured on a device: latency tables (``alcs profile``), whole-model latency, and the measurer the
tuner shares.

For every distinct conv configuration of the model (shape, stride, padding, dilation, V; identical layers once)
the profiler measures, on the device, through TVM RPC ``time_evaluator``:

* the dense conv as the compiler runs it: the ALCS kernel with every block kept, called as in the model (its
  :class:`~alcs_tvm.layer.KernelLayout`: fused epilogue, chained layouts), the same
  :func:`~alcs_tvm.kernels.sparse_conv2d_kernel` call the Relax pass makes;
* the sparse kernel at each grid sparsity with random SIMD-block masks. The mask travels as runtime data, so all
  masks of one grid point share one compiled function; when the spread (IQR / median) of a point is above
  ``spread_threshold`` more masks are measured and their samples pooled.

Every point is timed twice: with the layer's weights in cache (warm) and flushed before each call with its input
kept warm (cold, see :meth:`Measurer.time`). Inside a model a layer sees something in between (large weights
stream from memory there; timed warm only, every prediction comes out high: docs/latency.md), so the table's
latencies are ``warm + a * (cold - warm)`` with ``a`` calibrated on whole-model measurements
(:func:`calibrate_cold_fraction`).

All functions of one layer are built into one library (one upload per layer). Afterwards the whole model is
measured unpruned, compiled with the table as the compiler would; minus what its convs run this gives the "rest of
the model" (depthwise convs, pooling, adds, linear layers, VM overhead), so a prediction covers the whole model.

The table is saved atomically after every layer; rerunning the same command resumes (layers already in the
table are not measured again).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper

from . import frontend
from . import rpc as alcs_rpc
from .defaults import DEFAULT_SPARSITIES
from .compiler import ModelLayer, compile_module, export, model_layers
from .compiler import compile as alcs_compile
from .files import TableMismatchError, check_same_device
from .kernels import build_sparse_conv2d, sparse_conv2d_kernel
from .layer import layer_key
from .latency import LatencyTable, LayerProfile, cache_exposure
from .pruning import export_pruned, find_prunable_layers
from .run import run_model, time_model, write_sidecar
from .sparse_format import BlockSparseWeight, layer_group_width, random_block_sparse
from .target import resolve_target
from .timing import measure_interleaved
from .winograd import WINOGRAD_TILES, winograd_applies, winograd_conv2d, winograd_layout

__all__ = ["profile_model", "Measurer", "DEFAULT_SPARSITIES", "measure_layer", "layer_kernel", "build_kernels",
           "build_functions", "kernel_inputs", "random_pruned_onnx", "calibrate_cold_fraction", "layer_options",
           "measure_latency", "measure_latency_table", "Progress", "sample_stats"]

#: the whole model with every conv at each of these sparsities (random SIMD masks), and unpruned: the points the
#: cache-state calibration fits
CALIBRATION_SPARSITIES = (0.3, 0.5, 0.65, 0.8, 0.95)


# ----------------------------------------------------------------------------------------------- measuring
class Measurer:
    """Where kernels run: a device reached through RPC (tracker + key, or a server address) or this host."""

    def __init__(self, info, *, tracker=None, key=None, rpc=None, local=False, timeout=None, session=None):
        if session is not None:  # an open session (e.g. shared with end-to-end measurements)
            tracker, key = None, getattr(session, "alcs_key", None) or key
            rpc = "%s:%s" % tuple(getattr(session, "alcs_addr", ("?", "?")))
        if local == bool(tracker or rpc):
            raise ValueError("give one of --rpc-tracker HOST:PORT --rpc-key KEY, --rpc HOST:PORT or --local")
        if tracker and not key:
            raise ValueError("--rpc-tracker needs --rpc-key (e.g. x86-local or arm64-qemu)")
        if local and info.is_cross:
            raise ValueError(f"target {info.family} cannot run on this host: profile it on a device over RPC")
        self.info = info
        self.timeout = timeout  # None: each remote step bounded by what its kind took before (rpc.StepBudget)
        self.tracker, self.key, self.rpc = tracker, key, rpc
        self.device_key = key if key else (f"rpc:{rpc}" if rpc else "local")
        self.local = local
        self._session = session
        self._own = session is None and not local

    @property
    def session(self):
        """The RPC session (None for local), opened on first use: nothing waits for a device until needed."""
        if self._session is None and self._own:
            # no session deadline: a profile takes longer than any one step; guard() bounds each remote step
            self._session = alcs_rpc.connect(tracker=self.tracker, key=self.key, rpc=self.rpc,
                                             timeout=self.timeout, session_timeout=0)
        return self._session

    def describe(self) -> str:
        if self.local:
            return "this host"
        return f"RPC {self.rpc}" if self.rpc else f"device {self.key!r} at tracker {self.tracker}"

    def close(self):
        """End our own session now (the device is free for the next client at once, not when GC gets to it)."""
        if self._own and self._session is not None:
            self._session = None
            alcs_rpc.end_dropped_sessions()

    @property
    def device(self):
        return self.session.cpu(0) if self.session is not None else tvm.cpu(0)

    def _guard(self, what, **step):
        if self.session is None:
            return contextlib.nullcontext()
        return alcs_rpc.guard(self.session, what, self.timeout, **step)

    def load(self, lib_path):
        if self.session is None:
            return tvm.runtime.load_module(str(lib_path))
        return alcs_rpc.upload_library(self.session, lib_path, timeout=self.timeout)

    def tensors(self, arrays):
        with self._guard("tensor transfer", kind="transfer", units=sum(np.asarray(a).nbytes for a in arrays)):
            return [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]

    def time(self, module, name, args, repeat, min_repeat_ms, cold_weights=False) -> list:
        """Per-call milliseconds of ``repeat`` samples (each sample: as many calls as fill ``min_repeat_ms``).

        ``cold_weights``: every sample is one call after every argument but the first (the input) was flushed
        from the CPU caches, which is the state a layer meets inside a model: its input was just written by the
        previous layer, its weights were evicted by the other layers' weights since the last inference (a layer
        whose weights exceed the caches runs as slowly in its model as cold: docs/latency.md)."""
        samples = max(int(repeat), 30) if cold_weights else int(repeat)
        expected = None
        if self.session is not None and self.timeout is None:
            # one call first, for the expected time of the timing below: a kernel many times slower than the ones
            # timed before must not trip its bound (the call's own bound is learnt from earlier calls). Its wall
            # time, round trip included, overestimates a sample's: the bound errs on the long side.
            started = time.monotonic()
            with self._guard(f"first call of {name}", kind="kernel call"):
                module.time_evaluator(name, self.device, number=1, repeat=1)(*args)
            call = time.monotonic() - started
            # a warm sample lasts at least min_repeat_ms; reaching it may take the evaluator two tries
            sample = call if cold_weights else 2 * max(call, min_repeat_ms / 1e3)
            expected = (samples + 1) * sample
        with self._guard(f"timing of {name}", kind="timing", expected=expected):
            if cold_weights:
                evaluator = module.time_evaluator(name, self.device, number=1, repeat=samples,
                                                  f_preproc="cache_flush_cpu_non_first_arg")
            else:
                evaluator = module.time_evaluator(name, self.device, number=1, repeat=int(repeat),
                                                  min_repeat_ms=int(min_repeat_ms))
            return [float(r) * 1e3 for r in evaluator(*args).results]

    def time_model(self, lib_path, repeat, min_repeat_ms) -> list:
        """Per-inference milliseconds of a Relax executable library (inputs made up from its sidecar)."""
        _, timings = time_model(lib_path, repeat=repeat, sample_ms=min_repeat_ms, session=self.session,
                                timeout=self.timeout)
        return timings["results_ms"]


def sample_stats(samples):
    """``(median, interquartile range)`` of timing samples."""
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return float(med), float(q3 - q1)


def layer_kernel(layer: ModelLayer, weight: BlockSparseWeight, bias, info, name, schedule=None,
                 one_activation_buffer=False):
    """The kernel ``layer`` runs in its model (fused bias/activation/shortcut, chained layouts) for ``weight``."""
    return sparse_conv2d_kernel(weight, layer.spec, layer.layout, bias=bias, target=info, name=name,
                                schedule=schedule, one_activation_buffer=one_activation_buffer)


def build_kernels(kernels: dict, info, measurer: Measurer, stem: str, workdir=None):
    """Build kernels (name -> SparseConv2dKernel) into one library and load it on the device: one upload."""
    return build_functions({n: k.func for n, k in kernels.items()}, info, measurer, stem, workdir)


def build_functions(funcs: dict, info, measurer: Measurer, stem: str, workdir=None):
    """Build PrimFuncs (name -> PrimFunc, each exported under its name) into one library and load it on the
    device: one upload."""
    mod = tvm.IRModule({tvm.ir.GlobalVar(n): f.with_attr("global_symbol", n) for n, f in funcs.items()})
    executable = tvm.compile(mod, target=info.target)
    with tempfile.TemporaryDirectory(prefix="alcs-profile-", dir=workdir) as tmp:
        return measurer.load(export(executable, str(Path(tmp) / f"{stem}.so"), info))


def kernel_inputs(layer: ModelLayer, kernel, rng):
    """Random input and shortcut, and a zero output, shaped as ``kernel`` takes them: ``(x, shortcut, y)``
    (``shortcut`` is a list: empty without a fused residual)."""
    geom = kernel.geometry
    x = rng.standard_normal(geom.input_shape).astype(np.float32)  # NCHW, or padded / channel-blocked
    y = np.zeros(kernel.output_shape, np.float32)
    shortcut = [] if layer.layout.residual is None else [rng.standard_normal(kernel.residual_shape).astype(np.float32)]
    return x, shortcut, y


def measure_layer(layer: ModelLayer, info, measurer: Measurer, sparsities, *, repeat=20, min_repeat_ms=10,
                  max_masks=3, spread_threshold=0.05, seed=0, workdir=None, cold_fraction=0.0) -> LayerProfile:
    """Measure one conv configuration: dense (all blocks kept) and the sparse kernel at every grid sparsity, each
    with the weights in cache (warm) and flushed (cold, see :meth:`Measurer.time`); ``sparse_ms``/``dense_ms``
    mix the two by ``cold_fraction`` (:meth:`LayerProfile.mix_cache_states`)."""
    spec, v = layer.spec, layer.vector_width
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal(spec.weight_shape) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(spec.out_channels) * 0.1).astype(np.float32) if layer.layout.bias else None

    def kernel(w, name, keep_all=False):
        """The kernel as the model calls it (timed warm) and its one-activation-buffer twin ``<name>_io`` (timed
        cold: TVM's stock flush of every argument but the first then flushes the weights and spares the
        activations, which a layer inside a model finds in cache)."""
        weight = BlockSparseWeight.from_dense(w, v, keep_all=keep_all)
        return (layer_kernel(layer, weight, bias, info, name),
                layer_kernel(layer, weight, bias, info, f"{name}_io", one_activation_buffer=True))

    def build(kernels):
        return build_kernels({k.func.attrs["global_symbol"]: k for pair in kernels.values() for k in pair},
                             info, measurer, layer.key, workdir)

    # masks per grid point, drawn up front (same rng sequence whether or not the extra masks get measured)
    masks = {i: [random_block_sparse(weight, v, s, rng) for _ in range(max_masks)]
             for i, s in enumerate(sparsities) if s > 0.0}
    # phase 1: dense + the first mask of every point, one library
    kernels = {"alcs_dense": kernel(weight, "alcs_dense", keep_all=True)}
    for i, ws in masks.items():
        kernels[f"alcs_sparse_{i}_0"] = kernel(ws[0], f"alcs_sparse_{i}_0")
    module = build(kernels)
    x, shortcut, y = kernel_inputs(layer, kernels["alcs_dense"][0], rng)
    at = kernels["alcs_dense"][1].activation_offsets
    io = np.zeros(at["size"], np.float32)
    io[at["x"]:at["x"] + x.size] = x.ravel()
    if shortcut:
        io[at["residual"]:at["residual"] + shortcut[0].size] = shortcut[0].ravel()

    def run(module, pair):
        """(warm samples, cold samples)"""
        k, k_io = pair
        constants = list(k.packed.arrays())
        warm_args = measurer.tensors([x] + constants + shortcut + [y])
        cold_args = [measurer.tensors([io])[0]] + warm_args[1:1 + len(constants)]
        return (measurer.time(module, k.func.attrs["global_symbol"], warm_args, repeat, min_repeat_ms),
                measurer.time(module, k_io.func.attrs["global_symbol"], cold_args, repeat, min_repeat_ms,
                              cold_weights=True))

    dense = run(module, kernels["alcs_dense"])
    samples = {i: run(module, kernels[f"alcs_sparse_{i}_0"]) for i in masks}
    # phase 2: points whose spread is high get more masks (run-length packing makes every mask its own kernel)
    noisy = [i for i in masks if sample_stats(samples[i][0])[1] > spread_threshold * sample_stats(samples[i][0])[0]]
    if noisy and max_masks > 1:
        extra = {f"alcs_sparse_{i}_{m}": kernel(masks[i][m], f"alcs_sparse_{i}_{m}")
                 for i in noisy for m in range(1, max_masks)}
        module = build(extra)
        for i in noisy:
            for m in range(1, max_masks):
                warm, cold = run(module, extra[f"alcs_sparse_{i}_{m}"])
                samples[i] = (samples[i][0] + warm, samples[i][1] + cold)
    warm_ms, cold_ms, spread_ms = [], [], []
    for i, s in enumerate(sparsities):
        warm, cold = dense if s == 0.0 else samples[i]
        warm_ms.append(sample_stats(warm)[0])
        cold_ms.append(sample_stats(cold)[0])
        spread_ms.append(sample_stats(warm)[1])
    dense_warm, dense_spread = sample_stats(dense[0])
    profile = LayerProfile(spec, v, [float(s) for s in sparsities], list(warm_ms), spread_ms, dense_warm,
                           dense_spread, warm_ms, cold_ms, dense_warm, sample_stats(dense[1])[0])
    winograd = measure_winograd(layer, weight, bias, info, measurer, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                rng=rng, workdir=workdir)
    if winograd is not None:
        profile.winograd_tile, profile.winograd_warm_ms, profile.winograd_cold_ms = winograd
        profile.winograd_ms = profile.winograd_warm_ms
    profile.mix_cache_states(cold_fraction)
    return profile


def measure_winograd(layer: ModelLayer, weight, bias, info, measurer: Measurer, *, repeat, min_repeat_ms, rng,
                     workdir=None):
    """``(tile, warm_ms, cold_ms)`` of the fastest Winograd tile for ``layer``'s dense ``weight``, or None when the
    conv cannot run as Winograd: its three kernels timed one by one and summed, the GEMM (which holds the weights)
    also with its weights flushed for the cold time. The input comes as the compiler feeds it: channel-blocked
    and bordered (the compiler blocks an NCHW input first)."""
    if winograd_applies(layer.spec, info.vector_width):
        return None
    layout = winograd_layout(layer.spec, layer.layout, layer.vector_width, info.vector_width)
    convs = {tile: winograd_conv2d(weight, layer.spec, layout, tile=tile, bias=bias, target=info)
             for tile in WINOGRAD_TILES}
    module = build_functions({f"alcs_winograd{tile}_{stage}": func for tile, conv in convs.items()
                              for stage, func in (("in", conv.input_func), ("gemm", conv.gemm.func),
                                                  ("out", conv.output_func))},
                             info, measurer, f"{layer.key}_winograd", workdir)
    found = {}
    for tile, conv in convs.items():
        g = conv.geometry
        x = rng.standard_normal((g.batch, g.in_blocks, g.buffer_height, g.buffer_width, g.input_block))
        shortcut = [] if g.residual is None else [rng.standard_normal(g.residual_shape).astype(np.float32)]
        stage_in = measurer.tensors([x.astype(np.float32), np.zeros(g.transformed_input_shape, np.float32)])
        gemm = [stage_in[1]] + measurer.tensors(list(conv.gemm.packed.arrays()) +
                                                [np.zeros(g.gemm_output_shape, np.float32)])
        stage_out = [gemm[-1]] + measurer.tensors([conv.bias] + shortcut + [np.zeros(g.output_shape, np.float32)])

        def median(name, args, cold=False):
            return sample_stats(measurer.time(module, name, args, repeat, min_repeat_ms, cold_weights=cold))[0]

        transforms = median(f"alcs_winograd{tile}_in", stage_in) + median(f"alcs_winograd{tile}_out", stage_out)
        found[tile] = (transforms + median(f"alcs_winograd{tile}_gemm", gemm),
                       transforms + median(f"alcs_winograd{tile}_gemm", gemm, cold=True))
    best = min(found, key=lambda t: found[t][0])
    return (best,) + found[best]


def random_pruned_onnx(onnx_model, vector_width, sparsity_by_name, rng):
    """A copy of the ONNX model whose named Conv nodes have their weight initializers pruned with random
    SIMD-block masks at the given sparsities (names are the ONNX node names as the compile report names them,
    :func:`alcs_tvm.frontend.node_names`; the copy has every node named so). ``vector_width``: the group width,
    or a :class:`TargetInfo` (each conv gets its group width)."""
    model = onnx.ModelProto()
    model.CopyFrom(frontend.name_nodes(onnx_model))
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in sparsity_by_name or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init).astype(np.float32)
        v = layer_group_width(vector_width, w.shape[0])
        init.CopyFrom(numpy_helper.from_array(random_block_sparse(w, v, sparsity_by_name[node.name], rng), init.name))
    return model


#: Upper clamp of the calibrated cold fraction, a sanity bound; the binding one is physical: the rest of the model
#: (what is not a conv) cannot take negative time. A fraction above 1 is real: a layer with large activations
#: (MobileNetV2's 112x112 and 56x56 layers write megabytes per call) misses on its activations inside the model
#: too, so it runs slower there than with only its weights flushed (docs/latency.md).
MAX_COLD_FRACTION = 4.0


#: cache sizes the calibration tries, as fractions of the largest calibration point's weight footprint (a cache
#: holding more than that keeps every configuration whole, and the fraction stops mattering)
CACHE_SIZE_GRID = np.linspace(0.0, 1.0, 33)


def calibrate_cold_fraction(table, runs, wholes_ms, rest_weight_bytes=None):
    """Fit ``whole = rest + sum(warm + a * e * (cold - warm))`` over whole-model measurements (the unpruned model and
    copies pruned at :data:`CALIBRATION_SPARSITIES`) for the cold fraction ``a``, ``rest`` and the cache size
    ``C`` in the exposure ``e = cache_exposure(footprint, C)`` (:func:`~alcs_tvm.latency.cache_exposure`): a
    small model whose weights fit in the caches once pruned (MTCNN's O-Net, 1.2-2.2 MB) finds them there, a big
    one does not whatever its sparsity. Least squares in relative error, ``a`` in [0, :data:`MAX_COLD_FRACTION`],
    ``rest >= 0``, ``C`` the best of :data:`CACHE_SIZE_GRID` (0, the fraction alone, on ties).

    ``runs``: what each build runs per conv, ``(layer key, option, sparsity)`` (:func:`layer_options`), the option
    one of :meth:`LayerProfile.options`; ``wholes_ms``: each build's measured time; ``rest_weight_bytes``: the
    bytes of the model's weights that are not in ``runs`` (None: the cache size is not fitted, ``C = 0``). Returns
    ``(a, rest, C)``."""
    warm, gap = [], []
    for run in runs:
        states = [table.layers[key].cache_states(option, sparsity) for key, option, sparsity in run]
        warm.append(sum(w for w, _ in states))
        gap.append(sum(c - w for w, c in states))
    y, warm, gap = (np.asarray(v, float) for v in (wholes_ms, warm, gap))
    footprint = [1.0] * len(runs)  # any, with no cache size to set it against
    sizes = [0.0]
    if rest_weight_bytes is not None:
        footprint = [table.footprint(run, rest_weight_bytes) for run in runs]
        sizes = [f * max(footprint) for f in CACHE_SIZE_GRID]
    best = None
    for size in sizes:
        exposed = gap * np.array([cache_exposure(f, size) for f in footprint])
        a, rest, objective = _fit_fraction(y, warm, exposed)
        # a better fit must beat the best by more than rounding (1e-12: relative errors of 1e-6), else equal fits
        # would be told apart by the host's floating-point noise
        if best is None or objective < best[3] * (1 - 1e-9) - 1e-12:
            best = (a, rest, float(size), objective)
    return best[:3]


def _fit_fraction(y, warm, gap):
    """``(a, rest, objective)`` of ``y = rest + warm + a * gap`` by least squares in relative error, bounded."""
    weight = 1.0 / y  # relative errors: a small pruned model's point counts as much as the dense one

    def fit_rest(a):  # the weighted least-squares rest for a given fraction
        return float(np.sum(weight ** 2 * (y - warm - a * gap)) / np.sum(weight ** 2))

    def objective(a, rest):
        return float(np.sum((weight * (y - rest - warm - a * gap)) ** 2))

    if np.ptp(gap) < 0.02 * y.max():  # the cache states differ by under 2% of the model: a is irrelevant, 0
        candidates = [(0.0, fit_rest(0.0))]
    else:
        design = np.stack([np.ones_like(y), gap], axis=1) * weight[:, None]
        rest, a = np.linalg.lstsq(design, weight * (y - warm), rcond=None)[0]
        candidates = [(float(a), float(rest))]
        for bound in (0.0, MAX_COLD_FRACTION):  # a at a bound, the rest refitted
            candidates.append((bound, fit_rest(bound)))
        # rest at 0: the fraction alone, through the origin
        through = float(np.sum(weight ** 2 * gap * (y - warm)) / np.sum(weight ** 2 * gap ** 2))
        candidates.append((min(MAX_COLD_FRACTION, max(0.0, through)), 0.0))
    feasible = [(a, r) for a, r in candidates if 0.0 <= a <= MAX_COLD_FRACTION and r >= 0.0]
    if not feasible:  # the convs alone take longer than the measured models even warm: a busy host
        feasible = [(0.0, fit_rest(0.0))]
    a, rest = min(feasible, key=lambda ar: objective(*ar))
    return a, rest, objective(a, rest)


def rest_weight_bytes(onnx_model, layers) -> float:
    """Bytes of ``onnx_model``'s initializers other than the weights of ``layers`` (its rewritable convs, named as
    the ONNX nodes): what the rest of the model reads per inference besides the convs' weights."""
    conv_weights = {node.input[1] for node in onnx_model.graph.node
                    if node.op_type == "Conv" and node.name in {layer.name for layer in layers}}
    return float(sum(int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
                     for init in onnx_model.graph.initializer if init.name not in conv_weights))


def layer_options(report) -> list:
    """``(layer key, option, sparsity)`` per groups=1 conv of a compile report: what the build runs for it, named
    as :meth:`LayerProfile.options` names it."""
    return [(layer_key(d.spec, d.vector_width), d.algorithm if d.algorithm.startswith("winograd") else d.decision,
             1.0 - d.density) for d in report.layers if d.op == "conv2d" and d.spec is not None]


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """One-line progress bar on stderr: steps done / total and the time left."""

    def __init__(self, total, label="layers", stream=None, quiet=False, width=24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.done = 0
        self.measured = 0
        self.t0 = time.perf_counter()

    def _fmt(self, seconds):
        seconds = int(round(seconds))
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

    def show(self, what=""):
        if self.quiet:
            return
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        left = "?"
        if self.measured:
            per = (time.perf_counter() - self.t0) / self.measured
            left = self._fmt(per * (self.total - self.done))
        line = f"\r[{bar}] {self.done}/{self.total} {self.label}, {left} left {what}"
        self.stream.write(line[:160].ljust(100))
        self.stream.flush()

    def step(self, measured=True, what=""):
        self.done += 1
        self.measured += int(measured)
        self.show(what)

    def close(self):
        if not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------- profile
def _new_or_resumed_table(path, info, measurer, settings) -> LatencyTable:
    if path is not None and os.path.exists(path):
        table = LatencyTable.load(path)
        table.check_compatible(info, tvm.__version__)
        check_same_device(path, table.device_key, measurer.device_key)
        if table.settings.get("sparsities") != settings["sparsities"]:
            raise TableMismatchError(f"{path} was measured at sparsities {table.settings.get('sparsities')}, "
                                     f"not {settings['sparsities']}: write a new table (-o) or use its grid")
        if table.settings.get("group_widths") != settings["group_widths"]:
            raise TableMismatchError(f"{path} was measured with pruning group widths "
                                     f"{table.settings.get('group_widths', 'of an older version')}, not "
                                     f"{settings['group_widths']}: write a new table (-o)")
        if table.settings.get("weights", "warm") != settings["weights"]:
            raise TableMismatchError(f"{path} was measured with {table.settings.get('weights', 'warm')} weights, "
                                     f"not {settings['weights']}: write a new table (-o)")
        return table
    return LatencyTable(json.loads(info.key), info.family, measurer.device_key, tvm.__version__, dict(settings))


def profile_model(model, output, target="x86", *, tracker=None, key=None, rpc=None, local=False,
                  input_shapes=None, vector_width=None, sparsities=DEFAULT_SPARSITIES, repeat=20, min_repeat_ms=10,
                  max_masks=3, spread_threshold=0.05, model_name=None, measure_rest=True, timeout=None,
                  quiet=False, on_measured=None, seed=0, session=None, cold_weights=None) -> LatencyTable:
    """Profile ``model`` (ONNX) into the table at ``output`` (resumed if it exists). ``on_measured(key)`` is
    called after each layer measurement is saved; ``session`` an open RPC session to use instead of connecting.

    Every point is timed with the layer's weights in cache and flushed from it. ``cold_weights``: which one the
    table uses - ``None`` (default): the mix calibrated on whole-model measurements (the model unpruned, and with
    every conv at each of :data:`CALIBRATION_SPARSITIES`), see :func:`calibrate_cold_fraction`; ``True``: cold;
    ``False``: warm. Returns the table."""
    sparsities = [float(s) for s in sparsities]
    if not sparsities or sorted(set(sparsities)) != sparsities:
        raise ValueError(f"sparsities must be strictly ascending, got {sparsities}")
    if sparsities[0] < 0 or sparsities[-1] >= 1:
        raise ValueError(f"sparsities must be in [0, 1), got {sparsities}")
    if repeat < 3 or min_repeat_ms < 0 or max_masks < 1:
        raise ValueError("--repeat must be >= 3, --min-repeat-ms >= 0, --masks >= 1")
    layers, info, onnx_model, mod = model_layers(model, target, input_shapes=input_shapes,
                                                 vector_width=vector_width, return_module=True)
    if model_name is None:
        model_name = Path(model).stem if isinstance(model, (str, os.PathLike)) else "model"
    measurer = Measurer(info, tracker=tracker, key=key, rpc=rpc, local=local, timeout=timeout, session=session)
    settings = {"sparsities": sparsities, "repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms),
                "max_masks": int(max_masks), "spread_threshold": float(spread_threshold),
                "statistic": "median; spread = interquartile range", "seed": int(seed),
                "weights": {None: "calibrated", True: "cold", False: "warm"}[cold_weights],
                "group_widths": list(info.group_widths())}
    table = _new_or_resumed_table(output, info, measurer, settings)
    try:
        return _profile(table, layers, info, onnx_model, mod, measurer, output, sparsities, repeat, min_repeat_ms,
                        max_masks, spread_threshold, model_name, measure_rest, quiet, on_measured, seed,
                        cold_weights, input_shapes)
    finally:
        measurer.close()


def _build_whole(info, mod, table):
    """The whole model compiled as ``alcs compile --latency-table`` compiles it with ``table`` as measured so far
    (the calibration must see the algorithms, and so the weights and caches, the compiler will use), exported to a
    temporary directory that lives as long as the returned handle: ``(handle, library, layer_options(report))``."""
    executable, report, _ = compile_module(mod, info, latency_table=table)
    tmp = tempfile.TemporaryDirectory(prefix="alcs-profile-")
    lib = export(executable, str(Path(tmp.name) / "model.so"), info)
    write_sidecar(lib, mod, target=info.target)
    return tmp, lib, layer_options(report)


def _time_whole(measurer, builds, repeat, min_repeat_ms) -> list:
    """``(median, spread)`` of each distinct build of :func:`_build_whole` in ``builds``, timed in the order
    given; a build listed twice pools the samples of its runs."""
    samples = {}
    for _, lib, _ in builds:
        samples.setdefault(lib, []).extend(measurer.time_model(lib, repeat, min_repeat_ms))
    return [sample_stats(found) for found in samples.values()]


def _profile(table, layers, info, onnx_model, mod, measurer, output, sparsities, repeat, min_repeat_ms, max_masks,
             spread_threshold, model_name, measure_rest, quiet, on_measured, seed, cold_weights, input_shapes=None):
    fixed_fraction = None if cold_weights is None else float(bool(cold_weights))
    # the model pruned (random SIMD masks at each of CALIBRATION_SPARSITIES): the cache-state calibration's points, and
    # the layers as the compiler runs them once pruned. A layer whose dense weight runs wider than its pruning
    # groups (a 1000-class conv classifier: 32 lanes with a partial last block, pruned 16 wide) is measured at
    # both widths, so a prediction finds whichever width the compiler picks for a weight.
    rng = np.random.default_rng(seed)
    pruned_mods, pruned_layers = [], []
    for sparsity in CALIBRATION_SPARSITIES:
        pruned = random_pruned_onnx(onnx_model, info, {layer.name: sparsity for layer in layers}, rng)
        # the copy has the model's declared inputs: a dynamic dim needs the shapes the model was imported with
        found, _, _, pruned_mod = model_layers(pruned, info, input_shapes=input_shapes, return_module=True)
        pruned_mods.append(pruned_mod)
        pruned_layers += found
    first = {}
    for layer in layers + pruned_layers:
        first.setdefault(layer.key, layer)
    distinct = list(first)
    # the rest is reused only for the same architecture: a table resumed with another model under the same name
    # (another input size, say) must not predict it with the old model's rest
    previous = table.models.get(model_name, {})
    rest_done = "rest_ms" in previous and [k for _, k in previous.get("layers", [])] == [l.key for l in layers]
    skipped = sum(k in table.layers for k in distinct)
    calibrate = measure_rest and not rest_done
    todo = len(distinct) - skipped + (1 + (len(CALIBRATION_SPARSITIES) if fixed_fraction is None else 0)
                                      if calibrate else 0)
    progress = Progress(todo, label="to measure", quiet=quiet)
    progress.show(f"(resumed: {skipped} layers already in the table)" if skipped else "")
    # a layer measured after the calibration (a table resumed with the model's rest done) mixes its cache states
    # as the calibration mixed the others; before it, the calibration below mixes every layer
    fraction = fixed_fraction if fixed_fraction is not None else previous.get(
        "table_cold_fraction", previous.get("cold_fraction", 0.0))
    for k in distinct:
        if k in table.layers:
            continue
        table.layers[k] = measure_layer(first[k], info, measurer, sparsities, repeat=repeat,
                                        min_repeat_ms=min_repeat_ms, max_masks=max_masks,
                                        spread_threshold=spread_threshold, seed=seed, cold_fraction=fraction)
        table.save(output)
        if on_measured:
            on_measured(k)
        progress.step(what=first[k].spec.describe())
    entry = table.models.setdefault(model_name, {})
    entry["layers"] = [[layer.name, layer.key] for layer in layers]
    if calibrate:
        dense_build = _build_whole(info, mod, table)
        progress.step(what="whole model, unpruned")
        fraction = fixed_fraction
        if fraction is None:  # and the copies pruned at the calibration sparsities
            builds = [dense_build]
            for sparsity, pruned_mod in zip(CALIBRATION_SPARSITIES, pruned_mods):
                builds.append(_build_whole(info, pruned_mod, table))
                progress.step(what=f"whole model, {sparsity:.0%} sparse")
            # every point timed twice, alternating, samples pooled: no point may come from one of the host's slow
            # episodes alone
            timed = _time_whole(measurer, builds + builds, repeat, min_repeat_ms)
            (whole, spread) = timed[0]
            rest_bytes = rest_weight_bytes(onnx_model, layers)
            fraction, rest_fit, cache_bytes = calibrate_cold_fraction(
                table, [b[2] for b in builds], [t[0] for t in timed], rest_bytes)
            entry.update({"cache_bytes": cache_bytes, "rest_weight_bytes": rest_bytes})
            # each point with what its build ran: the fit can be redone, or another cache model tried, offline
            entry["calibration"] = [{"sparsity": s, "whole_ms": t[0], "run": [list(option) for option in b[2]]}
                                    for s, t, b in zip((0.0,) + CALIBRATION_SPARSITIES, timed, builds)]
        else:
            [(whole, spread)] = _time_whole(measurer, [dense_build], repeat, min_repeat_ms)
            entry.update({"cache_bytes": 0.0})  # a fixed state whatever the footprint
        # the table's values: each layer in the unpruned model's cache state (what the compiler's choices and the
        # pruner's per-layer costs use); a prediction mixes a configuration's own (LatencyTable.predict)
        unpruned_state = fraction * cache_exposure(table.footprint(dense_build[2], entry.get("rest_weight_bytes", 0)),
                                                   entry.get("cache_bytes", 0.0))
        for k in distinct:
            table.layers[k].mix_cache_states(unpruned_state)
        entry["table_cold_fraction"] = unpruned_state
        convs = sum(table.layers[key].options(sparsity)[option] for key, option, sparsity in dense_build[2])
        if fixed_fraction is not None:
            rest_fit = whole - convs
        # the rest takes no negative time: when the convs timed alone sum to more than the whole model (a busy
        # host, or the cache state fixed by --weights), the fit's value is kept for the record and 0 is used
        rest = max(0.0, rest_fit)
        entry.update({"whole_dense_ms": whole, "whole_dense_spread_ms": spread, "convs_dense_ms": convs,
                      "rest_ms": rest, "rest_fit_ms": rest_fit, "cold_fraction": fraction,
                      "dense_run": [list(option) for option in dense_build[2]]})
        table.rest_ms[model_name] = rest
        table.save(output)
        if on_measured:
            on_measured("(rest of model)")
    else:
        table.save(output)
    progress.close()
    return table


# ------------------------------------------------------------------------------------- whole-model latency
def measure_latency(onnx_path: str, input_shape, target="x86", *, repeat: int = 40, number: int = 0,
                    latency_table=None, library_path: str | None = None, statistic: str = "min_ms"):
    """Compile ``onnx_path`` with :func:`alcs_tvm.compiler.compile` and time it with the Relax VM (``run_model``):
    ``(ms, report)``, ``ms`` the ``statistic`` of the samples (default the minimum, as the project's docs
    report: on a shared host the median carries other users' load). ``input_shape``: the shape of the model's
    (first) input it is compiled and timed for (a dynamic batch dimension included). ``number=0`` picks the
    inner count so one sample lasts ~10 ms."""
    model = frontend.load_onnx(onnx_path)
    name = next(iter(frontend.model_inputs(model)))
    executable, report = alcs_compile(model, target, latency_table=latency_table,
                                      input_shapes={name: tuple(input_shape)})
    with contextlib.ExitStack() as stack:
        if library_path is None:  # removed however the measurement ends (an error, Ctrl-C)
            own_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="alcs-prune-"))
            library_path = os.path.join(own_dir, "model.so")
        export(executable, library_path, target)
        write_sidecar(library_path, report.relax_module)
        x = np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)
        if number <= 0:
            _, timings = time_model(library_path, [x], repeat=repeat, min_number=20, probe_number=20)
        else:
            _, timings = run_model(library_path, [x], repeat=repeat, number=number)
    return timings[statistic], report


def measure_latency_table(model, input_shape, target="x86", *, model_name: str = "model",
                          sparsities=(0.0, 0.25, 0.5, 0.7, 0.85, 0.95), repeat: int = 15, seed: int = 0,
                          log=None) -> LatencyTable:
    """A small latency table measured on this host: every prunable conv of ``model`` at ``input_shape`` through
    the compiled sparse kernel (``build_sparse_conv2d(...).kernel_time_callable``, the kernel as it runs inside
    a compiled model) at each grid sparsity, random SIMD masks, minimum of ``repeat`` interleaved samples; plus
    ``rest_ms[model_name]`` = the measured dense model minus its convs at sparsity 0. A stand-in for
    ``alcs profile`` (use that when available: it profiles the dense alternative too)."""
    info = resolve_target(target)
    layers = find_prunable_layers(model, input_shape, info)
    rng = np.random.default_rng(seed)
    x_rng = np.random.default_rng(seed + 1)
    profiles = {}
    for layer in layers:
        key_profile = LayerProfile(layer.spec, layer.group_width)
        if key_profile.key in profiles:
            continue
        w = layer.module.weight.detach().numpy().astype(np.float32)
        bias = None if layer.module.bias is None else layer.module.bias.detach().numpy().astype(np.float32)
        x = x_rng.standard_normal(layer.spec.input_shape).astype(np.float32)
        fns = {}
        for s in sparsities:
            ws = random_block_sparse(w, layer.group_width, s, rng).reshape(w.shape)
            conv = build_sparse_conv2d(ws, input_shape=layer.spec.input_shape, stride=layer.spec.stride,
                                       padding=layer.spec.padding, dilation=layer.spec.dilation, bias=bias,
                                       activation="relu", target=info.target, vector_width=layer.group_width)
            fns[s] = conv.kernel_time_callable(x)
        stats = measure_interleaved(fns, repeat=repeat)
        key_profile.sparsities = [float(s) for s in sparsities]
        key_profile.sparse_ms = [stats[s].min for s in sparsities]
        key_profile.sparse_spread_ms = [float(np.subtract(*np.percentile(stats[s].samples, [75, 25])))
                                        for s in sparsities]
        profiles[key_profile.key] = key_profile
        if log:
            log(f"  {layer.name}: " + ", ".join(f"{s:.2f}:{ms:.4f}" for s, ms in
                                                   zip(sparsities, key_profile.sparse_ms)) + " ms")
    table = LatencyTable(json.loads(info.key), info.family, "local", tvm.__version__,
                         {"repeat": repeat, "source": "alcs_tvm.profiler.measure_latency_table"}, profiles, {})
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_pruned(model, os.path.join(tmp, "m.onnx"), input_shape)
        whole, _ = measure_latency(onnx_path, input_shape, info.target)
    convs = sum(profiles[LayerProfile(layer.spec, layer.group_width).key].sparse_ms[0] for layer in layers)
    table.rest_ms[model_name] = max(0.0, whole - convs)
    # the model's conv layers, so the rest is found by architecture (LatencyTable.rest_model_for), not by name
    table.models[model_name] = {"layers": [[layer.name, LayerProfile(layer.spec, layer.group_width).key]
                                           for layer in layers],
                                "rest_ms": table.rest_ms[model_name], "rest_fit_ms": whole - convs}
    if log:
        log(f"  whole dense model {whole:.4f} ms, convs {convs:.4f} ms -> rest {table.rest_ms[model_name]:.4f} ms")
    return table

