"""The benchmarks' timing method: interleaved rounds, and runtimes timed apart from the others."""
import time

from alcs_tvm.timing import measure_interleaved, rows_per_thread_count


def _busy(calls, name, seconds):
    def run():
        calls.append(name)
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            pass
    return run


def test_interleaved_rounds_and_candidates_timed_apart():
    calls = []
    fns = {"ours": _busy(calls, "ours", 1e-4), "ort": _busy(calls, "ort", 3e-4), "tvm": _busy(calls, "tvm", 2e-4),
           "torch": _busy(calls, "torch", 1e-4)}
    stats = measure_interleaved(fns, repeat=4, warmup_s=0.005, min_sample_s=0.001, pause_s=0.0,
                                apart=("torch", "ort"))
    assert list(stats) == ["ours", "ort", "tvm", "torch"]  # the caller's order
    # the runtimes timed apart never run between or during the others' rounds, and go in the order given
    first_torch, first_ort = calls.index("torch"), calls.index("ort")
    assert set(calls[:first_torch]) == {"ours", "tvm"}
    assert set(calls[first_torch:first_ort]) == {"torch"} and set(calls[first_ort:]) == {"ort"}
    # the others alternate round by round: at least one switch between them per candidate and round
    together = calls[:first_torch]
    switches = sum(a != b for a, b in zip(together, together[1:]))
    assert switches >= 2 * 4 - 1
    for name, seconds in (("ours", 1e-4), ("ort", 3e-4), ("tvm", 2e-4), ("torch", 1e-4)):
        s = stats[name]
        assert len(s.samples) == 4 and s.min <= s.median
        assert seconds * 1e3 <= s.min < seconds * 1e3 * 3  # ms per call, a busy loop of known length


def test_rows_per_thread_count_runs_one_process_per_count_with_that_many_threads(tmp_path):
    """The benchmarks' worker protocol: each count runs in its own process, told its count by --threads and by the
    thread variables of its environment, and the rows its --_worker file holds are joined in the counts' order."""
    import subprocess
    import sys

    import pytest

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, os, sys\n"
        "args = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "if args['--fail'] == args['--threads']: sys.exit(3)\n"
        "row = {'threads': int(args['--threads']), 'pid': os.getpid(), 'env': os.environ['TVM_NUM_THREADS'],\n"
        "       'omp': os.environ['OMP_NUM_THREADS']}\n"
        "json.dump([row, dict(row, second=True)], open(args['--_worker'], 'w'))\n")
    rows = rows_per_thread_count([sys.executable, str(script), "--fail", "0"], [2, 1], str(tmp_path))
    assert [(r["threads"], r["env"], r["omp"]) for r in rows] == [(2, "2", "2"), (2, "2", "2"), (1, "1", "1"),
                                                                   (1, "1", "1")]
    assert rows[0]["pid"] != rows[2]["pid"] and not list(tmp_path.glob("rows_*"))
    with pytest.raises(subprocess.CalledProcessError):
        rows_per_thread_count([sys.executable, str(script), "--fail", "1"], [2, 1], str(tmp_path))
