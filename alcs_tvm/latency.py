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
     "rest_ms": {MODEL_NAME: 0.8},         # whole model minus its rewritable convs, per profiled model
     "models": {MODEL_NAME: {"layers": [[ONNX_NODE, LAYER_KEY], ...], "whole_dense_ms": .., "rest_ms": ..,
                             "whole_dense_spread_ms": .., "convs_dense_ms": ..}}}   # optional

``models`` ties a profiled model's architecture (its conv layer keys in graph order) to its "rest" time, so
:meth:`LatencyTable.predict` on any ONNX file of that architecture (e.g. a pruned copy) finds it. It also holds the
model's cache state: the fraction of each layer's cold-minus-warm gap paid inside the model (``cold_fraction``),
scaled by :func:`cache_exposure` of the configuration's weight footprint (``rest_weight_bytes`` plus each conv's
bytes as run) against the cache size the calibration fitted (``cache_bytes``; absent or 0 in older tables: the
fraction alone).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

import tvm

from .compiler import model_layers
from .files import (TableMismatchError, check_header, check_measured_for, checked_number, checked_numbers, json_copy,
                    json_kind, merge_entries, read_json_file, require_object, save_merged)
from .layer import Conv2dSpec, layer_key, without_width
from .target import resolve_target
from .winograd import WINOGRAD_TILES

__all__ = ["LatencyTable", "LayerProfile", "TableMismatchError", "LayerNotProfiledError", "FORMAT", "cache_exposure",
           "mix_cache_states"]

FORMAT = "alcs-latency-table/1"
#: the parts of a table that runs sharing it add to, entry by entry
_MERGED = ("layers", "rest_ms", "models")
#: the settings every measurement of one table shares (what a resumed profile checks too)
_SAME_SETTINGS = ("sparsities", "group_widths", "weights")


def mix_cache_states(warm: float, cold: float, fraction: float) -> float:
    """``warm + fraction x (cold - warm)``: a layer inside a model finds its weights partly in the caches and
    partly evicted by the other layers' since the last inference. A fraction above 1 extrapolates; where noise put
    the cold sample under the warm one that would go below both measurements (even below zero): no state of the
    caches is faster than the faster one."""
    return max(warm + fraction * (cold - warm), min(warm, cold))


def cache_exposure(footprint_bytes: float, cache_bytes: float) -> float:
    """The share of its cache-state gap a model pays when one inference touches ``footprint_bytes`` of weights and
    the caches keep ``cache_bytes`` of them until the next: ``1 - cache/footprint``, 0 when everything fits. A
    ``cache_bytes`` of 0 (a model whose calibration found no size, or an older table) pays it whole."""
    if cache_bytes <= 0:
        return 1.0
    return max(0.0, 1.0 - cache_bytes / footprint_bytes) if footprint_bytes > 0 else 0.0


class LayerNotProfiledError(TableMismatchError, LookupError):
    """A layer (or a model's rest) asked about is not in the table."""

    def __str__(self):  # not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


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
    # raw measurements behind sparse_ms/dense_ms when the profiler timed both cache states (see mix_cache_states)
    warm_ms: list | None = None  # weights in cache, per grid point
    cold_ms: list | None = None  # weights flushed from the caches before every call
    dense_warm_ms: float | None = None
    dense_cold_ms: float | None = None
    # the dense weight as Winograd F(m x m, 3x3) (a 3x3 stride-1 conv), with its fastest tile m: what the compiler
    # runs instead of the direct kernel where it is faster (absent: not measured, or the conv is no Winograd one)
    winograd_tile: int | None = None
    winograd_ms: float | None = None
    winograd_warm_ms: float | None = None
    winograd_cold_ms: float | None = None

    @property
    def key(self) -> str:
        return layer_key(self.spec, self.vector_width)

    def mix_cache_states(self, cold_fraction: float):
        """``sparse_ms``/``dense_ms``/``winograd_ms`` := :func:`mix_cache_states` of the warm and cold measurements
        at ``cold_fraction``, which the profiler calibrates on whole-model measurements."""
        if self.warm_ms is None or self.cold_ms is None:
            return
        a = float(cold_fraction)
        self.sparse_ms = [mix_cache_states(w, c, a) for w, c in zip(self.warm_ms, self.cold_ms)]
        if self.dense_warm_ms is not None and self.dense_cold_ms is not None:
            self.dense_ms = mix_cache_states(self.dense_warm_ms, self.dense_cold_ms, a)
        if self.winograd_warm_ms is not None and self.winograd_cold_ms is not None:
            self.winograd_ms = mix_cache_states(self.winograd_warm_ms, self.winograd_cold_ms, a)

    def sparse_latency(self, sparsity: float) -> float:
        """Piece-wise linear in sparsity between grid points, exact at them, clamped at the grid's ends."""
        if not self.sparsities:
            raise ValueError(f"layer {self.key} has no sparse measurements")
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        return float(np.interp(sparsity, self.sparsities, self.sparse_ms))

    def options(self, sparsity: float) -> dict:
        """What the compiler may run at this sparsity, measured: ``{"sparse": ms, "dense": ms, "winograd<m>": ms}``
        (the algorithms measured for this layer)."""
        found = {"sparse": self.sparse_latency(sparsity)}
        if self.dense_ms is not None:
            found["dense"] = self.dense_ms
        if self.winograd_ms is not None:
            found[f"winograd{self.winograd_tile}"] = self.winograd_ms
        return found

    def cache_states(self, option: str, sparsity: float) -> tuple:
        """``(warm_ms, cold_ms)`` measured for one of :meth:`options` (``"sparse"`` at ``sparsity``, ``"dense"``,
        ``"winograd<m>"``): what the profiler's cache-state calibration mixes."""
        if option == "sparse":
            return (float(np.interp(sparsity, self.sparsities, self.warm_ms)),
                    float(np.interp(sparsity, self.sparsities, self.cold_ms)))
        if option == "dense":
            return self.dense_warm_ms, self.dense_cold_ms
        if option == f"winograd{self.winograd_tile}":
            return self.winograd_warm_ms, self.winograd_cold_ms
        raise ValueError(f"layer {self.key} has no measured option {option!r}")

    def latency(self, sparsity: float) -> float:
        """What the compiler would run: the fastest of sparse at this sparsity, dense and Winograd."""
        return min(self.options(sparsity).values())

    def fastest(self, sparsity: float) -> str:
        """The option :meth:`latency` takes (the compiler's choice; ties to the earlier of :meth:`options`)."""
        options = self.options(sparsity)
        return min(options, key=options.get)

    def weight_bytes(self, option: str, sparsity: float) -> float:
        """Bytes of weights one call of ``option`` reads: the kept blocks of the sparse kernel, the dense weight,
        or Winograd F(m x m)'s transformed weight ((m + 2)^2 / 9 times the dense one)."""
        spec = self.spec
        dense = 4.0 * spec.in_channels * spec.out_channels * spec.kernel[0] * spec.kernel[1]
        if option == "sparse":
            return dense * (1.0 - sparsity)
        if option.startswith("winograd"):
            m = int(option[len("winograd"):])
            return dense * (m + 2) ** 2 / 9.0
        return dense

    def to_json(self) -> dict:
        data = asdict(self)
        data["spec"] = asdict(self.spec)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LayerProfile":
        """The profile ``data`` describes; a one-line ``ValueError`` naming the field that is missing, of the wrong
        type, or out of range (latencies finite and >= 0, sparsities in [0, 1] and ascending)."""
        require_object(data, "the layer")
        missing = [name for name in ("spec", "vector_width", "sparsities", "sparse_ms") if name not in data]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        sparsities = checked_numbers(data["sparsities"], "sparsities", high=1.0)
        if sparsities != sorted(sparsities):
            raise ValueError(f"sparsities must be ascending, got {sparsities}")
        n = len(sparsities)

        def ms(name):
            value = data.get(name)
            return None if value is None else checked_number(value, name)

        def ms_list(name, length=None):
            value = data.get(name)
            return None if value is None else checked_numbers(value, name, length)

        return cls(_spec_from_json(data["spec"]), checked_number(data["vector_width"], "vector_width", 1,
                                                                    integer=True),
                   sparsities, checked_numbers(data["sparse_ms"], "sparse_ms", n), ms_list("sparse_spread_ms") or [],
                   ms("dense_ms"), ms("dense_spread_ms"), ms_list("warm_ms", n), ms_list("cold_ms", n),
                   ms("dense_warm_ms"), ms("dense_cold_ms"), _winograd_tile(data.get("winograd_tile")),
                   ms("winograd_ms"), ms("winograd_warm_ms"), ms("winograd_cold_ms"))


def _winograd_tile(value):
    if value is not None and value not in WINOGRAD_TILES:
        raise ValueError(f"winograd_tile must be one of {WINOGRAD_TILES}, got {value!r}")
    return value


def _spec_from_json(data) -> Conv2dSpec:
    """A :class:`Conv2dSpec` from a table, every field checked (``int("x")`` would not say which one)."""
    require_object(data, "spec")
    sizes = {"batch": 1, "in_channels": 1, "height": 1, "width": 1, "out_channels": 1}
    pairs = {"kernel": (2, 1), "stride": (2, 1), "padding": (4, 0), "dilation": (2, 1)}
    missing = [name for name in (*sizes, *pairs) if name not in data]
    if missing:
        raise ValueError(f"spec lacks {', '.join(missing)}")
    for name, low in sizes.items():
        checked_number(data[name], f"spec.{name}", low, integer=True)
    for name, (length, low) in pairs.items():
        if not isinstance(data[name], list) or len(data[name]) != length:
            raise ValueError(f"spec.{name} must be a list of {length} integers, got {data[name]!r}")
        for value in data[name]:
            checked_number(value, f"spec.{name}", low, integer=True)
    return Conv2dSpec.from_json(data)


@dataclass
class LatencyTable:
    target: dict  # TargetInfo.key as a dict
    target_family: str
    device_key: str | None
    tvm_version: str
    settings: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)  # key -> LayerProfile
    rest_ms: dict = field(default_factory=dict)  # model name -> ms of everything but the rewritable convs
    models: dict = field(default_factory=dict)  # model name -> {"layers": [[node, key], ..], "rest_ms", ...}
    # optional estimator for layers not measured (alcs_tvm.latency_regressor); never saved with the table
    regressor: object = field(default=None, repr=False, compare=False)
    _estimates: dict = field(default_factory=dict, repr=False, compare=False)
    # the entries as this table last read or wrote its file: what save() tells its own changes from others' by
    _saved: dict = field(default_factory=dict, repr=False, compare=False)

    # -- persistence ------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "target": self.target, "target_family": self.target_family,
                "device_key": self.device_key, "tvm_version": self.tvm_version, "settings": self.settings,
                "layers": {k: v.to_json() for k, v in self.layers.items()}, "rest_ms": self.rest_ms,
                "models": self.models}

    def save(self, path: str):
        """Add this table's measurements to the table at ``path``, atomically and under a lock: what other runs
        saved there since this one loaded or last saved it is kept (two ``alcs profile`` runs may share a table);
        entries this table added or changed since then are written. Afterwards this table holds what the file
        holds. An interrupted write never leaves a torn table."""
        ours = json_copy(self.to_json())

        def merge(on_disk):
            theirs = json_copy(LatencyTable.from_json(on_disk, path).to_json())
            self._check_same_kind(theirs, path)
            merged = dict(theirs)
            for section in _MERGED:
                merged[section] = merge_entries(ours[section], self._saved.get(section, {}), theirs[section])
            return merged

        written = save_merged(path, ours, merge, ".latency-", "latency table")
        for key, entry in written["layers"].items():
            if ours["layers"].get(key) != entry:
                self.layers[key] = LayerProfile.from_json(entry)
        self.rest_ms.update(written["rest_ms"])
        for name, entry in written["models"].items():
            if ours["models"].get(name) != entry:
                self.models[name] = entry
        self._saved = {section: written[section] for section in _MERGED}

    def _check_same_kind(self, theirs: dict, path):
        """Measurements of another target, TVM, device or grid cannot join this table's."""
        differ = [what for what, ours, other in (
            ("another target", self.target, theirs["target"]),
            ("another TVM version", self.tvm_version, theirs["tvm_version"]),
            ("another device", self.device_key, theirs["device_key"]),
            *((f"another {name} setting", self.settings.get(name), theirs["settings"].get(name))
              for name in _SAME_SETTINGS)) if json_copy(ours) != other]
        if differ:
            raise TableMismatchError(f"{path} now holds a latency table measured for {', '.join(differ)} (written "
                                     f"by another run meanwhile): the two cannot share one table")

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        """The table at ``path``, every entry checked: a one-line ``ValueError`` naming the file and the layer (or
        model) for a missing field, a wrong type, a NaN or negative latency or a sparsity outside [0, 1]."""
        return cls.from_json(read_json_file(path, "latency table", FORMAT), path)

    @classmethod
    def from_json(cls, data: dict, path="(table)") -> "LatencyTable":
        where = ""
        try:
            check_header(data)
            if data.get("device_key") is not None and not isinstance(data["device_key"], str):
                raise ValueError(f"'device_key' must be a string, got {json_kind(data['device_key'])}")
            for name in ("settings", "layers", "rest_ms", "models"):
                require_object(data.get(name, {}), f"{name!r}" + (" (layer key -> measurements)"
                                                                  if name == "layers" else ""))
            layers = {}
            for key, entry in data["layers"].items():
                where = f"layer {key}: "
                profile = LayerProfile.from_json(entry)
                if profile.key != key:
                    raise ValueError(f"the entry describes layer {profile.key}")
                layers[key] = profile
            rest_ms = {}
            for name, ms in data.get("rest_ms", {}).items():
                where = f"model {name!r}: "
                if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms < 0:
                    raise ValueError(f"its 'rest of model' time (rest_ms) is {ms!r} ms, below 0 (older versions of "
                                     f"alcs profile stored such fits): profile the model into a new table")
                rest_ms[name] = checked_number(ms, "its 'rest of model' time (rest_ms)")
            models = data.get("models", {})
            for name, entry in models.items():
                where = f"model {name!r}: "
                require_object(entry, "its entry in 'models'")
                pairs = entry.get("layers", [])
                if not isinstance(pairs, list) or not all(
                        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
                    raise ValueError(f"'layers' must be a list of [conv name, layer key] pairs, got {pairs!r:.80}")
            where = ""
        except ValueError as err:
            raise ValueError(f"latency table {path} is corrupted: {where}{err}") from None
        table = cls(data["target"], data["target_family"], data.get("device_key"), data["tvm_version"],
                    data.get("settings", {}), layers, rest_ms, models)
        table._saved = {section: json_copy(part) for section, part in table.to_json().items()
                        if section in _MERGED}
        return table

    # -- compatibility ----------------------------------------------------------------------------------------
    def check_compatible(self, target_info=None, tvm_version: str | None = None):
        """Raise :class:`TableMismatchError` when the table was measured for another target or TVM."""
        check_measured_for("latency table", self.target, self.target_family, self.tvm_version, target_info,
                           tvm_version, "profile this target and TVM with `alcs profile`")

    # -- the model --------------------------------------------------------------------------------------------
    def estimate_missing(self, regressor) -> "LatencyTable":
        """Answer for layers the table lacks with ``regressor``'s estimates (a
        :class:`~alcs_tvm.latency_regressor.LatencyRegressor` trained for this target) instead of an error."""
        if regressor is not None and regressor.target != self.target:
            raise TableMismatchError(f"the regressor was trained for target {regressor.target}, the table is for "
                                     f"{self.target}")
        self.regressor = regressor
        self._estimates = {}
        return self

    def profile_for(self, spec: Conv2dSpec, vector_width: int) -> LayerProfile:
        """The layer's profile; for a layer not in the table an estimate when :meth:`estimate_missing` was
        called (``profile.estimated`` is then True), else :class:`LayerNotProfiledError`."""
        key = layer_key(spec, vector_width)
        if key in self.layers:
            return self.layers[key]
        if self.regressor is None:
            raise LayerNotProfiledError(f"layer {spec.describe()} (V={vector_width}) is not in the latency table; "
                                        f"profile the model that contains it (alcs profile), or estimate missing "
                                        f"layers with a regressor (--estimate-missing)")
        if key not in self._estimates:
            grid = self.settings.get("sparsities") or [0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95]
            self._estimates[key] = self.regressor.profile(spec, vector_width, grid)
        return self._estimates[key]

    def layer_latency(self, spec: Conv2dSpec, vector_width: int, sparsity: float) -> float:
        return self.profile_for(spec, vector_width).latency(sparsity)

    def choose(self, spec: Conv2dSpec, density: float, vector_width: int):
        """The compiler's per-layer choice: ``(decision, predicted_ms, reason)``, decision ``"sparse"``, ``"dense"``
        or ``"winograd<m>"`` (the measured options, :meth:`LayerProfile.options`), the fastest; ties go to the
        earlier of that order."""
        profile = self.profile_for(spec, vector_width)
        options = profile.options(1.0 - density)
        predicted = {name: round(ms, 5) for name, ms in options.items()}
        source = "estimate (not in table)" if getattr(profile, "estimated", False) else "table"
        best = min(options, key=options.get)
        others = [f"{name} {ms:.3f} ms" for name, ms in options.items() if name != best]
        if "dense" not in options:
            others.append("dense (not measured)")
        return best, predicted, f"{source}: {best} {options[best]:.3f} ms <= " + ", ".join(others)

    def predict(self, layers, rest_model: str | None = None, *, target=None, input_shapes=None):
        """Model latency in ms and its per-layer breakdown ``(total_ms, {name: ms})``.

        * ``predict(onnx_model, per_layer_sparsity)``: ``onnx_model`` a path, bytes or ModelProto; its convs are
          mapped to table entries exactly as the compiler's pass maps them. ``per_layer_sparsity`` (dict ONNX node
          name -> SIMD-block sparsity; layers not in it use their weights' own block sparsity; None: all use
          their weights') . The rest of the model (depthwise convs, pooling, linear, ...) is added from the
          profiled model with the same conv layers (``"(rest of model)"`` in the breakdown).
        * ``predict(layers, rest_model)``: ``layers`` an iterable of ``(name, spec, vector_width, sparsity)``;
          ``rest_ms[rest_model]`` is added when given.
        """
        if isinstance(layers, (str, bytes, os.PathLike)) or type(layers).__name__ == "ModelProto":
            return self.predict_model(layers, rest_model, target=target, input_shapes=input_shapes)
        layers = list(layers)
        if rest_model is not None and rest_model not in self.rest_ms:
            raise LayerNotProfiledError(f"no 'rest of model' time for {rest_model!r} in the table")
        breakdown = {name: self.layer_latency(spec, vector_width, sparsity)
                     for name, spec, vector_width, sparsity in layers}
        entry = self.models.get(rest_model, {}) if rest_model is not None else {}
        if entry.get("cache_bytes"):
            breakdown.update(self._in_cache_state(layers, entry))
        total = sum(breakdown.values())
        if rest_model is not None:
            breakdown["(rest of model)"] = self.rest_ms[rest_model]
            total += self.rest_ms[rest_model]
        return total, breakdown

    def footprint(self, run, rest_weight_bytes: float = 0.0) -> float:
        """Weight bytes one inference reads: ``rest_weight_bytes`` plus each conv's as it runs, ``run`` a list of
        ``(layer key, option, sparsity)`` (:meth:`LayerProfile.options` names the options)."""
        return rest_weight_bytes + sum(self.layers[key].weight_bytes(option, sparsity) for key, option, sparsity in run)

    def _in_cache_state(self, layers, entry) -> dict:
        """Each layer's latency with its cache states mixed by the model's fraction times the exposure of this
        configuration's footprint (each conv as the compiler picks it), where the table's values hold the unpruned
        model's."""
        picked = [(name, profile, profile.fastest(sparsity), sparsity)
                  for name, profile, sparsity in ((name, self.profile_for(spec, vector_width), sparsity)
                                                  for name, spec, vector_width, sparsity in layers)]
        footprint = entry.get("rest_weight_bytes", 0.0) + sum(p.weight_bytes(o, s) for _, p, o, s in picked)
        fraction = entry["cold_fraction"] * cache_exposure(footprint, entry["cache_bytes"])
        found = {}
        for name, profile, option, sparsity in picked:
            if profile.warm_ms is None or profile.cold_ms is None:  # estimated, or one cache state measured
                continue
            warm, cold = profile.cache_states(option, sparsity)
            if warm is not None and cold is not None:
                found[name] = mix_cache_states(warm, cold, fraction)
        return found

    def target_object(self):
        return tvm.target.Target(dict(self.target))

    def target_info(self):
        """The :class:`~alcs_tvm.target.TargetInfo` the table was profiled for (its group widths included; a
        table from before they were recorded has one width for every layer)."""
        widths = self.settings.get("group_widths") or sorted({p.vector_width for p in self.layers.values()})
        return resolve_target(self.target_object(), widths[0] if len(widths) == 1 else None)

    def rest_model_for(self, keys) -> str:
        """The profiled model whose conv layers (keys in graph order) are ``keys``, up to their widths: a pruned
        copy may run a layer in other blocks than the dense model (:func:`~alcs_tvm.layer.without_width`)."""
        wanted = [without_width(k) for k in keys]
        for name, entry in self.models.items():
            if [without_width(k) for _, k in entry.get("layers", [])] == wanted and name in self.rest_ms:
                return name
        raise LayerNotProfiledError("no model with these conv layers has its 'rest of model' time in the table; "
                                    "profile this model (alcs profile)")

    def predict_model(self, model, per_layer_sparsity=None, *, target=None, input_shapes=None):
        """See :meth:`predict`. Returns ``(total_ms, {layer name: ms, "(rest of model)": ms})``."""
        layers = model_layers(model, target if target is not None else self.target_info(),
                              input_shapes=input_shapes)
        sparsity = dict(per_layer_sparsity or {})
        unknown = set(sparsity) - {layer.name for layer in layers}
        if unknown:
            raise ValueError(f"per-layer sparsity names layers the model has no rewritable conv for: "
                             f"{sorted(unknown)}")
        rows = [(layer.name, layer.spec, layer.vector_width,
                 min(1.0, max(0.0, float(sparsity.get(layer.name, 1.0 - layer.density))))) for layer in layers]
        return self.predict(rows, self.rest_model_for([layer.key for layer in layers]))
