"""``alcs tune``: search the sparse kernel's schedule knobs for every conv of a model on the device.

The hand-written schedule (:mod:`alcs_tvm.schedules`) picks its register tile and task order from the register
file alone. The best choice also depends on what only the device knows - load ports, cache sizes, the number of
cores sharing a row tile - and on the layer's block density (row-outer order wins when blocks keep few
positions). ``alcs tune`` times a few candidates per layer - the default among them - on the device, as the layer
runs in the model (its fused epilogue, chained layouts, a random SIMD-block mask at the layer's density), and
records the fastest; ``alcs compile --tuning RECORDS`` builds each layer with its record.

Without a device, ``estimate=CORE`` (``alcs tune --estimate neoverse-n1``) ranks the same candidates by their
``llvm-mca`` estimate on a core model (:mod:`alcs_tvm.estimate`) instead of timing them: the records then say
so (``settings["estimate"]``, each layer's ``"estimated"``; ms are estimated single-core times, not measurements)
and ``alcs compile`` reports those layers as having an estimated schedule.

The records (:mod:`alcs_tvm.tuning_records`) are written atomically after every layer; rerunning resumes.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import tvm

from . import estimate as estimator
from .compiler import model_layers
from .files import check_same_device
from .kernels import max_run_length
from .profiler import Measurer, Progress, build_kernels, kernel_inputs, layer_kernel, sample_stats
from .schedules import SparseConvSchedule, choose_tile, default_sparse_conv_schedule, register_budget
from .sparse_format import BlockSparseWeight, random_block_sparse
from .tuning_records import TuningRecords

__all__ = ["candidate_schedules", "tune_layer", "estimate_layer_schedules", "tune_model"]


def candidate_schedules(family: str, spec, vector_width: int, limit: int = 12, density: float = 1.0) -> list:
    """The default schedule (for a weight of this block ``density``) first, then other register tiles (fewer/more
    columns, 1 or several rows) in both task orders; at most ``limit``, all within the full register budget."""
    max_run = max_run_length(spec)
    default = default_sparse_conv_schedule(family, vector_width, spec.out_height, spec.out_width, max_run,
                                           pointwise=spec.kernel == (1, 1), density=density)
    max_acc, max_cols = register_budget(family, vector_width, max_run)
    tiles = [(default.tile_rows, default.tile_cols)]
    for budget, cols in ((max_acc, max_cols), (max_acc, max_cols // 2), (max_acc // 2, max_cols),
                         (max_acc // 2, max_cols // 2), (max_acc, 4), (max_acc // 4, max_cols)):
        tiles.append(choose_tile(spec.out_height, spec.out_width, max(1, budget), max(1, cols)))
    tiles.append((1, min(spec.out_width, max_cols)))
    candidates = []
    for row_outer in (False, True):
        for rows, cols in dict.fromkeys(tiles):
            candidates.append(SparseConvSchedule(vector_width, rows, cols, row_outer))
    candidates = [c for c in dict.fromkeys(candidates) if c != default]
    return [default] + candidates[:max(0, limit - 1)]


def _layer_weight(layer, rng):
    """A random SIMD-block mask at the layer's density, and a bias if its kernel takes one."""
    spec, v = layer.spec, layer.vector_width
    dense = (rng.standard_normal(spec.weight_shape) * 0.1).astype(np.float32)
    sparsity = min(1.0, max(0.0, 1.0 - float(layer.density)))
    weight = BlockSparseWeight.from_dense(random_block_sparse(dense, v, sparsity, rng), v)
    bias = (rng.standard_normal(spec.out_channels) * 0.1).astype(np.float32) if layer.layout.bias else None
    return weight, bias


def _record(layer, candidates, times, **extra) -> dict:
    best = int(np.argmin(times))
    return {"key": layer.key, "layout": layer.layout.to_json(), "density": round(float(layer.density), 4),
            "schedule": asdict(candidates[best]), "tuned_ms": times[best], "default_ms": times[0],
            "default_schedule": asdict(candidates[0]),
            "candidates": [{"schedule": s.describe(), "ms": t} for s, t in zip(candidates, times)], **extra}


def estimate_layer_schedules(layer, info, core, *, max_candidates=12, seed=0) -> dict:
    """The record of one conv with its candidates ranked by their ``llvm-mca`` estimate on ``core`` (an
    :class:`~alcs_tvm.estimate.Core`) instead of timings: ``ms`` are estimated single-core times."""
    rng = np.random.default_rng(seed)
    weight, bias = _layer_weight(layer, rng)
    candidates = candidate_schedules(info.family, layer.spec, layer.vector_width, max_candidates,
                                     density=weight.density)
    times = [estimator.estimate_kernel(layer_kernel(layer, weight, bias, info, f"alcs_tune_{i}", schedule=s), info,
                                       core).microseconds / 1e3 for i, s in enumerate(candidates)]
    return _record(layer, candidates, times, estimated=f"llvm-mca -mcpu={core.mcpu}")


def tune_layer(layer, info, measurer, *, repeat=10, min_repeat_ms=5, max_candidates=12, seed=0) -> dict:
    """Time the candidate schedules of one conv (random mask at its density) and return its record."""
    spec, v = layer.spec, layer.vector_width
    rng = np.random.default_rng(seed)
    weight, bias = _layer_weight(layer, rng)
    candidates = candidate_schedules(info.family, spec, v, max_candidates, density=weight.density)
    kernels = {f"alcs_tune_{i}": layer_kernel(layer, weight, bias, info, f"alcs_tune_{i}", schedule=s)
               for i, s in enumerate(candidates)}
    module = build_kernels(kernels, info, measurer, f"tune_{layer.key}")
    x, shortcut, y = kernel_inputs(layer, kernels["alcs_tune_0"], rng)
    times = []
    for name, kernel in kernels.items():
        args = measurer.tensors([x] + list(kernel.packed.arrays()) + shortcut + [y])
        times.append(sample_stats(measurer.time(module, name, args, repeat, min_repeat_ms))[0])
    return _record(layer, candidates, times)


def tune_model(model, output, target="x86", *, tracker=None, key=None, rpc=None, local=False, input_shapes=None,
               vector_width=None, repeat=10, min_repeat_ms=5, max_candidates=12, timeout=None, quiet=False,
               session=None, seed=0, estimate: str | None = None) -> TuningRecords:
    """Tune every rewritable conv of ``model`` (ONNX) on the device into the records at ``output`` (resumed if it
    exists: a conv already tuned with the same shape, layout and density is not measured again).
    ``estimate``: a core of :data:`alcs_tvm.estimate.CORES` - rank the candidates by their estimate on it, no
    device (the records say estimated)."""
    if repeat < 3 or min_repeat_ms < 0 or max_candidates < 1:
        raise ValueError("--repeat must be >= 3, --min-repeat-ms >= 0, --candidates >= 1")
    layers, info, _, _ = model_layers(model, target, input_shapes=input_shapes, vector_width=vector_width,
                                      return_module=True)
    if estimate is not None:
        if estimate not in estimator.CORES:
            raise ValueError(f"unknown core {estimate!r} for --estimate: use one of {', '.join(estimator.CORES)}")
        core = estimator.CORES[estimate]
        if (core.isa == "aarch64") != (info.family == "arm64"):
            raise ValueError(f"--estimate {estimate} models an {core.isa} core, not the {info.family} target")
        if tracker or rpc or local or session is not None:
            raise ValueError("--estimate needs no device: leave out --rpc-tracker/--rpc/--local")
        measurer, device_key = None, f"llvm-mca:{core.mcpu}"
        settings = {"max_candidates": int(max_candidates), "seed": int(seed),
                    "statistic": "llvm-mca estimate, not measured", "estimate": core.mcpu}
    else:
        measurer = Measurer(info, tracker=tracker, key=key, rpc=rpc, local=local, timeout=timeout,
                            session=session)
        device_key = measurer.device_key
        settings = {"repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms), "max_candidates": int(max_candidates),
                    "statistic": "median", "seed": int(seed)}
    if output is not None and os.path.exists(output):
        records = TuningRecords.load(output)
        records.check_compatible(info, tvm.__version__)
        check_same_device(output, records.device_key, device_key, "tuned")
    else:
        records = TuningRecords(json.loads(info.key), info.family, device_key, tvm.__version__, settings)

    def done(layer):  # a record the compiler would apply, measured at this density
        schedule, _ = records.schedule_for(layer.name, layer.key, layer.layout)
        return schedule is not None and records.layers[layer.name]["density"] == round(float(layer.density), 4)

    todo = [layer for layer in layers if not done(layer)]
    progress = Progress(len(todo), label="convs to tune", quiet=quiet)
    progress.show(f"(resumed: {len(layers) - len(todo)} already tuned)" if len(todo) < len(layers) else "")
    try:
        for layer in todo:
            if measurer is None:
                records.layers[layer.name] = estimate_layer_schedules(layer, info, core,
                                                                      max_candidates=max_candidates, seed=seed)
            else:
                records.layers[layer.name] = tune_layer(layer, info, measurer, repeat=repeat,
                                                        min_repeat_ms=min_repeat_ms, max_candidates=max_candidates,
                                                        seed=seed)
            records.save(output)
            entry = records.layers[layer.name]
            progress.step(what=f"{layer.name}: {TuningRecords.schedule_of(entry).describe()} "
                               f"{entry['tuned_ms']:.4f} ms (default {entry['default_ms']:.4f})")
    finally:
        progress.close()
        if measurer is not None:
            measurer.close()
    records.save(output)
    return records
