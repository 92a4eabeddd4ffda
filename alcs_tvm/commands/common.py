"""Arguments and checks shared by several ``alcs`` commands (argparse lives only in the CLI modules)."""
from __future__ import annotations

import os

from ..rpc import DEFAULT_TIMEOUT

__all__ = ["TARGET_HELP", "VECTOR_WIDTH_HELP", "add_device_arguments", "check_device_arguments",
           "parse_sparsities", "require_file", "input_shapes_arg"]

TARGET_HELP = "x86 (host features), x86-avx2, x86-avx512, arm64, or a TVM target JSON dict"

VECTOR_WIDTH_HELP = ("pruning group width V in fp32 lanes, for every layer (default: the target's - AVX-512 32 where "
                     "a conv's output channels are 64, 96, ... (a multiple of 32, two groups or more), else 16; "
                     "AVX2 8; NEON 8 where they are a multiple of 8 and at least 16, else 4)")


def add_device_arguments(parser, *, local: bool = True):
    """Where a command runs kernels: a device at a tracker, an RPC server, or (``local``) this host; and the
    bound on waiting for it."""
    parser.add_argument("--rpc-tracker", metavar="HOST:PORT", help="RPC tracker to get the device from")
    parser.add_argument("--rpc-key", metavar="KEY", help="device key at the tracker (e.g. arm64-qemu)")
    parser.add_argument("--rpc", metavar="HOST:PORT", help="RPC server to use directly (no tracker)")
    if local:
        parser.add_argument("--local", action="store_true", help="measure on this host (no RPC)")
    parser.add_argument("--device-timeout", type=float, default=None, metavar="S",
                        help=f"bound in seconds on getting the device and on each remote step "
                             f"(default {DEFAULT_TIMEOUT:.0f})")


def check_device_arguments(args):
    if args.rpc and args.rpc_tracker:
        raise ValueError("give either --rpc-tracker (with --rpc-key) or --rpc, not both")
    if args.rpc_tracker and not args.rpc_key:
        raise ValueError("--rpc-tracker needs --rpc-key (e.g. x86-local or arm64-qemu)")
    if args.rpc_key and not args.rpc_tracker:
        raise ValueError("--rpc-key needs --rpc-tracker HOST:PORT")


def parse_sparsities(text: str) -> list:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers, got {text!r}") from None


def require_file(path: str, what: str = "model file") -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def input_shapes_arg(parser):
    parser.add_argument("--input-shapes", help="e.g. input:1x3x224x224 (needed when the model has dynamic dims)")
