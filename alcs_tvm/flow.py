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

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import tvm
from tvm import relax

from . import compiler
from . import rpc as alcs_rpc
from .data import load_dataset
from .defaults import DEFAULT_PRETRAIN_EPOCHS, FLOW_SPARSITIES
from .latency import LatencyTable
from .plots import write_plot
from .profiler import Measurer, profile_model
from .pruning import LatencyModel, check_budget, export_pruned, find_prunable_layers, over_budget_hint
from .run import flatten_outputs, time_model, write_sidecar
from .target import resolve_target
from .training import evaluate, prune, train_dense
from .zoo import load_model

__all__ = ["FlowResult", "run_flow", "library_accuracy", "FLOW_SPARSITIES", "DEFAULT_PRETRAIN_EPOCHS"]


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


def library_accuracy(lib_path, x: np.ndarray, y: np.ndarray, *, session=None, timeout=None) -> float:
    """Top-1 accuracy of a compiled classifier library on ``x`` (N, C, H, W), one image per call (the library is
    compiled for batch 1), here or on the device of an open RPC ``session``."""
    if session is None:
        lib, dev = tvm.runtime.load_module(str(lib_path)), tvm.cpu(0)
    else:
        lib, dev = alcs_rpc.upload_library(session, lib_path, timeout=timeout), session.cpu(0)

    def remote(what):  # every call on a device is bounded: a frozen one must not hang the flow
        return contextlib.nullcontext() if session is None else alcs_rpc.guard(session, what, timeout)

    with remote("VM creation"):
        vm = relax.VirtualMachine(lib, dev)
    correct = 0
    for image, label in zip(x, y):
        with remote("inference"):
            logits = flatten_outputs(vm["main"](tvm.runtime.tensor(np.ascontiguousarray(image[None], np.float32),
                                                                    dev)))[0]
        correct += int(np.argmax(logits) == int(label))
    return correct / max(1, len(x))


def _step(log, number, total, text):
    log(f"\n[{number}/{total}] {text}")



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
    if info.is_cross and not (tracker or rpc):
        raise ValueError(f"target {target} cannot run on this host: give the device (--rpc-tracker HOST:PORT "
                         f"--rpc-key KEY, or --rpc HOST:PORT)")
    device = Measurer(info, tracker=tracker, key=key, rpc=rpc, local=not (tracker or rpc), timeout=device_timeout)
    try:
        device.session  # one session held for the whole flow: a phone is claimed once
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
        profile_model(dense_onnx, str(table_path), info, local=device.local, session=device.session,
                      tracker=tracker, key=key, rpc=rpc, sparsities=sparsities, repeat=profile_repeat, max_masks=2,
                      model_name=model, timeout=device_timeout, seed=seed)
        table = LatencyTable.load(str(table_path))
        log(f"{table_path}: {len(table.layers)} conv configurations, rest of model {table.rest_ms[model]:.4f} ms")
        seconds["profile"] = time.time() - t0

        t0 = time.time()
        _step(log, 3, steps, "latency-constrained pruning (ADMM)")
        layers = find_prunable_layers(net, dataset.input_shape, info)
        latency = LatencyModel(table, layers, table.rest_ms[model], model)
        dense_ms, min_ms = latency.dense_ms(), latency.min_ms(0.01)
        if budget_ms is None:
            fraction = 0.5 if budget_fraction is None else budget_fraction
            budget_ms = fraction * dense_ms
            if budget_fraction is None and budget_ms < min_ms:
                budget_ms = min_ms + 0.15 * (dense_ms - min_ms)
                log(f"note: 50% of the dense latency ({0.5 * dense_ms:.4f} ms) is below the fastest this model can "
                    f"run ({min_ms:.4f} ms); budget raised to {budget_ms:.4f} ms")
        check_budget(latency, budget_ms, 0.01)
        result = prune(net, dataset, table, budget_ms, group_width=info,
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
