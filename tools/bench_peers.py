"""alcs against the CPU inference engines a user would pick instead, on the same SIMD-pruned ONNX files.

ResNet-18 and MobileNetV2 (alcs_tvm/zoo.py, 224x224, batch 1, fp32, random weights of seed 0) with every groups=1
conv SIMD-block pruned to each sparsity (zoo.simd_prune_, V = this host's group widths), exported to ONNX once per
(model, sparsity) and run by every engine: alcs (compiled for "x86"), ONNX Runtime, PyTorch eager (the pruned
zoo model itself), DeepSparse 1.8.0, MNN 3.6.1 dense and with its sparse convs (converted with
--detectSparseSpeedUp), and ncnn (converted by pnnx with fp32 weights, run in fp32). DeepSparse, MNN and ncnn
run in virtual environments this tool makes under <alcs cache>/peers/ on first use (they pin numpy and onnx
versions of their own); see docs/peers.md.

Each engine runs in a process of its own (tools/peers_worker.py), one per engine and thread count, which loads a
model once and times N back-to-back calls on request. Before timing, every engine's output on one fixed input is
checked against ONNX Runtime's; one that differs by more than --tolerance is reported as wrong and not ranked.
Timing is interleaved: round 1 of every engine, then round 2, ..., each sample after the other engines'
processes have gone quiet (their pools stop spinning). The table gives alcs's min in ms, every other engine's
min as a multiple of it (peer time / alcs time: above 1 alcs is faster) and the cell's noise; below it, per
model and thread count, the break-even sparsity against the fastest engine on the dense model and alcs's lead
over the faster of DeepSparse and MNN sparse at 80 and 90 %.

    python tools/bench_peers.py                   # both models, 0/30/50/80/90 %, 1 and 2 threads, every engine
    python tools/bench_peers.py --models resnet18 --sparsities 0,80 --threads 1 --rounds 3
    python tools/bench_peers.py --engines alcs,ort,ncnn --json /tmp/peers.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from alcs_tvm.files import cache_dir, file_lock, write_json_atomic  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2")
SPARSITIES = (0, 30, 50, 80, 90)
ENGINES = ("alcs", "ort", "torch", "deepsparse", "mnn", "mnn_sparse", "ncnn")
LABELS = {"alcs": "alcs", "ort": "ORT", "torch": "PyTorch", "deepsparse": "DeepSparse", "mnn": "MNN dense",
          "mnn_sparse": "MNN sparse", "ncnn": "ncnn fp32"}
#: max |engine - ORT| / max |ORT| over the output; ncnn's fp16 weights (pnnx's default) are 3e-4 off
TOLERANCE = 1e-4
WORKER = os.path.join(ROOT, "tools", "peers_worker.py")
FORMAT = "alcs-bench-peers-1"

#: the virtual environments of the engines the main environment cannot hold. Pins: the engine and what it
#: resolved to on CPython 3.11 that installs and runs (DeepSparse 1.8 needs numpy < 2 and onnx < 1.15); pnnx goes
#: in without its dependencies, since it declares torch (5 GB with CUDA) and its converter binary needs none.
PEER_ENVS = {
    "deepsparse": {"dir": "deepsparse-1.8.0",
                   "packages": ["deepsparse==1.8.0", "sparsezoo==1.8.1", "numpy==1.26.4", "onnx==1.14.1",
                                "protobuf==7.36.2", "pydantic==2.14.4"],
                   # DeepSparse 1.8.0 declares Requires-Python >=3.8,<3.12 and ships wheels for 3.8-3.11 only
                   "python": ((3, 8), (3, 11)),
                   "env": {"NM_DISABLE_ANALYTICS": "1"}},  # no usage events sent
    "mnn": {"dir": "mnn-3.6.1", "packages": ["mnn==3.6.1", "numpy==2.4.6"]},
    "ncnn": {"dir": "ncnn-1.0.20261020", "packages": ["ncnn==1.0.20261020", "numpy==2.4.6"],
             "no_deps": ["pnnx==20261020"]},
}
ENGINE_ENV = {"deepsparse": "deepsparse", "mnn": "mnn", "mnn_sparse": "mnn", "ncnn": "ncnn"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A one-line reason the run cannot go on."""


# ------------------------------------------------------------------------------------------------ environments


def _python_version(python: str) -> tuple:
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        return tuple(sys.version_info[:2])
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise BenchError(f"cannot run --venv-python {python}: {err}") from None
    return tuple(map(int, out.split()))


def _clean_env(extra: dict | None = None) -> dict:
    """The main environment's PYTHONPATH / PYTHONHOME would put its numpy and onnx before a venv's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra or {})
    return env


def ensure_env(name: str, python: str) -> tuple:
    """(the venv's python, None) once ``PEER_ENVS[name]`` is installed under <cache>/peers/, or (None, why not)."""
    spec = PEER_ENVS[name]
    low, high = spec.get("python", ((3, 0), (99, 0)))
    version = _python_version(python)
    if not low <= version <= high:
        return None, (f"{spec['dir']} installs on CPython {low[0]}.{low[1]}-{high[0]}.{high[1]} only; "
                      f"{python} is {version[0]}.{version[1]} (give another with --venv-python)")
    home = cache_dir() / "peers" / f"{spec['dir']}-py{version[0]}.{version[1]}"  # one per Python: --venv-python
    marker = home / "alcs-peer.json"
    wanted = {"packages": spec["packages"], "no_deps": spec.get("no_deps", []),
              "python": ".".join(map(str, version))}
    venv_python = str(home / "bin" / "python")
    with file_lock(str(home) + ".lock"):  # two runs at once build it once
        try:
            with open(marker) as f:
                if json.load(f) == wanted and os.path.exists(venv_python):
                    return venv_python, None
        except (OSError, ValueError):
            pass
        if home.exists():  # half-made or made with other pins: start again
            shutil.rmtree(home)
        log(f"installing {spec['dir']} into {home} (first use; a minute or two)...")
        install_log = str(home) + ".install.log"
        steps = [[python, "-m", "venv", str(home)],
                 [venv_python, "-m", "pip", "install", "--no-input", *spec["packages"]]]
        if spec.get("no_deps"):
            steps.append([venv_python, "-m", "pip", "install", "--no-input", "--no-deps", *spec["no_deps"]])
        with open(install_log, "w") as out:
            for step in steps:
                out.write("$ " + " ".join(step) + "\n")
                out.flush()
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=_clean_env()).returncode:
                    shutil.rmtree(home, ignore_errors=True)
                    return None, f"`{' '.join(step[2:])}` failed: {_last_error(install_log)} (log: {install_log})"
        write_json_atomic(marker, wanted, prefix=".alcs-peer-")
    return venv_python, None


def _last_error(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


# ------------------------------------------------------------------------------------------------------ models


def export_models(models, sparsities, work: str) -> dict:
    """(model, sparsity) -> {"onnx", "state", "work"}: the pruned model exported once, shared by every engine."""
    import torch

    from alcs_tvm import zoo
    from alcs_tvm.target import resolve_target

    info = resolve_target("x86")  # each layer pruned in its group width, as alcs will run it
    cells = {}
    for name in models:
        for sparsity in sparsities:
            cell_dir = os.path.join(work, f"{name}_{sparsity}")
            os.makedirs(cell_dir, exist_ok=True)
            model = zoo.get_model(name).eval()
            if sparsity:
                zoo.simd_prune_(model, info, sparsity / 100, rng=0)
            onnx_path = zoo.export_onnx(model, os.path.join(cell_dir, "model.onnx"), zoo.DEFAULT_INPUT_SHAPES[name])
            state = os.path.join(cell_dir, "model.pt")
            torch.save(model.state_dict(), state)
            cells[name, sparsity] = {"onnx": onnx_path, "state": state, "work": cell_dir}
            log(f"exported {name} at {sparsity}% to {onnx_path}")
    return cells


# ----------------------------------------------------------------------------------------------------- workers


class Worker:
    """tools/peers_worker.py for one engine at one thread count, under that engine's Python."""

    def __init__(self, engine: str, python: str, threads: int, env: dict, log_path: str):
        self.engine, self.python, self.threads, self.env, self.log_path = engine, python, threads, env, log_path
        self.proc = None

    def start(self):
        with open(self.log_path, "a") as err:
            self.proc = subprocess.Popen([self.python, WORKER, self.engine, str(self.threads)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=self.env, cwd=ROOT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ask(self, **request) -> dict:
        if not self.alive():
            self.start()  # the first request, or the one after a crash
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.proc.wait()
            return {"ok": False, "error": f"the worker died (exit {code}): {_last_line(self.log_path)} "
                                          f"(log: {self.log_path})"}
        return json.loads(line)

    def cpu_ticks(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime of all its threads
        except (OSError, IndexError, AttributeError):
            return 0

    def close(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "nothing logged"


def quiesce(workers, step_s: float = 0.02, limit_s: float = 2.0) -> float:
    """Wait until no worker uses CPU: a pool still spinning after its engine's sample (ORT, OpenMP, TVM; tens of
    ms) would take the second core from the next engine's. Returns the seconds waited."""
    started = time.perf_counter()
    before = [w.cpu_ticks() for w in workers]
    while time.perf_counter() < started + limit_s:
        time.sleep(step_s)
        now = [w.cpu_ticks() for w in workers]
        if now == before:
            break
        before = now
    return time.perf_counter() - started


def busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores something else keeps busy (our workers are idle when this is called): a busy machine makes
    the timings, the 2-thread ones above all, slow and noisy."""
    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


# ------------------------------------------------------------------------------------------------------ a cell


def compare(path: str, ref_path: str) -> tuple:
    """(max abs error, max abs error / max |reference|) of the output at ``path`` against ORT's."""
    import numpy as np

    got, ref = np.load(path).astype(np.float64), np.load(ref_path).astype(np.float64)
    if got.size != ref.size:
        return float("inf"), float("inf")
    err = float(np.abs(got.reshape(-1) - ref.reshape(-1)).max())
    return err, err / max(float(np.abs(ref).max()), 1e-30)


def noise(samples) -> float | None:
    """(second fastest - fastest) / fastest: how far the min is from being reproduced within the run."""
    if len(samples) < 2:
        return None
    a, b = sorted(samples)[:2]
    return (b - a) / a


def run_cell(workers: dict, cell: dict, model: str, sparsity: int, threads: int, x_path: str, rounds: int,
             tolerance: float) -> dict:
    tag = f"[{threads}t] {model} {sparsity}%"
    results = {}
    order = ["ort"] + [e for e in workers if e != "ort"]  # ORT first: the reference
    for engine in order:
        out = os.path.join(cell["work"], f"out_{engine}_{threads}t.npy")
        log(f"{tag}: loading {engine}...")
        answer = workers[engine].ask(cmd="load", engine=engine, model=model, onnx=cell["onnx"], state=cell["state"],
                                     work=cell["work"], input=x_path, output=out)
        if not answer["ok"]:
            results[engine] = {"status": "failed", "error": answer["error"]}
            log(f"{tag}: {engine} FAILED: {answer['error']}")
            continue
        r = {"status": "ok", "number": answer["number"], "load_s": answer["load_s"], "info": answer["info"]}
        if engine == "ort":
            r.update(max_abs_err=0.0, rel_err=0.0)
        elif results["ort"]["status"] == "ok":
            r["max_abs_err"], r["rel_err"] = compare(out, results["ort"]["output"])
            if not r["rel_err"] <= tolerance:
                r["status"] = "wrong"
        else:
            r["status"] = "unchecked"  # no reference: timed, but not ranked
        r["output"] = out
        results[engine] = r
        log(f"{tag}: {engine} ready in {answer['load_s']:.1f} s"
            + (f", error vs ORT {r['rel_err']:.1e} (max abs {r['max_abs_err']:.1e})" if "rel_err" in r else "")
            + (" WRONG: not ranked" if r["status"] == "wrong" else ""))
    timed = [e for e in workers if results[e]["status"] in ("ok", "unchecked")]  # a wrong engine's time means nothing
    busy = busy_cores()
    if busy is not None and busy > 0.2:
        log(f"{tag}: WARNING: other processes keep {busy:.1f} of {os.cpu_count()} cores busy: slow, noisy timings")
    samples = {e: [] for e in timed}
    others = list(workers.values())
    waited = []
    for r in range(rounds):
        for engine in list(timed):
            waited.append(quiesce(others))
            answer = workers[engine].ask(cmd="sample")
            if not answer["ok"]:
                results[engine].update(status="failed", error=answer["error"])
                log(f"{tag}: {engine} FAILED while timed: {answer['error']}")
                timed.remove(engine)
                continue
            samples[engine].append(answer["ms"])
        if (r + 1) % max(1, rounds // 3) == 0:
            log(f"{tag}: round {r + 1}/{rounds}")
    for engine in workers:
        if workers[engine].alive():
            workers[engine].ask(cmd="unload")
        res = results[engine]
        res.pop("output", None)
        if samples.get(engine):
            ms = samples[engine]
            res.update(min_ms=min(ms), median_ms=statistics.median(ms), noise=noise(ms), samples=ms)
    ranked = [e for e in workers if results[e]["status"] == "ok"]
    spreads = [results[e]["noise"] for e in ranked if results[e].get("noise") is not None]
    row = {"model": model, "sparsity": sparsity, "threads": threads, "engines": results,
           "noise": max(spreads) if spreads else None, "busy_cores_before": busy,
           "quiet_wait_ms": {"median": 1e3 * statistics.median(waited), "max": 1e3 * max(waited)} if waited else None}
    log(f"{tag}: " + ", ".join(f"{e} {results[e]['min_ms']:.2f} ms" if "min_ms" in results[e]
                               else f"{e} {results[e]['status']}" for e in workers))
    return row


def run_threads(engines: list, pythons: dict, cells: dict, threads: int, x_path: str, rounds: int,
                tolerance: float, log_dir: str) -> list:
    from alcs_tvm.timing import thread_env

    workers = {}
    for engine in engines:
        env_name = ENGINE_ENV.get(engine)
        if env_name:
            env = thread_env(threads, _clean_env(PEER_ENVS[env_name].get("env")))
        else:
            env = thread_env(threads)
        workers[engine] = Worker(engine, pythons[engine], threads, env,
                                 os.path.join(log_dir, f"{engine}_{threads}t.log"))
    rows = []
    try:
        for (model, sparsity), cell in cells.items():
            rows.append(run_cell(workers, cell, model, sparsity, threads, x_path, rounds, tolerance))
    finally:
        for w in workers.values():
            w.close()
    return rows


# ----------------------------------------------------------------------------------------------------- reports


def _fmt_ratio(r: dict, alcs: dict, bold: bool) -> str:
    if r is None:  # not installable here: the note under the table says why
        return "not run"
    if r["status"] == "failed":
        return "failed"
    if r["status"] == "wrong":
        return f"wrong ({r['rel_err']:.0e})"
    if "min_ms" not in r:
        return r["status"]
    if alcs.get("status") != "ok" or "min_ms" not in alcs:  # no alcs time to divide by
        text = f"{r['min_ms']:.2f} ms"
    else:
        text = f"{r['min_ms'] / alcs['min_ms']:.2f}"
    return f"**{text}**" if bold else text


def fastest(row, exclude=()) -> str | None:
    ranked = [(r["min_ms"], e) for e, r in row["engines"].items()
              if r["status"] == "ok" and "min_ms" in r and e not in exclude]
    return min(ranked)[1] if ranked else None


def engine_label(engine: str, rows) -> str:
    for row in rows:
        info = row["engines"].get(engine, {}).get("info")
        if info and info.get("version") and engine != "alcs":
            version = info["version"]
            return LABELS[engine].replace(" ", f" {version} ", 1) if " " in LABELS[engine] else \
                f"{LABELS[engine]} {version}"
    return LABELS[engine]


def table(rows, engines: list, unavailable: dict) -> list:
    peers = [e for e in engines if e != "alcs"]
    lines = ["| model | s | thr | alcs ms | " + " | ".join(engine_label(e, rows) for e in peers) + " | noise |",
             "|---" * (len(peers) + 5) + "|"]
    for row in rows:
        res = row["engines"]
        alcs = res.get("alcs", {})
        best = fastest(row)
        if alcs.get("status") == "ok" and "min_ms" in alcs:
            alcs_cell = f"**{alcs['min_ms']:.2f}**" if best == "alcs" else f"{alcs['min_ms']:.2f}"
        elif alcs.get("status") == "wrong":
            alcs_cell = f"wrong ({alcs['rel_err']:.0e})"
        else:
            alcs_cell = alcs.get("status", "-")
        cells = [_fmt_ratio(res.get(e), alcs, best == e) for e in peers]
        spread = "-" if row["noise"] is None else f"{row['noise']:.0%}"
        lines.append(f"| {row['model']} | {row['sparsity']}% | {row['threads']} | {alcs_cell} | "
                     + " | ".join(cells) + f" | {spread} |")
    lines += ["", "Peer columns: the engine's min time / alcs's min time (above 1: alcs is faster); bold: the fastest "
              "engine of the row. noise: the largest (second fastest - fastest) / fastest round among the row's "
              "ranked engines."]
    for engine, why in unavailable.items():
        lines.append(f"{LABELS[engine]}: not run: {why}")
    for row in rows:
        for engine, r in row["engines"].items():
            if r["status"] in ("failed", "wrong", "unchecked"):
                what = r.get("error") or (f"output differs from ORT's by {r['rel_err']:.1e} of its max"
                                          if r["status"] == "wrong" else "no ORT output to check it against")
                lines.append(f"{LABELS[engine]} on {row['model']} {row['sparsity']}% {row['threads']}t: "
                             f"{r['status']}: {what}")
    return lines


def summary(rows) -> list:
    """Per (model, threads): break-even sparsity and alcs's lead over the sparse engines. Returns dicts."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for threads in dict.fromkeys(r["threads"] for r in rows):
            mine = sorted((r for r in rows if r["model"] == model and r["threads"] == threads),
                          key=lambda r: r["sparsity"])
            if not mine:
                continue
            item = {"model": model, "threads": threads}
            dense = next((r for r in mine if r["sparsity"] == 0), None)
            best = fastest(dense, exclude=("alcs",)) if dense else None
            if best:
                bar = dense["engines"][best]["min_ms"]
                item.update(dense_engine=best, dense_ms=bar, break_even=None)
                for r in mine:
                    a = r["engines"].get("alcs", {})
                    if a.get("status") == "ok" and "min_ms" in a and a["min_ms"] <= bar:
                        item.update(break_even=r["sparsity"], alcs_ms=a["min_ms"])
                        break
            item["alcs_fastest_at"] = [r["sparsity"] for r in mine if fastest(r) == "alcs"]
            behind = {}  # cells where the fastest other engine beats alcs by more than the cell's noise
            for r in mine:
                a, peer = r["engines"].get("alcs", {}), fastest(r, exclude=("alcs",))
                if a.get("status") == "ok" and "min_ms" in a and peer:
                    ratio = r["engines"][peer]["min_ms"] / a["min_ms"]
                    if ratio < 1 - (r["noise"] or 0):
                        behind[r["sparsity"]] = {"engine": peer, "ratio": ratio, "noise": r["noise"]}
            item["alcs_behind"] = behind
            leads = {}
            for r in mine:
                if r["sparsity"] not in (80, 90) or r["engines"].get("alcs", {}).get("status") != "ok":
                    continue
                sparse = [(r["engines"][e]["min_ms"], e) for e in ("deepsparse", "mnn_sparse")
                          if r["engines"].get(e, {}).get("status") == "ok" and "min_ms" in r["engines"][e]]
                if sparse:
                    ms, e = min(sparse)
                    leads[r["sparsity"]] = {"engine": e, "ratio": ms / r["engines"]["alcs"]["min_ms"]}
            item["sparse_lead"] = leads
            out.append(item)
    return out


def summary_lines(items) -> list:
    lines = []
    for it in items:
        parts = []
        if "dense_engine" not in it:
            parts.append("break-even sparsity n/a (no ranked other engine at 0% in this run)")
        else:
            head = f"fastest other engine at 0%: {LABELS[it['dense_engine']]} {it['dense_ms']:.2f} ms; break-even "
            parts.append(head + (f"sparsity {it['break_even']}% (alcs {it['alcs_ms']:.2f} ms)"
                                 if it["break_even"] is not None else "sparsity: none in this run"))
        parts.append("alcs the fastest engine at " + (", ".join(f"{s}%" for s in it["alcs_fastest_at"]) or "none"))
        if it["alcs_behind"]:
            parts.append("behind by more than the noise at " + ", ".join(
                f"{s}% ({LABELS[v['engine']]} {v['ratio']:.2f})" for s, v in it["alcs_behind"].items()))
        if it["sparse_lead"]:
            parts.append("vs the faster of DeepSparse and MNN sparse: " + ", ".join(
                f"{s}% {v['ratio']:.2f}x ({LABELS[v['engine']]})" for s, v in it["sparse_lead"].items()))
        lines.append(f"- {it['model']}, {it['threads']} thread(s): " + "; ".join(parts))
    return lines


# -------------------------------------------------------------------------------------------------------- main


def _int_list(text: str, what: str, low: int, high: int) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--{what} takes comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not low <= v <= high]
    if not values or bad:
        raise BenchError(f"--{what} must be integers from {low} to {high}, got {text!r}")
    return list(dict.fromkeys(values))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="percent, comma separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma separated, from: %(default)s (alcs and ort are always run: ORT is the reference)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per cell")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="largest max|engine - ORT| / max|ORT| of a ranked engine (default %(default)g)")
    ap.add_argument("--venv-python", default=sys.executable,
                    help="the Python the peers' virtual environments are made with (default: this one)")
    ap.add_argument("--workdir", default=None,
                    help="keep the ONNX files, converted models and worker logs here (default: a temporary "
                         "directory, removed at the end)")
    ap.add_argument("--json", default=os.path.join(ROOT, "tools", "out", "bench_peers.json"))
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except BenchError as err:
        print(f"bench_peers: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_peers: interrupted", file=sys.stderr)
        return 130


def run(args, argv) -> int:
    started = time.perf_counter()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise BenchError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    sparsities = _int_list(args.sparsities, "sparsities", 0, 99)
    threads = _int_list(args.threads, "threads", 1, os.cpu_count() or 1)
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            raise BenchError(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    engines = [e for e in ENGINES if e in engines or e in ("alcs", "ort")]
    if args.rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {args.rounds}")
    if not args.tolerance > 0:
        raise BenchError(f"--tolerance must be positive, got {args.tolerance}")
    json_dir = os.path.dirname(os.path.abspath(args.json))
    if os.path.isdir(args.json):
        raise BenchError(f"--json {args.json} is a directory")
    try:  # found out now, not after the run
        os.makedirs(json_dir, exist_ok=True)
    except OSError as err:
        raise BenchError(f"cannot write --json {args.json}: {err.strerror or err}") from None
    if not os.access(json_dir, os.W_OK):
        raise BenchError(f"cannot write --json {args.json}: {json_dir} is not writable")
    if args.workdir and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise BenchError(f"--workdir {args.workdir} is not a directory")

    pythons, unavailable = {}, {}
    for engine in engines:
        env_name = ENGINE_ENV.get(engine)
        if env_name is None:
            pythons[engine] = sys.executable
            continue
        python, why = ensure_env(env_name, args.venv_python)
        if python:
            pythons[engine] = python
        else:
            unavailable[engine] = why
            log(f"{LABELS[engine]}: not run: {why}")
    requested, engines = engines, [e for e in engines if e in pythons]

    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="bench_peers_")
    os.makedirs(work, exist_ok=True)
    log_dir = os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    try:
        import numpy as np

        cells = export_models(models, sparsities, work)
        x_path = os.path.join(work, "input.npy")
        np.save(x_path, np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32))
        rows = []
        for n in threads:
            rows += run_threads(engines, pythons, cells, n, x_path, args.rounds, args.tolerance, log_dir)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rows.sort(key=lambda r: (models.index(r["model"]), r["threads"], r["sparsity"]))
    items = summary(rows)
    print("\n".join(table(rows, requested, unavailable)))
    print()
    print("Break-even sparsity: the lowest sparsity of the run at which alcs's min time is at most the fastest other "
          "engine's on the dense (0%) model. Lead: the faster of DeepSparse and MNN sparse / alcs.")
    print("\n".join(summary_lines(items)))
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed / 60:.1f} min")
    command = "python tools/bench_peers.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    write_json_atomic(args.json, {"format": FORMAT, "command": command, "rounds": args.rounds,
                                  "tolerance": args.tolerance, "elapsed_s": elapsed, "unavailable": unavailable,
                                  "rows": rows, "summary": items}, prefix=".bench-peers-")
    log(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
