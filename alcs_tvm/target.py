"""Targets: short names users type, TVM target dicts, and the SIMD width (fp32 lanes) of each.

The SIMD width ``V`` is the one architectural fact the whole ALCS method rests on: pruning groups, the sparse
format's blocks and the kernels' vector registers all have ``V`` fp32 lanes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import tvm
from tvm.target import codegen

__all__ = ["TargetInfo", "resolve_target", "SHORT_NAMES", "AARCH64_TRIPLE"]

AARCH64_TRIPLE = "aarch64-linux-gnu"

#: short name -> (TVM target dict, family). "x86" is resolved against the host CPU at call time.
SHORT_NAMES = {
    "x86-avx2": ({"kind": "llvm", "mcpu": "haswell"}, "x86-avx2"),
    "x86-avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, "x86-avx512"),
    "arm64": ({"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": "generic", "mattr": ["+neon"]}, "arm64"),
}

_FAMILY_WIDTH = {"x86-avx512": 16, "x86-avx2": 8, "arm64": 4, "generic": 4}


@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: the TVM target, its family (schedule choice) and fp32 SIMD width."""

    target: tvm.target.Target
    family: str  # "x86-avx512" | "x86-avx2" | "arm64" | "generic"
    vector_width: int

    @property
    def is_cross(self) -> bool:
        """True when the code cannot run on this host (needs a cross compiler and a remote device)."""
        return self.family == "arm64" and "aarch64" not in codegen.llvm_get_system_triple()

    @property
    def key(self) -> str:
        """Stable text identifying the target (used to tie latency tables and tuning records to it)."""
        return json.dumps({k: _plain(v) for k, v in sorted(self.target.export().items())
                           if k in ("kind", "mcpu", "mtriple", "mattr")}, sort_keys=True)


def _plain(value):
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [str(v) for v in value]
    return str(value)


def _host_target() -> dict:
    cpu = codegen.llvm_get_system_cpu()
    return {"kind": "llvm", "mcpu": cpu}


def _family(target: tvm.target.Target) -> str:
    if target.kind.name != "llvm":
        raise ValueError(f"only CPU (llvm) targets are supported, got kind {target.kind.name!r}")
    triple = str(target.attrs.get("mtriple", "")) or codegen.llvm_get_system_triple()
    if triple.startswith("aarch64") or triple.startswith("arm64"):
        return "arm64"
    if triple.startswith("x86_64") or triple.startswith("i686"):
        if codegen.llvm_cpu_has_features(["avx512f"], target):
            return "x86-avx512"
        if codegen.llvm_cpu_has_features(["avx2", "fma"], target):
            return "x86-avx2"
    return "generic"


def resolve_target(target, vector_width: int | None = None) -> TargetInfo:
    """Resolve a short name (``x86``, ``x86-avx2``, ``x86-avx512``, ``arm64``), a target dict, its JSON text,
    or a ``tvm.target.Target``. ``vector_width`` overrides the family's SIMD width."""
    if isinstance(target, TargetInfo):  # already resolved: keep its width unless overridden
        if vector_width is None or int(vector_width) == target.vector_width:
            return target
        target = target.target
    if isinstance(target, str):
        text = target.strip()
        if text == "x86":
            target = _host_target()
        elif text in SHORT_NAMES:
            target = SHORT_NAMES[text][0]
        elif text.startswith("{"):
            try:
                target = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"target {text!r} is not valid JSON: {err}") from None
        else:
            raise ValueError(f"unknown target {text!r}: use one of x86, {', '.join(SHORT_NAMES)} "
                             "or a TVM target JSON dict such as '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'")
    if isinstance(target, dict):
        try:
            target = tvm.target.Target(target)
        except Exception as err:  # TVM raises its own error types for bad dicts
            raise ValueError(f"invalid TVM target {target}: {str(err).splitlines()[0]}") from None
    if not isinstance(target, tvm.target.Target):
        raise TypeError(f"target must be a name, dict or tvm.target.Target, got {type(target).__name__}")
    family = _family(target)
    width = _FAMILY_WIDTH[family] if vector_width is None else int(vector_width)
    if width < 1:
        raise ValueError(f"vector width must be positive, got {vector_width}")
    return TargetInfo(target, family, width)
