"""How this project's processes start: TVM loads without torch where torch is not needed.

TVM imports torch at its own import, for DLPack exchange with torch tensors (in ``tvm_ffi`` and in
``tvm.relax``'s PyTorch interop), whether or not the process ever sees one. That import is two thirds of
``import tvm`` (about 2 of 3 s of CPU), paid again by every ``alcs compile``, ``run``, ``profile``, ``tune`` and
``device`` process and by every RPC tracker and x86 server this package starts, none of which hands TVM a torch
tensor. Those processes call :func:`load_tvm_without_torch` first; ``alcs prune`` and ``alcs flow``, which train
with torch, load both as usual.

``python -m alcs_tvm.startup MODULE [ARGS...]`` runs ``python -m MODULE ARGS...`` that way (the RPC tracker and
server entry points, ``tvm.exec.rpc_tracker`` and ``tvm.exec.rpc_server``).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys

__all__ = ["load_tvm_without_torch"]

#: the package whose import imports torch (through tvm_ffi and tvm.relax's PyTorch interop, each optional)
_TVM_PACKAGE = "tvm"


class _WithoutTorch(importlib.abc.Loader):
    """Runs the wrapped loader with ``import torch`` failing (an ImportError, which TVM handles), unless torch
    was already loaded."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if "torch" in sys.modules:
            return self.loader.exec_module(module)
        sys.modules["torch"] = None
        try:
            return self.loader.exec_module(module)
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]


class _FirstTvmImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TVM_PACKAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutTorch(spec.loader)
        return spec


def load_tvm_without_torch() -> None:
    """Make this process's first ``import tvm`` load without torch. The import itself stays where
    it is (a command's cheap argument checks still run before TVM loads); torch stays importable, and TVM then
    takes no torch tensors through DLPack. No effect once TVM is loaded."""
    if _TVM_PACKAGE in sys.modules or any(isinstance(f, _FirstTvmImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FirstTvmImport())


def _run_module(argv: list[str]) -> None:
    load_tvm_without_torch()
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _run_module(sys.argv[1:])
