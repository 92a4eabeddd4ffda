"""One engine of tools/bench_peers.py, at one thread count, in a process of its own.

Runs under the engine's Python: the main environment's for alcs, ONNX Runtime and PyTorch, a virtual environment
that bench_peers.py made for DeepSparse, MNN and ncnn (they pin numpy and onnx versions the main environment
cannot have). So at the top it imports only the standard library; numpy, the engine and alcs_tvm.timing (standard
library only) come in when asked for. Requests are JSON lines on stdin, answers JSON lines on the process's
original stdout; everything else the engines print (banners, converter logs) goes to stderr, which bench_peers.py
sends to a log file.

    {"cmd": "load", "engine": "mnn_sparse", "model": "resnet18", "onnx": ..., "state": ..., "input": x.npy,
     "output": out.npy, "work": dir}                       -> {"ok": true, "number": N, "load_s": ..., "info": {...}}
    {"cmd": "sample"}                                      -> {"ok": true, "ms": per-call ms over N calls}
    {"cmd": "unload"}                                      -> {"ok": true}

`load` converts or compiles the model where the engine needs it (once per model: the file lands in `work`, where
the next thread count's worker finds it), runs it once on the input (its output goes to `output`, which
bench_peers.py checks against ONNX Runtime's), warms it up and calibrates N with alcs_tvm.timing.calibrate.
`sample` times N back-to-back calls after one untimed call, as alcs_tvm.timing does for one candidate of a round.

    <python> tools/peers_worker.py ENGINE THREADS
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WARMUP_S = 0.5  # first runs allocate workspaces and pack weights (MNN, ncnn, DeepSparse)


def _replace(tmp: str, path: str) -> str:
    os.replace(tmp, path)  # the next thread count's worker sees a whole file or none
    return path


def load_alcs(req, threads, x):
    import tvm
    from tvm import relax

    from alcs_tvm.compiler import compile as alcs_compile
    from alcs_tvm.compiler import export
    from alcs_tvm.target import resolve_target

    info = resolve_target("x86")
    lib = os.path.join(req["work"], "alcs.so")
    meta_path = lib + ".json"
    if not os.path.exists(lib):
        started = time.perf_counter()
        executable, report = alcs_compile(req["onnx"], info)
        meta = {"compile_s": time.perf_counter() - started, "sparse_layers": len(report.sparse_layers),
                "dense_layers": len(report.dense_layers)}
        export(executable, lib, info)
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f)
        _replace(meta_path + ".tmp", meta_path)
    with open(meta_path) as f:
        meta = json.load(f)
    vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
    arg = tvm.runtime.tensor(x)
    return (lambda: vm["main"](arg)), (lambda: vm["main"](arg).numpy()), dict(meta, version=tvm.__version__)


def load_ort(req, threads, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(req["onnx"], options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    return (lambda: session.run(None, feed)), (lambda: session.run(None, feed)[0]), {"version": ort.__version__}


def load_torch(req, threads, x):
    import torch

    from alcs_tvm import zoo

    torch.set_num_threads(threads)
    model = zoo.get_model(req["model"]).eval()
    model.load_state_dict(torch.load(req["state"]))  # the pruned weights the ONNX file was exported from
    xt = torch.from_numpy(x)

    def run():
        with torch.inference_mode():
            return model(xt)

    return run, (lambda: run().numpy()), {"version": torch.__version__}


def load_deepsparse(req, threads, x):
    import deepsparse

    engine = deepsparse.compile_model(req["onnx"], batch_size=1, num_cores=threads)
    return (lambda: engine.run([x])), (lambda: engine.run([x])[0]), {"version": deepsparse.__version__}


def _mnn_convert(onnx_path: str, path: str, sparse: bool):
    """ONNX -> MNN through the converter's C extension: MNN.tools.mnnconvert.main (and so the `mnnconvert`
    console script) also sends a usage log and pip-installs a logging SDK into whatever Python is first on
    PATH."""
    import _tools

    tmp = path + ".tmp.mnn"
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", tmp, "--bizCode", "MNN"]
    if sparse:
        argv.append("--detectSparseSpeedUp")
    if not _tools.mnnconvert(argv) or not os.path.exists(tmp):
        raise RuntimeError("MNN's converter failed (its messages are in this worker's log)")
    return _replace(tmp, path)


def load_mnn(req, threads, x, sparse=False):
    import MNN
    import numpy as np

    path = os.path.join(req["work"], "model_sparse.mnn" if sparse else "model.mnn")
    if not os.path.exists(path):
        _mnn_convert(req["onnx"], path, sparse)
    interpreter = MNN.Interpreter(path)
    # "high": fp32 arithmetic; the default "normal" may pick fp16 or bf16 where the CPU has them
    session = interpreter.createSession({"backend": "CPU", "numThread": threads, "precision": "high"})
    tensor = interpreter.getSessionInput(session)
    tensor.copyFrom(MNN.Tensor(tuple(x.shape), MNN.Halide_Type_Float, x, MNN.Tensor_DimensionType_Caffe))

    def output():
        interpreter.runSession(session)
        out = interpreter.getSessionOutput(session)
        shape = tuple(out.getShape())
        host = MNN.Tensor(shape, MNN.Halide_Type_Float, np.zeros(shape, np.float32), MNN.Tensor_DimensionType_Caffe)
        out.copyToHostTensor(host)
        return np.array(host.getData(), dtype=np.float32).reshape(shape)

    return (lambda: interpreter.runSession(session)), output, {"version": MNN.version()}


def load_mnn_sparse(req, threads, x):
    return load_mnn(req, threads, x, sparse=True)


def _pnnx_binary() -> str:
    """The converter binary inside the pnnx wheel; found without importing the package, whose __init__ imports
    torch (which this environment does not have)."""
    import importlib.util

    spec = importlib.util.find_spec("pnnx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pnnx package is not installed in this environment")
    return os.path.join(list(spec.submodule_search_locations)[0], "pnnx")


def _ncnn_convert(onnx_path: str, work: str, shape) -> tuple:
    """ONNX -> ncnn param/bin with pnnx, weights kept in fp32 (pnnx's default fp16 weights change the
    outputs by ~3e-4). pnnx's intermediate files go to a scratch directory that is removed afterwards."""
    import shutil
    import tempfile

    param, binary = os.path.join(work, "model.ncnn.param"), os.path.join(work, "model.ncnn.bin")
    scratch = tempfile.mkdtemp(prefix="pnnx_", dir=work)
    try:
        local = os.path.join(scratch, "model.onnx")
        os.symlink(os.path.abspath(onnx_path), local)
        done = subprocess.run([_pnnx_binary(), local, "inputshape=[%s]" % ",".join(map(str, shape)), "fp16=0",
                               f"ncnnparam={scratch}/model.ncnn.param", f"ncnnbin={scratch}/model.ncnn.bin"],
                              cwd=scratch, stdout=sys.stderr, stderr=sys.stderr)
        if done.returncode != 0 or not os.path.exists(f"{scratch}/model.ncnn.param"):
            raise RuntimeError(f"pnnx failed (exit {done.returncode}; its messages are in this worker's log)")
        _replace(f"{scratch}/model.ncnn.bin", binary)
        _replace(f"{scratch}/model.ncnn.param", param)  # last: its presence means both are there
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return param, binary


def load_ncnn(req, threads, x):
    import ncnn
    import numpy as np

    param, binary = os.path.join(req["work"], "model.ncnn.param"), os.path.join(req["work"], "model.ncnn.bin")
    if not os.path.exists(param):
        _ncnn_convert(req["onnx"], req["work"], x.shape)
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_vulkan_compute = False
    # fp32 throughout: on CPUs with AVX512-FP16 / BF16 ncnn would otherwise store activations in 16 bits
    for name in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_packed",
                 "use_bf16_storage"):
        if hasattr(net.opt, name):
            setattr(net.opt, name, False)
    if net.load_param(param) != 0 or net.load_model(binary) != 0:
        raise RuntimeError(f"ncnn could not load {param}")
    mat = ncnn.Mat(np.ascontiguousarray(x[0]))  # ncnn's Mat has no batch axis

    def run():
        with net.create_extractor() as ex:
            ex.input("in0", mat)  # pnnx names the blobs in0.../out0...
            status, out = ex.extract("out0")
            if status != 0:
                raise RuntimeError(f"ncnn extract failed ({status})")
            return out

    return run, (lambda: np.array(run())[None]), {"version": ncnn.__version__}


LOADERS = {"alcs": load_alcs, "ort": load_ort, "torch": load_torch, "deepsparse": load_deepsparse,
           "mnn": load_mnn, "mnn_sparse": load_mnn_sparse, "ncnn": load_ncnn}


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def main(argv) -> int:
    engine, threads = argv[0], int(argv[1])
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the engines' C++ code prints must not mix into the answers
    sys.stdout = sys.stderr
    import numpy as np

    from alcs_tvm.timing import _sample, calibrate

    if engine == "alcs":
        from alcs_tvm.timing import set_threads

        set_threads(threads)
    run = number = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["cmd"] == "load":
                run = None
                gc.collect()  # the previous model's buffers go before the next one's come
                started = time.perf_counter()
                x = np.load(req["input"])
                run, output, info = LOADERS[engine](req, threads, x)
                out = np.asarray(output(), dtype=np.float32)
                np.save(req["output"] + ".tmp.npy", out)
                _replace(req["output"] + ".tmp.npy", req["output"])
                load_s = time.perf_counter() - started
                t_end = time.perf_counter() + WARMUP_S
                run()
                while time.perf_counter() < t_end:
                    run()
                number = calibrate(run)
                answer = {"ok": True, "number": number, "load_s": load_s, "info": info}
            elif req["cmd"] == "sample":
                run()  # untimed: wakes this engine's pool, warms caches
                answer = {"ok": True, "ms": _sample(run, number) * 1e3}
            elif req["cmd"] == "unload":
                run = None
                gc.collect()
                answer = {"ok": True}
            else:
                answer = {"ok": False, "error": f"unknown command {req['cmd']!r}"}
        except Exception as err:  # noqa: BLE001 - any engine failure is an answer, and the next model may work
            import traceback

            traceback.print_exc()  # the whole story goes to the log; the answer gets one line
            run = None
            answer = {"ok": False, "error": one_line(err)}
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
