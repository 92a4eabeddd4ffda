"""The compile report: for every conv (and linear) layer and channel concat, what ran and why."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .layer import Conv2dSpec, KernelLayout

__all__ = ["LayerDecision", "CompileReport"]


@dataclass
class LayerDecision:
    name: str
    op: str  # "conv2d" | "linear" | "concat", or a conv the kernel does not compute: "conv1d", "conv2d_transpose", ...
    shape: str  # human-readable geometry, e.g. "3x3 64->64 @56x56 p1"
    density: float | None  # fraction of V-blocks kept (None when not analysed, e.g. depthwise)
    vector_width: int | None
    decision: str  # "sparse" | "dense"; a concat's: "blocked" (NCHW[V]c) | "nchw"
    implementation: str  # what runs: "alcs sparse kernel", "alcs dense kernel", "relax default", ...
    reason: str
    predicted_ms: dict = field(default_factory=dict)  # {"sparse": .., "dense": ..} when a latency table decided
    spec: Conv2dSpec | None = None  # a rewritable layer's geometry (what latency tables are keyed by)
    kernel: KernelLayout | None = None  # how a rewritten conv's kernel is called in the model
    symbol: str | None = None  # the kernel function a rewritten layer runs (what a profile names)
    algorithm: str = "direct"  # "direct" (the ALCS kernel over the kept blocks) or "winograd<m>" (F(m x m, 3x3))

    def row(self) -> list:
        density = "-" if self.density is None else f"{self.density:.3f}"
        return [self.name, self.shape, density, "-" if self.vector_width is None else str(self.vector_width),
                self.decision, self.implementation, self.reason]


@dataclass
class CompileReport:
    target: str
    layers: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def sparse_layers(self) -> list:
        return [layer for layer in self.layers if layer.decision == "sparse"]

    @property
    def dense_layers(self) -> list:
        return [layer for layer in self.layers if layer.decision == "dense"]

    def to_json(self) -> dict:
        return {"target": self.target, "layers": [asdict(layer) for layer in self.layers], "notes": self.notes,
                "summary": {"sparse": len(self.sparse_layers), "dense": len(self.dense_layers)}}

    def write(self, path: str):
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    def table(self) -> str:
        header = ["layer", "shape", "density", "V", "decision", "runs as", "why"]
        rows = [header] + [layer.row() for layer in self.layers]
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = f"{len(self.sparse_layers)} sparse, {len(self.dense_layers)} dense layers (target {self.target})"
        return "\n".join(lines + [summary] + self.notes)
