"""``alcs tune``: search the sparse kernel's schedule knobs for every conv of a model on the device.

The hand-written schedule (:mod:`alcs_tvm.schedules`) picks its register tile and task order from the register
file alone. The best choice also depends on what only the device knows - load ports, cache sizes, the number of
cores sharing a row tile - and on the layer's block density (row-outer order wins when blocks keep few
positions). ``alcs tune`` times a few candidates per layer - the default among them - on the device, as the layer
runs in the model (its fused epilogue, chained layouts, a random SIMD-block mask at the layer's density), and
records the fastest; ``alcs compile --tuning RECORDS`` builds each layer with its record.

Records are keyed by the conv's name (ONNX node name) and checked against the layer's shape, V and layouts at
compile time: a record that no longer fits (another model, another input size) is ignored and said so in the
report, never applied wrongly. Written atomically after every layer; rerunning resumes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .latency import TableMismatchError, check_same_device
from .locking import read_json_file, write_json_atomic
from .schedules import SparseConvSchedule, default_sparse_conv_schedule
from .target import VECTOR_WIDTH_HELP

__all__ = ["TuningRecords", "candidate_schedules", "kernel_layout", "tune_model", "register_cli", "FORMAT",
           "describe_schedule"]

FORMAT = "alcs-tvm-tuning/1"


def candidate_schedules(family: str, spec, vector_width: int, limit: int = 12, density: float = 1.0) -> list:
    """The default schedule (for a weight of this block ``density``) first, then other register tiles (fewer/more
    columns, 1 or several rows) in both task orders; at most ``limit``, all within the full register budget."""
    from .operator import max_run_length
    from .schedules import _NATIVE_LANES, choose_tile

    if family.startswith("x86"):
        from .schedules import x86 as knobs
    else:
        from .schedules import arm64 as knobs
    max_run = max_run_length(spec)
    default = default_sparse_conv_schedule(family, vector_width, spec.out_height, spec.out_width, max_run,
                                           pointwise=spec.kernel == (1, 1), density=density)
    max_acc, max_cols = knobs.register_budget(family, vector_width)
    registers = max(1, vector_width // _NATIVE_LANES.get(family, vector_width))
    max_acc = max(1, (max_acc - 2 * (max_run - 1)) // registers)
    max_cols = max(1, max_cols // registers)
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


def kernel_layout(bias, activation, input_prepadded, input_block, output_blocked, output_pad, input_border,
                  residual, residual_pad, out_block=0) -> dict:
    """How a conv is called in its model (the fields of the compile report's ``kernel``): what a record must
    match to apply."""
    return {"bias": bool(bias), "activation": activation, "input_prepadded": bool(input_prepadded),
            "input_block": int(input_block), "output_blocked": bool(output_blocked),
            "output_pad": [int(p) for p in output_pad],
            "input_border": None if input_border is None else [int(p) for p in input_border],
            "residual": residual, "residual_pad": [int(p) for p in residual_pad], "out_block": int(out_block)}


def _layout(layer) -> dict:
    return kernel_layout(layer.bias, layer.activation, layer.input_prepadded, layer.input_block,
                         layer.output_blocked, layer.output_pad, layer.input_border, layer.residual,
                         layer.residual_pad, layer.out_block)


@dataclass
class TuningRecords:
    """The fastest measured schedule per conv of a model, on one device."""

    target: dict
    target_family: str
    device_key: str | None
    tvm_version: str
    settings: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)  # conv name -> {"key", "layout", "density", "schedule", "tuned_ms", ..}

    def save(self, path):
        write_json_atomic(path, {"format": FORMAT, **asdict(self)}, prefix=".tuning-")

    @classmethod
    def load(cls, path) -> "TuningRecords":
        data = read_json_file(path, "tuning records", FORMAT)
        try:
            records = cls(data["target"], data["target_family"], data.get("device_key"), data["tvm_version"],
                          dict(data.get("settings", {})), dict(data["layers"]))
            for name, entry in records.layers.items():
                missing = {"key", "layout", "schedule", "tuned_ms", "default_ms"} - set(entry)
                if missing:
                    raise KeyError(f"conv {name!r} lacks {', '.join(sorted(missing))}")
                cls._schedule(entry)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"tuning records {path} are corrupted: {err}") from None
        return records

    def check_compatible(self, target_info, tvm_version: str):
        """Raise :class:`TableMismatchError` when the records were measured for another target or TVM."""
        wanted = json.loads(target_info.key)
        if wanted != self.target:
            raise TableMismatchError(f"tuning records were measured for target {self.target} ({self.target_family}),"
                                     f" not {wanted} ({target_info.family}): tune this target with `alcs tune`")
        if tvm_version != self.tvm_version:
            raise TableMismatchError(f"tuning records were measured with TVM {self.tvm_version}, this is TVM "
                                     f"{tvm_version}: re-tune")

    @staticmethod
    def _schedule(entry) -> SparseConvSchedule:
        s = entry["schedule"]
        return SparseConvSchedule(int(s["vector_width"]), int(s["tile_rows"]), int(s["tile_cols"]),
                                  bool(s["row_outer"]))

    def schedule_for(self, name: str, key: str, layout: dict):
        """``(schedule or None, why)``: the record of conv ``name`` if it was tuned with this shape, V and layout."""
        entry = self.layers.get(name)
        if entry is None:
            return None, "no tuning record"
        if entry["key"] != key or entry["layout"] != layout:
            return None, "tuning record is for another shape or layout"
        return self._schedule(entry), None


def describe_schedule(schedule: SparseConvSchedule) -> str:
    return f"{schedule.tile_rows}x{schedule.tile_cols}" + (" row-outer" if schedule.row_outer else "")


def tune_layer(layer, info, measurer, *, repeat=10, min_repeat_ms=5, max_candidates=12, seed=0) -> dict:
    """Time the candidate schedules of one conv (random mask at its density) and return its record."""
    from .profiler import _stats, build_kernels, kernel_inputs, layer_kernel
    from .sparse_format import BlockSparseWeight, random_block_sparse

    spec, v = layer.spec, layer.vector_width
    rng = np.random.default_rng(seed)
    dense = (rng.standard_normal(spec.weight_shape) * 0.1).astype(np.float32)
    sparsity = min(1.0, max(0.0, 1.0 - float(layer.density)))
    weight = BlockSparseWeight.from_dense(random_block_sparse(dense, v, sparsity, rng), v)
    bias = (rng.standard_normal(spec.out_channels) * 0.1).astype(np.float32) if layer.bias else None
    candidates = candidate_schedules(info.family, spec, v, max_candidates, density=weight.density)
    kernels = {f"alcs_tune_{i}": layer_kernel(layer, weight, bias, info, f"alcs_tune_{i}", schedule=s)
               for i, s in enumerate(candidates)}
    module = build_kernels(kernels, info, measurer, f"tune_{layer.key}")
    x, shortcut, y = kernel_inputs(layer, kernels["alcs_tune_0"], rng)
    times = []
    for name, kernel in kernels.items():
        args = measurer.tensors([x] + list(kernel.packed.arrays()) + shortcut + [y])
        times.append(_stats(measurer.time(module, name, args, repeat, min_repeat_ms))[0])
    best = int(np.argmin(times))
    return {"key": layer.key, "layout": _layout(layer), "density": round(float(layer.density), 4),
            "schedule": asdict(candidates[best]), "tuned_ms": times[best], "default_ms": times[0],
            "default_schedule": asdict(candidates[0]),
            "candidates": [{"schedule": describe_schedule(s), "ms": t} for s, t in zip(candidates, times)]}


def tune_model(model, output, target="x86", *, tracker=None, key=None, rpc=None, local=False, input_shapes=None,
               vector_width=None, repeat=10, min_repeat_ms=5, max_candidates=12, timeout=None, quiet=False,
               session=None, seed=0) -> TuningRecords:
    """Tune every rewritable conv of ``model`` (ONNX) on the device into the records at ``output`` (resumed if it
    exists: a conv already tuned with the same shape, layout and density is not measured again)."""
    import tvm

    from .profiler import Measurer, Progress, model_layers

    if repeat < 3 or min_repeat_ms < 0 or max_candidates < 1:
        raise ValueError("--repeat must be >= 3, --min-repeat-ms >= 0, --candidates >= 1")
    layers, info, _, _ = model_layers(model, target, input_shapes=input_shapes, vector_width=vector_width,
                                      return_module=True)
    measurer = Measurer(info, tracker=tracker, key=key, rpc=rpc, local=local, timeout=timeout, session=session)
    if output is not None and os.path.exists(output):
        records = TuningRecords.load(output)
        records.check_compatible(info, tvm.__version__)
        check_same_device(output, records.device_key, measurer.device_key, "tuned")
    else:
        records = TuningRecords(json.loads(info.key), info.family, measurer.device_key, tvm.__version__,
                                {"repeat": int(repeat), "min_repeat_ms": int(min_repeat_ms),
                                 "max_candidates": int(max_candidates), "statistic": "median", "seed": int(seed)})

    def done(layer):  # a record the compiler would apply, measured at this density
        schedule, _ = records.schedule_for(layer.name, layer.key, _layout(layer))
        return schedule is not None and records.layers[layer.name]["density"] == round(float(layer.density), 4)

    todo = [layer for layer in layers if not done(layer)]
    progress = Progress(len(todo), label="convs to tune", quiet=quiet)
    progress.show(f"(resumed: {len(layers) - len(todo)} already tuned)" if len(todo) < len(layers) else "")
    try:
        for layer in todo:
            records.layers[layer.name] = tune_layer(layer, info, measurer, repeat=repeat,
                                                    min_repeat_ms=min_repeat_ms, max_candidates=max_candidates,
                                                    seed=seed)
            records.save(output)
            entry = records.layers[layer.name]
            progress.step(what=f"{layer.name}: {describe_schedule(TuningRecords._schedule(entry))} "
                               f"{entry['tuned_ms']:.4f} ms (default {entry['default_ms']:.4f})")
    finally:
        progress.close()
        measurer.close()
    records.save(output)
    return records


# ----------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers):
    from . import rpc as alcs_rpc

    p = subparsers.add_parser(
        "tune", help="search the sparse kernel's register tile and task order per conv on a device",
        description="Time a few schedules (register tile, task order; the default among them) of every "
                    "rewritable conv of MODEL.onnx on the device, as it runs in the model, and record the "
                    "fastest. `alcs compile --tuning RECORDS` uses them. Rerunning resumes.")
    p.add_argument("model", help="ONNX file (the pruned model you will compile: densities matter)")
    p.add_argument("--target", default="x86", help="x86, x86-avx2, x86-avx512, arm64, or a TVM target JSON dict")
    p.add_argument("-o", "--output", required=True, help="tuning records JSON (resumed if it exists)")
    alcs_rpc.add_device_arguments(p)
    p.add_argument("--candidates", type=int, default=12, help="schedules tried per conv (default 12)")
    p.add_argument("--repeat", type=int, default=10, help="timing samples per schedule (default 10)")
    p.add_argument("--min-repeat-ms", type=int, default=5, help="minimum duration of one sample (default 5)")
    p.add_argument("--input-shapes", help="e.g. input:1x3x224x224 (needed when the model has dynamic dims)")
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_tune)


def _cli_tune(args):
    from . import frontend
    from . import rpc as alcs_rpc

    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"no such model file: {args.model}")
    alcs_rpc.check_device_arguments(args)
    input_shapes = frontend.parse_input_shapes(args.input_shapes) if args.input_shapes else None
    t0 = time.time()
    records = tune_model(args.model, args.output, args.target, tracker=args.rpc_tracker, key=args.rpc_key,
                         rpc=args.rpc, local=args.local, input_shapes=input_shapes, vector_width=args.vector_width,
                         repeat=args.repeat, min_repeat_ms=args.min_repeat_ms, max_candidates=args.candidates,
                         timeout=args.device_timeout, quiet=args.quiet)
    rows = [["conv", "schedule", "ms", "default", "ms ", "gain"]]
    tuned = default = 0.0
    for name, entry in records.layers.items():
        tuned, default = tuned + entry["tuned_ms"], default + entry["default_ms"]
        rows.append([name, describe_schedule(TuningRecords._schedule(entry)), f"{entry['tuned_ms']:.4f}",
                     describe_schedule(SparseConvSchedule(**entry["default_schedule"])), f"{entry['default_ms']:.4f}",
                     f"{entry['default_ms'] / entry['tuned_ms']:.2f}x"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"wrote {Path(args.output)}: {len(records.layers)} convs, sum {default:.3f} -> {tuned:.3f} ms "
          f"({time.time() - t0:.0f} s)")
    return 0
