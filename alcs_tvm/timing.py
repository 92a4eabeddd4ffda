"""One timing method for every column of a benchmark (TVM, ONNX Runtime, PyTorch, ours).

Every candidate is a zero-argument callable doing one inference on pre-bound inputs. A *sample* is
``time.perf_counter`` around ``number`` back-to-back calls divided by ``number``; ``number`` is calibrated per
callable so that one sample lasts at least ``min_sample_s`` (short ~20 us kernels get many inner calls, timer
overhead stays < 0.1%). After a warm-up, ``repeat`` rounds are run; in each round every callable gives one
sample, in turn (interleaved), so slow drift of the machine (frequency, other load) hits all candidates alike.
Before each sample there is a short pause (the previous candidate's thread pool, still spinning - TVM, OpenMP,
ORT - goes idle instead of stealing cycles from the next one's timed calls), then one untimed call.

Candidates named in ``apart`` are timed after the interleaved rounds, each in rounds of its own. ONNX Runtime
belongs there: its pool threads keep spinning for tens of milliseconds after a run (allow_spinning, the default
that makes ORT fast back to back), longer than any pause, so with 2 threads on a 2-vCPU machine they take the
second core from whatever is timed next, and a pause long enough to stop them slows ORT itself
(docs/benchmarks.md). They are timed in the order given, so ORT goes last.

Reported statistics: ``min`` (what the docs report), ``median``, ``mean`` and all samples, in milliseconds.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

__all__ = ["Stats", "calibrate", "measure_interleaved", "set_threads", "thread_env", "OTHER_RUNTIMES"]

#: ``apart`` for benchmarks that time TVM against PyTorch and ONNX Runtime: ORT last (see above)
OTHER_RUNTIMES = ("torch", "ort")


@dataclass
class Stats:
    """Per-call latency in ms over ``len(samples)`` samples of ``number`` calls each."""

    min: float
    median: float
    mean: float
    number: int
    samples: list = field(default_factory=list)

    def to_dict(self, with_samples: bool = False) -> dict:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def calibrate(fn: Callable[[], object], min_sample_s: float = 0.002, max_number: int = 10000) -> int:
    """Inner-loop count so that ``number`` calls of ``fn`` take at least ``min_sample_s``."""
    fn()
    number = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or number >= max_number:
            break
        number = min(max_number, max(number * 2, int(math.ceil(number * min_sample_s / max(dt, 1e-9) * 1.2))))
    return number


def _sample(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def measure_interleaved(fns: dict, repeat: int = 30, *, warmup_s: float = 0.2, min_sample_s: float = 0.002,
                        pause_s: float = 0.005, progress: Callable[[str], None] | None = None,
                        apart: tuple = ()) -> dict:
    """Time every callable of ``fns`` (name -> callable) in interleaved rounds; returns name -> :class:`Stats`.
    Names in ``apart`` are timed afterwards, one at a time, in that order (see the module docstring)."""
    kwargs = dict(repeat=repeat, warmup_s=warmup_s, min_sample_s=min_sample_s, pause_s=pause_s)
    together = {name: fn for name, fn in fns.items() if name not in apart}
    out = _interleaved(together, progress=progress, **kwargs) if together else {}
    for name in apart:  # in the caller's order: put the one whose pool spins longest (ORT) last
        if name in fns:
            out.update(_interleaved({name: fns[name]}, **kwargs))
    return {name: out[name] for name in fns}


def _interleaved(fns: dict, repeat: int, warmup_s: float, min_sample_s: float, pause_s: float,
                 progress: Callable[[str], None] | None = None) -> dict:
    names = list(fns)
    numbers = {}
    for name in names:  # warm-up (caches, page faults, thread pools, lazy init) + calibration
        fn = fns[name]
        t_end = time.perf_counter() + warmup_s
        fn()
        while time.perf_counter() < t_end:
            fn()
        numbers[name] = calibrate(fn, min_sample_s)
    samples = {name: [] for name in names}
    for r in range(repeat):
        for name in names:
            fn = fns[name]
            if pause_s:  # let the previous candidate's spinning pool threads (TVM, OpenMP, ORT) go idle
                time.sleep(pause_s)
            fn()  # untimed: wakes this candidate's pool, warms caches
            samples[name].append(_sample(fn, numbers[name]))
        if progress and (r + 1) % max(1, repeat // 3) == 0:
            progress(f"round {r + 1}/{repeat}")
    out = {}
    for name in names:
        ms = [s * 1e3 for s in samples[name]]
        out[name] = Stats(min(ms), statistics.median(ms), statistics.fmean(ms), numbers[name], ms)
    return out


def set_threads(n: int) -> dict:
    """Use ``n`` threads in TVM's runtime thread pool and PyTorch (ORT takes it per session:
    ``SessionOptions.intra_op_num_threads``). Best called in a fresh process that also had ``TVM_NUM_THREADS``
    and ``OMP_NUM_THREADS`` set to ``n`` before importing tvm / torch (see :func:`thread_env`).
    Returns what each runtime reports afterwards."""
    import tvm

    got = {}
    try:
        tvm.get_global_func("runtime.config_threadpool")(0, int(n))
    except Exception:  # pragma: no cover - older/newer runtimes without the hook: env var decides
        pass
    got["tvm"] = int(tvm.runtime.num_threads())
    try:
        import torch

        torch.set_num_threads(int(n))
        got["torch"] = int(torch.get_num_threads())
    except ImportError:  # pragma: no cover
        pass
    return got


def thread_env(n: int, base: dict | None = None) -> dict:
    """Environment for a subprocess that should use ``n`` threads everywhere."""
    env = dict(os.environ if base is None else base)
    for key in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(int(n))
    return env


def rows_per_thread_count(command: list, threads, workdir: str) -> list:
    """Run ``command + ["--threads", n, "--_worker", FILE]`` once per thread count ``n``, each in its own process
    with ``n`` threads everywhere (TVM's pool takes its size once per process), and join the JSON lists the runs
    write to their FILEs (in ``workdir``). A run that fails raises ``CalledProcessError``."""
    import json
    import subprocess

    rows = []
    for n in threads:
        out = os.path.join(workdir, f"rows_{int(n)}t.json")
        subprocess.run(list(command) + ["--threads", str(int(n)), "--_worker", out], check=True, env=thread_env(n))
        with open(out) as f:
            rows += json.load(f)
        os.remove(out)
    return rows
