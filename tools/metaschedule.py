"""MetaSchedule tuning with an on-disk cache: the tuned dense baselines the benchmarks compare against (the
package itself never uses MetaSchedule).

Two levels:

* :func:`tune_tir` tunes any TIR ``PrimFunc``/``IRModule`` for a target and caches the MetaSchedule database
  under ``cache_dir()/<key>/`` where the key hashes (target key, the workload's structural hash, trials, TVM
  version). A second call with the same arguments loads the database and does not tune.
  :func:`compile_tuned` applies the best record and compiles.
* :func:`tuned_dense_conv2d` builds the NCHW fp32 ``topi.nn.conv2d_nchw`` workload (optional bias + ReLU),
  tunes it through :func:`tune_tir` and returns a :class:`TunedModule` (compiled, runnable, timeable).

The cache root is ``~/.cache/alcs_tvm/tuning`` unless the environment variable ``ALCS_TVM_CACHE`` is set (then
``$ALCS_TVM_CACHE/tuning``). Each cache entry is a directory holding MetaSchedule's JSON database
(``database_workload.json``, ``database_tuning_record.json``), its logs and ``done.json`` (written last, so an
interrupted run is re-tuned instead of trusted) with the tuning time and the best measured latency.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(TOOLS, "..")))
# MetaSchedule's builder pickles fast_build by reference into fresh worker processes, which must import this module
# (and alcs_tvm) by name: they find both through PYTHONPATH
os.environ["PYTHONPATH"] = os.pathsep.join([TOOLS, os.path.dirname(TOOLS)] + [p for p in
                                           os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from alcs_tvm.files import cache_dir as alcs_cache_dir  # noqa: E402
from alcs_tvm.files import file_lock  # noqa: E402
from alcs_tvm.layer import normalize_padding, normalize_pair  # noqa: E402
from alcs_tvm.target import TargetInfo, resolve_target  # noqa: E402

__all__ = ["cache_dir", "tune_tir", "compile_tuned", "TuneResult", "Conv2dWorkload", "dense_conv2d_func",
           "tuned_dense_conv2d", "TunedModule", "target_key", "find_cached", "fast_build"]

_DONE = "done.json"


# ----------------------------------------------------------------------------------------------- cache
def cache_dir() -> str:
    """Root of the tuning cache (``$ALCS_TVM_CACHE/tuning`` or ``~/.cache/alcs_tvm/tuning``)."""
    return str(alcs_cache_dir() / "tuning")


def _to_target(target):
    if isinstance(target, TargetInfo):
        return target.target
    if isinstance(target, tvm.target.Target):
        return target
    return resolve_target(target).target


def _with_num_cores(target):
    """MetaSchedule needs ``num-cores`` on CPU targets; default to this host's logical CPU count."""
    cfg = {k: v for k, v in target.export().items()}
    if int(cfg.get("num-cores", 0) or 0) > 0:
        return target
    cfg["num-cores"] = os.cpu_count() or 1
    return tvm.target.Target(cfg)


def target_key(target) -> str:
    """Stable text for a target (the fields that change generated code)."""
    if not isinstance(target, TargetInfo):
        target = resolve_target(_to_target(target))
    return target.key


def _normalize(mod):
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule({"main": mod.with_attr("global_symbol", "main")})
    return mod


def _entry_key(mod, target, trials: int, extra: str = "") -> tuple[str, dict]:
    meta = {
        "target": target_key(target),
        "workload": hashlib.sha256(mod.script().encode()).hexdigest(),
        "trials": int(trials),
        "tvm": tvm.__version__,
        "extra": extra,
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return digest, meta


# ----------------------------------------------------------------------------------------------- progress
def _progress_callback(total: int, report: Callable[[str], None], label: str):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(PyMeasureCallback):
        def __init__(self):
            self.done = 0
            self.best = float("inf")
            self.start = time.perf_counter()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for res in runner_results:
                self.done += 1
                if res.error_msg is None and res.run_secs:
                    self.best = min(self.best, float(np.mean([float(s) for s in res.run_secs])))
            best = f"{self.best * 1e3:.3f} ms" if self.best < float("inf") else "n/a"
            report(f"[tune] {label}: {self.done}/{total} trials, best {best}, "
                   f"{time.perf_counter() - self.start:.0f} s")

    return _Progress()


def _default_report(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- builder
def fast_build(mod, target, _params=None):
    """MetaSchedule's default build without ``import tvm.s_tir.tensor_intrin``: that import alone takes 20-40 s
    and LocalBuilder pays it in a fresh worker process for every batch (so its 30 s timeout fails every build
    on a loaded 2-core machine). fp32 CPU schedules use no tensor intrinsics."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _make_builder_runner(timeout_sec: float):
    from tvm.s_tir import meta_schedule as ms

    # the builder's worker processes unpickle ``fast_build`` by reference: make this package importable there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p])
    builder = ms.builder.LocalBuilder(f_build=fast_build, timeout_sec=timeout_sec)
    runner = ms.runner.LocalRunner(timeout_sec=timeout_sec)
    return builder, runner


def _import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics, which MetaSchedule's ``TuneContext`` imports, without its worst cost.

    Each of their ~500 TVMScript functions takes ``inspect.stack()``, and inspect names a frame's module from its
    file name; for a frame with no file on disk (the import machinery's ``<frozen importlib._bootstrap>``,
    ``<frozen runpy>``, code compiled from strings) it finds none after scanning every module in
    ``sys.modules``, again for every such frame of every function: 27 s of the import in a process that has
    loaded torch, ONNX and TVM (a test worker). The answer depends on the file name alone, so during the import
    it is asked once per file name."""
    import inspect

    getmodule, by_file = inspect.getmodule, {}

    def getmodule_by_file(obj, _filename=None):
        if _filename is None or not inspect.isframe(obj):
            return getmodule(obj, _filename)
        if _filename not in by_file:
            by_file[_filename] = getmodule(obj, _filename)
        return by_file[_filename]

    inspect.getmodule = getmodule_by_file
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.getmodule = getmodule


# ----------------------------------------------------------------------------------------------- generic
@dataclass
class TuneResult:
    """A cached MetaSchedule database for one workload; ``meta`` has the tuning time and best latency."""

    work_dir: str
    mod: object  # tvm.IRModule tuned (``main`` = the workload)
    target: object  # tvm.target.Target
    trials: int
    meta: dict = field(default_factory=dict)
    from_cache: bool = False

    def database(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(
            path_workload=os.path.join(self.work_dir, "database_workload.json"),
            path_tuning_record=os.path.join(self.work_dir, "database_tuning_record.json"),
            allow_missing=False)


def tune_tir(func, target, trials: int, work_dir: str | None = None, *, label: str = "tir",
             report: Callable[[str], None] | None = _default_report, num_tuning_cores="logical",
             seed: int = 0, force: bool = False, timeout_sec: float = 120.0,
             trials_per_iter: int = 32, strategy="evolutionary", verbose: bool = False) -> TuneResult:
    """Tune a TIR ``PrimFunc`` (or an IRModule whose tuned function is ``main``) with MetaSchedule.

    ``work_dir`` defaults to a cache entry under :func:`cache_dir` keyed by (target, workload, trials); if that
    entry is complete it is reused without tuning. ``report`` receives progress lines (``None``: silent), one
    per ``trials_per_iter`` measured candidates. ``strategy`` is MetaSchedule's search strategy
    ("evolutionary", or "replay-trace" for quick smoke runs). MetaSchedule's own console log is shown only with
    ``verbose`` (it always goes to ``work_dir/logs``).
    """
    from tvm.s_tir import meta_schedule as ms

    if trials <= 0:
        raise ValueError("trials must be positive")
    tvm_target = _with_num_cores(_to_target(target))
    mod = _normalize(func)
    digest, meta = _entry_key(mod, target, trials)
    if work_dir is None:
        work_dir = os.path.join(cache_dir(), digest)
    done_path = os.path.join(work_dir, _DONE)
    with file_lock(work_dir.rstrip("/") + ".lock"):
        if os.path.exists(done_path) and not force:
            with open(done_path) as fh:
                meta = json.load(fh)
            if report:
                report(f"[tune] {label}: cached ({meta.get('trials')} trials, tuned in "
                       f"{meta.get('tune_seconds', 0):.0f} s) at {work_dir}")
            return TuneResult(work_dir, mod, tvm_target, trials, meta, from_cache=True)
        if os.path.isdir(work_dir):
            shutil.rmtree(work_dir)  # incomplete entry from an interrupted run
        os.makedirs(work_dir)
        if report:
            report(f"[tune] {label}: tuning {trials} trials into {work_dir}")
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        if report:
            callbacks = list(callbacks) + [_progress_callback(trials, report, label)]
        start = time.perf_counter()
        builder, runner = _make_builder_runner(timeout_sec)
        _import_tensor_intrinsics()
        # MetaSchedule derives its console handler's level from this logger's level, and resets the logger to
        # DEBUG on every run: set it each time.
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.DEBUG if verbose else logging.WARNING)
        database = ms.tir_integration.tune_tir(
            mod, tvm_target, work_dir, max_trials_global=trials, num_trials_per_iter=min(trials_per_iter, trials),
            builder=builder, runner=runner, strategy=strategy,
            measure_callbacks=callbacks, num_tuning_cores=num_tuning_cores, seed=seed)
        elapsed = time.perf_counter() - start
        best = None
        top = database.get_top_k(database.commit_workload(mod), 1)
        if top:
            best = float(np.mean([float(s) for s in top[0].run_secs]))
        meta = dict(meta, label=label, tune_seconds=elapsed, best_seconds=best,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(done_path + ".tmp", "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(done_path + ".tmp", done_path)
        if report:
            report(f"[tune] {label}: done in {elapsed:.0f} s, best "
                   f"{'n/a' if best is None else f'{best * 1e3:.3f} ms'}")
        return TuneResult(work_dir, mod, tvm_target, trials, meta, from_cache=False)


def find_cached(func, target) -> TuneResult | None:
    """The completed cache entry for this workload and target with the most trials, or ``None``."""
    mod = _normalize(func)
    _, want = _entry_key(mod, target, 0)
    best = None
    root = cache_dir()
    if not os.path.isdir(root):
        return None
    for name in os.listdir(root):
        done = os.path.join(root, name, _DONE)
        if not os.path.exists(done):
            continue
        try:
            with open(done) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            continue
        if all(meta.get(k) == want[k] for k in ("target", "workload", "tvm", "extra")):
            if best is None or meta["trials"] > best[1]["trials"]:
                best = (os.path.join(root, name), meta)
    if best is None:
        return None
    return TuneResult(best[0], mod, _with_num_cores(_to_target(target)), best[1]["trials"], best[1], True)


def compile_tuned(result: TuneResult):
    """Compile the best schedule of a :class:`TuneResult` (falls back to the untuned function when the
    database has no valid record). Returns the ``tvm.compile`` executable (``.mod["main"]``)."""
    from tvm.s_tir import meta_schedule as ms

    sch = ms.tir_integration.compile_tir(result.database(), result.mod, result.target)
    mod = result.mod if sch is None else sch.mod
    return tvm.compile(mod, target=result.target)


# ----------------------------------------------------------------------------------------------- dense conv
@dataclass(frozen=True)
class Conv2dWorkload:
    """An NCHW fp32 dense conv2d (groups = 1). ``padding`` is (top, left, bottom, right)."""

    input_shape: tuple
    weight_shape: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    bias: bool = False
    relu: bool = False

    @classmethod
    def create(cls, input_shape, weight_shape, stride=1, padding=0, dilation=1, bias=False, relu=False):
        return cls(tuple(int(x) for x in input_shape), tuple(int(x) for x in weight_shape),
                   normalize_pair(stride, "stride"), normalize_padding(padding), normalize_pair(dilation, "dilation"),
                   bool(bias), bool(relu))

    @property
    def output_shape(self) -> tuple:
        n, _, h, w = self.input_shape
        co, _, kh, kw = self.weight_shape
        pt, pl, pb, pr = self.padding
        oh = (h + pt + pb - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + pl + pr - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return (n, co, oh, ow)

    def name(self) -> str:
        n, c, h, w = self.input_shape
        co, _, kh, kw = self.weight_shape
        s = f"conv{kh}x{kw}_{c}to{co}_{h}x{w}_n{n}"
        if self.stride != (1, 1):
            s += f"_s{self.stride[0]}"
        if self.bias:
            s += "_bias"
        if self.relu:
            s += "_relu"
        return s


def dense_conv2d_func(wl: Conv2dWorkload):
    """``topi.nn.conv2d_nchw`` (+ bias + ReLU) as a PrimFunc ``main(data, weight[, bias], out)``."""
    from tvm import te, topi

    data = te.placeholder(wl.input_shape, "float32", name="data")
    weight = te.placeholder(wl.weight_shape, "float32", name="weight")
    out = topi.nn.conv2d_nchw(data, weight, list(wl.stride), list(wl.padding), list(wl.dilation),
                              out_dtype="float32")
    args = [data, weight]
    if wl.bias:
        bias = te.placeholder((wl.weight_shape[0],), "float32", name="bias")
        out = te.compute(out.shape, lambda n, c, h, w: out[n, c, h, w] + bias[c], name="bias_add")
        args.append(bias)
    if wl.relu:
        out = topi.nn.relu(out)
    return te.create_prim_func(args + [out])


class TunedModule:
    """A compiled dense conv: ``run(x, weight[, bias])`` and ``time_callable`` on pre-bound device tensors."""

    def __init__(self, workload: Conv2dWorkload, executable, tune: TuneResult | None):
        self.workload, self.executable, self.tune = workload, executable, tune
        self.func = executable.mod["main"]

    def _args(self, x, weight, bias=None):
        import tvm

        dev = tvm.cpu()
        arrays = [x, weight] + ([bias] if self.workload.bias else [])
        args = [tvm.runtime.tensor(np.ascontiguousarray(a, dtype=np.float32), dev) for a in arrays]
        args.append(tvm.runtime.tensor(np.zeros(self.workload.output_shape, np.float32), dev))
        return args

    def run(self, x, weight, bias=None) -> np.ndarray:
        args = self._args(x, weight, bias)
        self.func(*args)
        return args[-1].numpy()

    def time_callable(self, x, weight, bias=None) -> Callable[[], None]:
        args = self._args(x, weight, bias)
        func = self.func
        return lambda: func(*args)


def tuned_dense_conv2d(input_shape, weight_shape, *, stride=1, padding=0, dilation=1, bias=False, relu=False,
                       target="x86", trials: int = 64, report: Callable[[str], None] | None = _default_report,
                       work_dir: str | None = None, use_cached: bool = True, **tune_kwargs) -> TunedModule:
    """Tune (or load from the cache) and compile a dense NCHW conv2d.

    ``trials=0`` tunes nothing: it uses the cache entry with the most trials for this workload if there is one
    (``use_cached``), else compiles the untuned TIR (naive loops: correct but slow; ``module.tune is None``).
    ``tune_kwargs`` go to :func:`tune_tir` (e.g. ``strategy``, ``trials_per_iter``, ``num_tuning_cores``)."""
    wl = Conv2dWorkload.create(input_shape, weight_shape, stride, padding, dilation, bias, relu)
    func = dense_conv2d_func(wl)
    tvm_target = _to_target(target)
    if trials <= 0:
        cached = find_cached(func, target) if use_cached else None
        if cached is not None:
            if report:
                report(f"[tune] {wl.name()}: using cached entry ({cached.trials} trials) at {cached.work_dir}")
            return TunedModule(wl, compile_tuned(cached), cached)
        return TunedModule(wl, tvm.compile(_normalize(func), target=tvm_target), None)
    result = tune_tir(func, target, trials, work_dir, label=wl.name(), report=report, **tune_kwargs)
    return TunedModule(wl, compile_tuned(result), result)
