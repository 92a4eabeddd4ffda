"""Latency tables and the piece-wise linear latency model of ALCS.

A table holds, for one target device, every distinct conv configuration of a model measured at a grid of
SIMD-block sparsities (and dense), plus the time of everything that is not a rewritable conv. A layer's latency at
any sparsity is linear interpolation between grid points (exact at them); a model's latency is the sum over its
layers plus the rest. The same table drives the compiler's per-layer sparse/dense choice and the pruner.

File format (JSON)::

    {"format": "alcs-latency-table/1",
     "target": {...target key...}, "target_family": "x86-avx512", "device_key": "x86-local",
     "tvm_version": "0.27.0.post1", "settings": {"repeat": .., "number": .., ...},
     "layers": {LAYER_KEY: {"spec": {...Conv2dSpec fields...}, "vector_width": 16,
                            "sparsities": [0.0, 0.1, ...], "sparse_ms": [...], "sparse_spread_ms": [...],
                            "dense_ms": 1.23, "dense_spread_ms": 0.01}},
     "rest_ms": {MODEL_NAME: 0.8}}          # whole model minus its rewritable convs, per profiled model
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np

from .operator import Conv2dSpec

__all__ = ["LatencyTable", "LayerProfile", "layer_key", "TableMismatchError", "FORMAT"]

FORMAT = "alcs-latency-table/1"


class TableMismatchError(ValueError):
    """The table was measured for another target, TVM version or layer set than the one asked about."""


def layer_key(spec: Conv2dSpec, vector_width: int) -> str:
    """Identifies a conv configuration: identical layers (shape, stride, padding, dilation, V) share one entry."""
    kh, kw = spec.kernel
    return (f"n{spec.batch}_c{spec.in_channels}_h{spec.height}_w{spec.width}_o{spec.out_channels}_k{kh}x{kw}"
            f"_s{spec.stride[0]}x{spec.stride[1]}_p{'-'.join(map(str, spec.padding))}"
            f"_d{spec.dilation[0]}x{spec.dilation[1]}_v{vector_width}")


def _spec_from_dict(data: dict) -> Conv2dSpec:
    return Conv2dSpec(data["batch"], data["in_channels"], data["height"], data["width"], data["out_channels"],
                      tuple(data["kernel"]), tuple(data["stride"]), tuple(data["padding"]), tuple(data["dilation"]))


@dataclass
class LayerProfile:
    """Measurements of one conv configuration."""

    spec: Conv2dSpec
    vector_width: int
    sparsities: list = field(default_factory=list)  # ascending grid, in [0, 1]
    sparse_ms: list = field(default_factory=list)  # median latency of the sparse kernel at each grid point
    sparse_spread_ms: list = field(default_factory=list)  # interquartile range (or std) at each grid point
    dense_ms: float | None = None  # the dense conv as the compiler would run it
    dense_spread_ms: float | None = None

    @property
    def key(self) -> str:
        return layer_key(self.spec, self.vector_width)

    def sparse_latency(self, sparsity: float) -> float:
        """Piece-wise linear in sparsity between grid points, exact at them, clamped at the grid's ends."""
        if not self.sparsities:
            raise ValueError(f"layer {self.key} has no sparse measurements")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        return float(np.interp(sparsity, self.sparsities, self.sparse_ms))

    def latency(self, sparsity: float) -> float:
        """What the compiler would run: the faster of sparse at this sparsity and dense."""
        sparse = self.sparse_latency(sparsity)
        return sparse if self.dense_ms is None else min(sparse, self.dense_ms)

    def to_json(self) -> dict:
        data = asdict(self)
        data["spec"] = asdict(self.spec)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LayerProfile":
        profile = cls(_spec_from_dict(data["spec"]), int(data["vector_width"]), list(data["sparsities"]),
                      list(data["sparse_ms"]), list(data.get("sparse_spread_ms", [])), data.get("dense_ms"),
                      data.get("dense_spread_ms"))
        if len(profile.sparsities) != len(profile.sparse_ms) or \
                list(profile.sparsities) != sorted(profile.sparsities):
            raise ValueError(f"layer {profile.key}: sparsity grid and latencies do not match")
        return profile


@dataclass
class LatencyTable:
    target: dict  # TargetInfo.key as a dict
    target_family: str
    device_key: str | None
    tvm_version: str
    settings: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)  # key -> LayerProfile
    rest_ms: dict = field(default_factory=dict)  # model name -> ms of everything but the rewritable convs

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "target": self.target, "target_family": self.target_family,
                "device_key": self.device_key, "tvm_version": self.tvm_version, "settings": self.settings,
                "layers": {k: v.to_json() for k, v in self.layers.items()}, "rest_ms": self.rest_ms}

    def save(self, path: str):
        """Write atomically (temp file + rename): an interrupted write never leaves a torn table."""
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latency-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no latency table at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"latency table {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an alcs latency table (expected format {FORMAT!r})")
        try:
            layers = {}
            for key, entry in data["layers"].items():
                profile = LayerProfile.from_json(entry)
                if profile.key != key:
                    raise ValueError(f"entry {key!r} describes layer {profile.key}")
                layers[key] = profile
            return cls(data["target"], data["target_family"], data.get("device_key"), data["tvm_version"],
                       data.get("settings", {}), layers, data.get("rest_ms", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"latency table {path} is corrupted: {err}") from None

    # -- compatibility ----------------------------------------------------------------------------------------
    def check_compatible(self, target_info=None, tvm_version: str | None = None):
        """Raise :class:`TableMismatchError` when the table was measured for another target or TVM."""
        if target_info is not None:
            wanted = json.loads(target_info.key)
            if wanted != self.target:
                raise TableMismatchError(
                    f"latency table was measured for target {self.target} ({self.target_family}), "
                    f"not {wanted} ({target_info.family}): profile this target with `alcs profile`")
        if tvm_version is not None and tvm_version != self.tvm_version:
            raise TableMismatchError(f"latency table was measured with TVM {self.tvm_version}, this is TVM "
                                     f"{tvm_version}: re-profile")

    # -- the model --------------------------------------------------------------------------------------------
    def profile_for(self, spec: Conv2dSpec, vector_width: int) -> LayerProfile:
        key = layer_key(spec, vector_width)
        if key not in self.layers:
            raise KeyError(f"layer {spec.describe()} (V={vector_width}) is not in the latency table; profile the "
                           f"model that contains it")
        return self.layers[key]

    def layer_latency(self, spec: Conv2dSpec, vector_width: int, sparsity: float) -> float:
        return self.profile_for(spec, vector_width).latency(sparsity)

    def choose(self, spec: Conv2dSpec, density: float, vector_width: int):
        """The compiler's per-layer choice: ``(decision, predicted_ms, reason)``."""
        try:
            profile = self.profile_for(spec, vector_width)
        except KeyError as err:
            raise ValueError(str(err).strip("'\"")) from None
        sparse = profile.sparse_latency(1.0 - density)
        predicted = {"sparse": round(sparse, 5)}
        if profile.dense_ms is not None:
            predicted["dense"] = round(profile.dense_ms, 5)
        if profile.dense_ms is None or sparse <= profile.dense_ms:
            return "sparse", predicted, f"table: sparse {sparse:.3f} ms <= dense " + \
                (f"{profile.dense_ms:.3f} ms" if profile.dense_ms is not None else "(not measured)")
        return "dense", predicted, f"table: dense {profile.dense_ms:.3f} ms < sparse {sparse:.3f} ms"

    def predict(self, layers, rest_model: str | None = None):
        """Model latency: ``layers`` is an iterable of ``(name, spec, vector_width, sparsity)``. Returns
        ``(total_ms, {name: ms})``; the rest of the model (``rest_ms[rest_model]``) is added when given."""
        breakdown = {}
        for name, spec, vector_width, sparsity in layers:
            breakdown[name] = self.layer_latency(spec, vector_width, sparsity)
        total = sum(breakdown.values())
        if rest_model is not None:
            if rest_model not in self.rest_ms:
                raise KeyError(f"no 'rest of model' time for {rest_model!r} in the table")
            breakdown["(rest of model)"] = self.rest_ms[rest_model]
            total += self.rest_ms[rest_model]
        return total, breakdown
