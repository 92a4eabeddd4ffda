"""Targets: short names users type, TVM target dicts, and the SIMD width (fp32 lanes) of each.

The SIMD width ``V`` is the one architectural fact the whole ALCS method rests on: pruning groups, the sparse
format's blocks and the kernels' vector registers all have ``V`` fp32 lanes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import tvm
from tvm.target import codegen

from .sparse_format import fits_wide_groups

__all__ = ["TargetInfo", "resolve_target", "SHORT_NAMES", "AARCH64_TRIPLE"]

AARCH64_TRIPLE = "aarch64-linux-gnu"

#: short name -> (TVM target dict, family). "x86" is resolved against the host CPU at call time.
SHORT_NAMES = {
    "x86-avx2": ({"kind": "llvm", "mcpu": "haswell"}, "x86-avx2"),
    "x86-avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, "x86-avx512"),
    "arm64": ({"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": "generic", "mattr": ["+neon"]}, "arm64"),
}

_FAMILY_WIDTH = {"x86-avx512": 16, "x86-avx2": 8, "arm64": 4, "generic": 4}

#: registers per pruning group where a layer's output channels allow it (by default; an explicit vector width
#: means one group width for every layer). AVX-512 cores issue two 512-bit FMAs but only two 512-bit loads per
#: cycle: with one register per group every FMA needs its own broadcast load of an input value and the sparse
#: loop is load-bound; two registers per group share each broadcast (docs/benchmarks.md). NEON's by-element FMA
#: reads its input from a vector lane that a scalar load fills, and the Neoverse N1 (Cortex-A76) issues those
#: loads at one pair per cycle against two FMAs: with one q register per group the sparse loop is load-bound
#: there too, and two (V = 8) bring it to the FMA pipes (llvm-mca estimates, docs/arm64.md).
_FAMILY_GROUP_REGISTERS = {"x86-avx512": 2, "arm64": 2}

@dataclass(frozen=True)
class TargetInfo:
    """A resolved target: the TVM target, its family (schedule choice) and fp32 SIMD width."""

    target: tvm.target.Target
    family: str  # "x86-avx512" | "x86-avx2" | "arm64" | "generic"
    vector_width: int  # V: fp32 lanes of a vector register; also the block of the channel-blocked layouts
    wide_group_width: int = 0  # a multiple of V used as the group width where Cout allows it (0: always V)

    def group_width(self, out_channels: int) -> int:
        """The pruning group / sparse block width for a layer with ``out_channels`` outputs: the wide width
        where it divides ``out_channels`` (no lanes wasted) into at least two groups, else V. With a single
        group a layer would lose the kernel's parallelism over output blocks and the pruner every choice across
        its output channels (docs/pruning.md)."""
        wide = self.wide_group_width
        return wide if wide and fits_wide_groups(out_channels, wide) else self.vector_width

    def describe_widths(self) -> str:
        """``"16"``, or ``"32 where Cout is a multiple of 32 and >= 64, else 16"``."""
        if not self.wide_group_width:
            return str(self.vector_width)
        return f"{self.wide_group_width} where Cout is a multiple of {self.wide_group_width} and >= " \
            f"{2 * self.wide_group_width}, else {self.vector_width}"

    def group_widths(self) -> tuple:
        """Every group width a layer may get, widest first."""
        return (self.wide_group_width, self.vector_width) if self.wide_group_width else (self.vector_width,)

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
    or a ``tvm.target.Target``. ``vector_width`` overrides the family's SIMD width and makes it every layer's
    group width (without it, AVX-512 layers whose output channels are a multiple of 32 and at least 64 get
    groups of 32)."""
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
    registers = _FAMILY_GROUP_REGISTERS.get(family, 1) if vector_width is None else 1
    return TargetInfo(target, family, width, width * registers if registers > 1 else 0)
