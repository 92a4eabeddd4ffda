"""A new device's latency table from another device's table and a few measurements on the new one.

The idea of HELP (Lee et al., "Hardware-adaptive efficient latency prediction for NAS via meta-learning",
NeurIPS 2021): latencies of one network's layers on two devices are strongly related, so a handful of
measurements on a new device pin down the map from the known device's latencies to the new one's. Here: a table
of device A (``alcs profile``), at most ``n`` (layer, sparsity) points measured on device B, and a small fit of
``log(ms_B)`` on ``log(ms_A)`` at the same conv shape and sparsity give B's whole table.

    from alcs_tvm import latency_transfer as lt
    source = LatencyTable.load("resnet18_avx512.json")
    info = resolve_target("x86-avx2")
    layers = compiler.model_layers("resnet18.onnx", info)           # B's layers, B's group widths and keys
    points = lt.select_points(source, layers, 10)                   # which to measure, deterministic
    measured = lt.measure_points(points, info, Measurer(info, local=True), source=source)
    fit = lt.fit_transfer(source, measured)                         # Huber-weighted ridge of the log ratio
    table = lt.transfer_table(source, layers, info, measured, fit, device_key="local", model_name="resnet18")
    print(lt.compare_tables(table, LatencyTable.load("resnet18_avx2.json")))

Layers are matched by conv shape (:class:`~alcs_tvm.layer.Conv2dSpec`) and sparsity, never by table key: the two
devices' keys differ in their group width (``_v32``/``_v16`` on AVX-512, ``_v8`` on AVX2). The predicted table is
keyed as B's compiler keys its layers (the ``layers`` given, from :func:`~alcs_tvm.compiler.model_layers` for B).
A source table lacking a layer answers from its regressor when one was attached
(:meth:`LatencyTable.estimate_missing`); such layers are otherwise left out.

The fit (:func:`fit_transfer`): ridge regression (Huber-weighted) of ``log(ms_B) - log(ms_A)`` on four features
of the point - ``log(ms_A)``, the density, the share of the source layer's output lanes that compute (a partial
last block: 24 channels in 16-wide blocks) and the arithmetic intensity (FLOPs per byte moved) - intercept free,
coefficients shrunk towards 0, i.e. towards "B = A times one factor". Why these: the two devices' ratio is not
one number; on AVX-512 -> AVX2 it runs from 1.0 (memory-bound layers, partial blocks) to 3.2 (1x1 960->320 @7x7)
and moves with sparsity. With fewer measured layers a smaller set is used (``DEFAULT_FEATURE_SETS``). The
leave-one-layer-out error on the measured points (a layer's dense and sparse points leave together) is kept with
the fit; choosing the feature set by it (``choose="holdout"``) did worse than the fixed set where the source's
values are measured, better where they are a regressor's estimates. The alternatives measured are in
docs/latency_transfer.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import tvm

from .latency import LatencyTable, LayerNotProfiledError, LayerProfile
from .latency_regressor import features
from .layer import Conv2dSpec
from .winograd import winograd_applies

__all__ = ["TransferPoint", "TransferFit", "source_profile", "source_cold_fraction", "select_points",
           "measure_points", "fit_transfer", "transfer_table", "measured_from_table", "compare_tables",
           "FEATURE_SETS", "ALPHAS", "DEFAULT_FEATURE_SETS", "DEFAULT_ALPHA"]


# ----------------------------------------------------------------------------------------------- matching
def _spec_index(table: LatencyTable) -> dict:
    """conv shape -> the table's profiles of it (normally one: a shape has one group width per target)."""
    index = {}
    for profile in table.layers.values():
        index.setdefault(profile.spec, []).append(profile)
    return index


def source_profile(source: LatencyTable, spec: Conv2dSpec, index: dict | None = None) -> LayerProfile | None:
    """The source table's profile of the conv shape ``spec``, whatever its group width; from the table's
    regressor (``profile.estimated``) when it lacks the shape and one is attached; else None."""
    found = (index if index is not None else _spec_index(source)).get(spec)
    if found:
        if len(found) > 1:  # measured at several widths (tables of one target merged): the target's own width
            width = source.target_info().group_width(spec.out_channels)
            found = [p for p in found if p.vector_width == width] or found
        return found[0]
    if source.regressor is not None:
        return source.profile_for(spec, source.target_info().group_width(spec.out_channels))
    return None


def source_cold_fraction(source: LatencyTable, model_name: str | None = None) -> float:
    """The cache-state fraction the source table's latencies were mixed with (``alcs profile``'s calibration):
    the model's own, else the median over the table's models; 1 for a ``cold`` table, 0 for ``warm``."""
    weights = source.settings.get("weights")
    if weights == "cold":
        return 1.0
    if weights == "warm":
        return 0.0
    fractions = {name: entry.get("table_cold_fraction", entry["cold_fraction"])
                 for name, entry in source.models.items() if "cold_fraction" in entry}
    if model_name in fractions:
        return float(fractions[model_name])
    return float(np.median(list(fractions.values()))) if fractions else 0.0


# ----------------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class TransferPoint:
    """One (layer, sparsity) to measure on the new device: the new device's layer (its group width, its kernel
    layout in the model) and the source table's latency of the same conv shape at that sparsity."""

    layer: object  # compiler.ModelLayer of the new target
    sparsity: float
    source_ms: float

    def to_json(self) -> dict:
        return {"layer": self.layer.key, "node": self.layer.name, "sparsity": self.sparsity,
                "source_ms": self.source_ms}


def _golden_ranks(k: int) -> list:
    """A permutation of range(k) spreading consecutive indices (ranks of ``j * golden ratio mod 1``)."""
    phi = (math.sqrt(5.0) - 1.0) / 2.0
    keys = [(j * phi) % 1.0 for j in range(k)]
    order = sorted(range(k), key=lambda j: keys[j])
    ranks = [0] * k
    for r, j in enumerate(order):
        ranks[j] = r
    return ranks


def _layer_descriptors(src: LayerProfile) -> list:
    """Where a layer sits among others for the point selection: its source latency and what makes two devices'
    ratios differ (shape, the source's width and lane use, arithmetic intensity)."""
    spec = src.spec
    c = _columns(src, 1.0, _dense_ms(src))
    return [c["log_src"], math.log2(spec.in_channels), math.log2(spec.out_channels), c["log2_pixels"],
            spec.kernel[0] * spec.kernel[1] / 9.0, c["log2_v_src"], c["lanes_src"], c["log2_intensity"]]


def _spread(distinct, k: int, by: str) -> list:
    """Indices of ``k`` of ``distinct`` (sorted by source dense latency): ``"latency"``: evenly spaced ranks;
    ``"features"``: the fastest and the slowest, then farthest-point sampling on the standardised descriptors
    (each next layer the one farthest from those chosen; ties to the faster)."""
    count = len(distinct)
    if k >= count:
        return list(range(count))
    if by == "latency":
        return sorted({int(round(x)) for x in np.linspace(0, count - 1, k)}) if k > 1 else [count // 2]
    if by != "features":
        raise ValueError(f"spread must be 'features' or 'latency', got {by!r}")
    x = np.asarray([_layer_descriptors(p) for _, p in distinct], float)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    x = (x - x.mean(axis=0)) / scale
    chosen = [0, count - 1][:k] if k > 1 else [count // 2]
    while len(chosen) < k:
        distance = np.min(np.linalg.norm(x[:, None, :] - x[None, chosen, :], axis=2), axis=1)
        distance[chosen] = -1.0
        chosen.append(int(np.argmax(distance)))
    return sorted(chosen)


def select_points(source: LatencyTable, layers, n: int = 10, *, sparsities=None, spread: str = "features") -> list:
    """At most ``n`` (layer, sparsity) points of the new device's ``layers`` (``compiler.model_layers`` for it)
    to measure, spread over the source table: distinct layers (identical convs once), the fastest and the
    slowest by source dense latency and then, ``spread="features"``, each next the layer farthest from those
    chosen in (latency, channels, pixels, kernel, the source's width and lane use, arithmetic intensity) -
    the layers whose two devices' ratio differs most from the others' are the ones to measure; or
    ``spread="latency"``: evenly spaced ranks of source latency. Each gets a sparsity of the source grid
    (``sparsities``, default its non-zero points) assigned by a golden-ratio permutation, so that sparsity is
    spread over the grid and not tied to the layer's latency. With more points than layers, layers get a second
    sparsity, and so on. Deterministic: the same table and layers give the same points. Layers the source
    cannot answer for (see :func:`source_profile`) are skipped."""
    if n < 1:
        raise ValueError(f"the number of points to measure must be at least 1, got {n}")
    index = _spec_index(source)
    distinct, seen = [], set()
    for layer in layers:
        if layer.key in seen:
            continue
        seen.add(layer.key)
        profile = source_profile(source, layer.spec, index)
        if profile is not None:
            distinct.append((layer, profile))
    if not distinct:
        raise ValueError("the source table has none of the model's conv layers (match by conv shape): profile "
                         "the model on the source device, or attach a regressor (estimate_missing)")
    grid = sorted(float(s) for s in (sparsities if sparsities is not None else
                                     source.settings.get("sparsities") or distinct[0][1].sparsities))
    grid = [s for s in grid if s > 0.0] or grid
    # by source dense latency, ties by key: a stable order
    distinct.sort(key=lambda lp: (_dense_ms(lp[1]), lp[0].key))
    chosen = []
    taken = {}  # layer key -> sparsities chosen for it
    rounds = 0
    while len(chosen) < n and rounds < len(grid):
        left = n - len(chosen)
        k = min(left, len(distinct))
        at = _spread(distinct, k, spread)
        ranks = _golden_ranks(len(at))
        for j, i in enumerate(at):
            layer, profile = distinct[i]
            # this round's sparsity for the j-th layer, shifted by the round so a layer's sparsities differ
            g = (int(round(ranks[j] * (len(grid) - 1) / max(1, len(at) - 1))) + rounds * (len(grid) // 2 + 1)) % \
                len(grid)
            while grid[g] in taken.get(layer.key, ()):
                g = (g + 1) % len(grid)
            s = grid[g]
            taken.setdefault(layer.key, []).append(s)
            chosen.append(TransferPoint(layer, s, float(profile.sparse_latency(s))))
        rounds += 1
    return chosen[:n]


def _dense_ms(profile: LayerProfile) -> float:
    return profile.dense_ms if profile.dense_ms is not None else profile.sparse_ms[0]


# ----------------------------------------------------------------------------------------------- measuring
def measure_points(points, info, measurer, *, source: LatencyTable | None = None, cold_fraction=None,
                   repeat=None, min_repeat_ms=None, max_masks=None, spread_threshold=None, seed=0,
                   workdir=None, log=None) -> dict:
    """Measure ``points`` on the device behind ``measurer`` (a :class:`~alcs_tvm.profiler.Measurer` for
    ``info``), layer by layer through :func:`~alcs_tvm.profiler.measure_layer` (one library per layer: dense,
    Winograd where it applies, the sparse kernel at each of the layer's chosen sparsities, warm and cold). The
    timing settings default to the source table's, so the points are measured as the source was; the two cache
    states are mixed with ``cold_fraction`` (default: the source's, :func:`source_cold_fraction`). Returns
    ``{layer key: LayerProfile}`` on the new device."""
    from .profiler import measure_layer

    settings = source.settings if source is not None else {}
    if cold_fraction is None:
        cold_fraction = source_cold_fraction(source) if source is not None else 0.0
    by_layer = {}
    for point in points:
        layer, grid = by_layer.setdefault(point.layer.key, (point.layer, []))
        if point.sparsity not in grid:
            grid.append(point.sparsity)
    measured = {}
    for key, (layer, grid) in by_layer.items():
        profile = measure_layer(layer, info, measurer, sorted(grid),
                                repeat=repeat or settings.get("repeat", 20),
                                min_repeat_ms=min_repeat_ms if min_repeat_ms is not None else
                                settings.get("min_repeat_ms", 10),
                                max_masks=max_masks or settings.get("max_masks", 3),
                                spread_threshold=spread_threshold or settings.get("spread_threshold", 0.05),
                                seed=seed, workdir=workdir, cold_fraction=cold_fraction)
        measured[key] = profile
        if log:
            log(f"  measured {layer.spec.describe()} (V={layer.vector_width}): dense {profile.dense_ms:.4f} ms, " +
                ", ".join(f"{s:.2f}: {ms:.4f} ms" for s, ms in zip(profile.sparsities, profile.sparse_ms)))
    return measured


# ----------------------------------------------------------------------------------------------- the fit
#: candidate feature sets of the residual log(ms_B) - log(ms_A) (names of :func:`_columns`)
FEATURE_SETS = {
    "ratio": (),
    "affine": ("log_src",),
    "density": ("log_src", "density"),
    "width": ("log_src", "density", "log2_v_src"),
    "work": ("log_src", "density", "log2_v_src", "log2_flops_density", "log2_input_bytes", "log2_pixels"),
    "share": ("overhead_share",),
    "share+density": ("overhead_share", "density", "log_src"),
    "layer": ("log_src", "density", "lanes_src", "log2_intensity"),
    "layer+share": ("log_src", "density", "lanes_src", "log2_intensity", "overhead_share"),
}
#: ridge penalties tried by ``choose="holdout"`` (on standardised features)
ALPHAS = (0.1, 1.0, 10.0)
#: the fit used unless told otherwise, and its fallbacks with fewer measured layers (docs/latency_transfer.md: the
#: best of the sets on both validation models, ahead of choosing a set per run by its held-out error)
DEFAULT_FEATURE_SETS = ("layer", "density", "affine", "ratio")
DEFAULT_ALPHA = 1.0

_QUANTITIES = {"ms": ("sparse_ms", "dense_ms", "winograd_ms"),
               "warm": ("warm_ms", "dense_warm_ms", "winograd_warm_ms"),
               "cold": ("cold_ms", "dense_cold_ms", "winograd_cold_ms")}


def _split(src: LayerProfile, quantity: str) -> tuple:
    """The source layer's time as ``overhead + work x density``, least squares over its grid (dense included):
    ``(overhead, work)``, overhead clamped to [0, the fastest point]. Two devices differ by one factor on the
    work (the FMAs: vector width, FMA ports) and another on the overhead (output writes, loop and index
    bookkeeping), so the ratio of their times moves with the layer's overhead share."""
    pairs, dense, _ = _values(src, quantity)
    d = [1.0 - s for s, _ in pairs] + ([1.0] if dense is not None else [])
    ms = [m for _, m in pairs] + ([dense] if dense is not None else [])
    if len(set(d)) < 2:
        return 0.0, float(ms[0])
    work, overhead = np.polyfit(d, ms, 1)
    overhead = float(min(max(overhead, 0.0), min(ms)))
    return overhead, float(max(work, 1e-12))


def _columns(src: LayerProfile, density: float, src_ms: float, quantity: str = "ms") -> dict:
    f = features(src.spec, src.vector_width, density)
    overhead, work = _split(src, quantity)
    spec, v = src.spec, src.vector_width
    moved = 4 * (spec.in_channels * spec.height * spec.width + spec.out_channels * spec.out_height * spec.out_width +
                 density * math.prod(spec.weight_shape))
    return {"log_src": math.log(src_ms), "density": density, "log2_v_src": math.log2(v),
            "log2_pixels": f[2], "log2_flops_density": f[10], "log2_input_bytes": f[12],
            "overhead_share": overhead / (overhead + work * density),
            # the source's lanes that compute (a partial last block wastes the rest: 24 channels in 16-wide blocks)
            "lanes_src": spec.out_channels / (v * -(-spec.out_channels // v)),
            # FLOPs per byte moved: memory-bound layers gain less from wider vectors than compute-bound ones
            "log2_intensity": math.log2(max(1.0, spec.dense_flops * density) / moved)}


def _values(profile: LayerProfile, quantity: str):
    """``([(sparsity, ms), ...], dense_ms, winograd_ms)`` of ``profile`` in ``quantity`` (None where absent)."""
    grid_name, dense_name, winograd_name = _QUANTITIES[quantity]
    grid = getattr(profile, grid_name)
    pairs = [] if grid is None else list(zip(profile.sparsities, grid))
    return pairs, getattr(profile, dense_name), getattr(profile, winograd_name)


@dataclass
class TransferFit:
    """``log(ms_B) = log(ms_A) + intercept + coef . standardised(features)``; ``holdout``: its
    leave-one-layer-out error on the measured points; ``winograd_offset``: added for Winograd entries (their
    mean residual among the measured layers, 0 without any)."""

    name: str
    columns: tuple
    alpha: float
    intercept: float
    coef: list
    mean: list
    scale: list
    holdout: dict = field(default_factory=dict)
    winograd_offset: float = 0.0
    candidates: dict = field(default_factory=dict)  # "set/alpha" -> leave-one-layer-out MAPE %
    quantity: str = "ms"
    robust: bool = True

    def log_ratio(self, src: LayerProfile, density, src_ms) -> float:
        row = _columns(src, density, src_ms, self.quantity)
        x = np.asarray([row[c] for c in self.columns], float)
        return float(self.intercept + np.dot(self.coef, (x - self.mean) / self.scale)) if len(x) else \
            float(self.intercept)

    def predict(self, src: LayerProfile, density, src_ms) -> float:
        """The new device's time of the conv of source profile ``src`` at ``density``, where the source's is
        ``src_ms``."""
        return float(src_ms * math.exp(self.log_ratio(src, density, src_ms)))

    def to_json(self) -> dict:
        return {"model": self.name, "columns": list(self.columns), "alpha": self.alpha, "intercept": self.intercept,
                "coef": list(self.coef), "mean": list(self.mean), "scale": list(self.scale),
                "holdout": self.holdout, "winograd_offset": self.winograd_offset, "candidates": self.candidates,
                "quantity": self.quantity, "robust": self.robust}


def _ridge(x, r, alpha, weights=None):
    """Ridge on standardised columns, intercept unpenalised, rows weighted: ``(intercept, coef, mean, scale)``."""
    w = np.ones(len(r)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    if x.shape[1] == 0:
        return float(w @ r), np.zeros(0), np.zeros(0), np.ones(0)
    mean = w @ x
    scale = np.sqrt(w @ (x - mean) ** 2)
    scale[scale < 1e-9] = 1.0  # a constant column (one width only): its coefficient stays 0
    z = (x - mean) / scale
    rc = r - w @ r
    coef = np.linalg.solve(z.T @ (w[:, None] * z) + alpha / len(r) * np.eye(z.shape[1]), z.T @ (w * rc))
    return float(w @ r), coef, mean, scale


def _robust_ridge(x, r, alpha, robust=True, iterations=20):
    """:func:`_ridge` with Huber weights (iteratively reweighted): a point measured during one of the host's slow
    episodes (seen: one dense time 1.8x its repeat) pulls a 10-point fit far less. The residual scale is the
    median absolute residual (x 1.4826), at least 2 % so that a near-exact fit keeps every point."""
    weights = None
    for _ in range(iterations if robust else 1):
        intercept, coef, mean, scale = _ridge(x, r, alpha, weights)
        residual = r - intercept - ((x - mean) / scale) @ coef
        sigma = max(1.4826 * float(np.median(np.abs(residual))), 0.02)
        new = np.minimum(1.0, 1.345 * sigma / np.maximum(np.abs(residual), 1e-12))
        if weights is not None and np.allclose(new, weights, atol=1e-6):
            break
        weights = new
    return intercept, coef, mean, scale


def _training_rows(source: LatencyTable, measured: dict, quantity: str):
    """Rows ``(group, source profile, density, src_ms, new_ms)`` of every measured sparse and dense point whose
    source value exists, and Winograd rows ``(source profile, src_ms, new_ms)`` apart."""
    index = _spec_index(source)
    rows, winograd = [], []
    for g, (key, new) in enumerate(sorted(measured.items())):
        src = source_profile(source, new.spec, index)
        if src is None:
            continue
        src_pairs, src_dense, src_winograd = _values(src, quantity)
        new_pairs, new_dense, new_winograd = _values(new, quantity)
        if not src_pairs or not new_pairs:
            continue
        src_s = [s for s, _ in src_pairs]
        src_ms = [ms for _, ms in src_pairs]
        for s, ms in new_pairs:
            if s > 0.0:
                rows.append((g, src, 1.0 - s, float(np.interp(s, src_s, src_ms)), ms))
        if new_dense is not None:
            rows.append((g, src, 1.0, src_dense if src_dense is not None else src_ms[0], new_dense))
        if src_winograd is not None and new_winograd is not None:
            winograd.append((src, src_winograd, new_winograd))
    return rows, winograd


def fit_transfer(source: LatencyTable, measured: dict, *, quantity: str = "ms", feature_sets=DEFAULT_FEATURE_SETS,
                 alphas=(DEFAULT_ALPHA,), choose: str = "first", robust: bool = True) -> TransferFit:
    """Fit the map from the source's latencies to the new device's on the ``measured`` profiles (from
    :func:`measure_points`). ``feature_sets``: names of :data:`FEATURE_SETS` in order of preference (None: all);
    a set needs two measured layers per column plus one to hold out, else it is not tried. ``choose="first"``:
    the first set that can be fitted, with ``alphas[0]`` (the default: ``layer``, falling back to fewer columns
    with fewer measured layers); ``"holdout"``: every set with every penalty of ``alphas``, the lowest
    leave-one-layer-out MAPE on the measured points (with 10 points that choice is itself noisy: in the
    validation it did worse than the fixed set with measured source values, better with a regressor's estimates,
    docs/latency_transfer.md). The fit keeps the held-out error of the set
    it used (and of every candidate tried). ``quantity``: ``"ms"`` (the tables' latencies), ``"warm"`` or
    ``"cold"`` (the raw cache states). ``robust``: Huber-weighted rows (:func:`_robust_ridge`), else plain
    least squares."""
    if choose not in ("first", "holdout"):
        raise ValueError(f"choose must be 'first' or 'holdout', got {choose!r}")
    rows, winograd = _training_rows(source, measured, quantity)
    if not rows:
        raise ValueError("no measured point has a source latency at the same conv shape: nothing to fit")
    groups = np.asarray([r[0] for r in rows])
    names = list(feature_sets or FEATURE_SETS)
    columns = [_columns(src, d, src_ms, quantity) for _, src, d, src_ms, _ in rows]
    table = {name: np.asarray([[c[f] for f in FEATURE_SETS[name]] for c in columns], float).reshape(len(rows), -1)
             for name in names}
    r = np.asarray([math.log(new) - math.log(src) for *_, src, new in rows])
    layers = sorted(set(groups.tolist()))
    # at least two layers per column beyond the intercept, and one layer to hold out
    feasible = [name for name in names if len(layers) >= 2 and table[name].shape[1] <= len(layers) - 2]
    if choose == "first":
        feasible = feasible[:1]
    scores = {}
    for name in feasible:
        x = table[name]
        for alpha in ((alphas[0],) if choose == "first" else alphas) if x.shape[1] else (0.0,):
            errors = []
            for g in layers:
                train, test = groups != g, groups == g
                intercept, coef, mean, scale = _robust_ridge(x[train], r[train], alpha, robust)
                pred = intercept + ((x[test] - mean) / scale) @ coef
                errors.extend(np.abs(np.exp(pred - r[test]) - 1.0))
            scores[(name, alpha)] = (float(np.mean(errors)) * 100, float(np.max(errors)) * 100)
    if scores:  # the lowest held-out error; ties go to the simpler model (listed first), then more shrinkage
        (name, alpha), (mape, worst) = min(scores.items(), key=lambda kv: (kv[1][0], names.index(kv[0][0]),
                                                                           -kv[0][1]))
    else:  # one measured layer: nothing to hold out, one factor
        name, alpha, mape, worst = "ratio", 0.0, float("nan"), float("nan")
        table[name] = np.zeros((len(rows), 0))
    intercept, coef, mean, scale = _robust_ridge(table[name], r, alpha, robust)
    fit = TransferFit(name, FEATURE_SETS[name], float(alpha), intercept, [float(c) for c in coef],
                      [float(m) for m in mean], [float(s) for s in scale],
                      {"layers": len(layers), "points": len(rows), "mape_pct": mape, "max_err_pct": worst},
                      candidates={f"{n}/{a:g}": round(m, 3) for (n, a), (m, _) in scores.items()},
                      quantity=quantity, robust=robust)
    if winograd:  # a different kernel: its ratio differs from the direct kernel's by what the measured say
        offsets = [math.log(new) - math.log(fit.predict(src, 1.0, src_ms)) for src, src_ms, new in winograd]
        fit.winograd_offset = float(np.mean(offsets))
    return fit


# ----------------------------------------------------------------------------------------------- the table
def _predicted_profile(layer, src: LayerProfile, fits: dict, info, grid) -> LayerProfile:
    """The new device's profile of ``layer`` predicted from the source's profile ``src``."""
    spec = layer.spec

    def curve(fit):
        pairs, dense, wino = _values(src, fit.quantity)
        if not pairs:
            return None
        s_src, ms_src = zip(*pairs)
        ms = [fit.predict(src, 1.0 - s, float(np.interp(s, s_src, ms_src))) for s in grid]
        dense = fit.predict(src, 1.0, dense if dense is not None else ms_src[0])
        winograd = None
        if wino is not None and winograd_applies(spec, info.vector_width) is None:
            winograd = fit.predict(src, 1.0, wino) * math.exp(fit.winograd_offset)
        return ms, dense, winograd

    ms, dense, winograd = curve(fits["ms"])
    profile = LayerProfile(spec, layer.vector_width, list(grid), ms, [0.0] * len(grid), dense, 0.0)
    if winograd is not None:
        profile.winograd_tile, profile.winograd_ms = src.winograd_tile, winograd
    if "warm" in fits and "cold" in fits:
        warm, cold = curve(fits["warm"]), curve(fits["cold"])
        if warm is not None and cold is not None:
            profile.warm_ms, profile.dense_warm_ms = warm[0], warm[1]
            profile.cold_ms, profile.dense_cold_ms = cold[0], cold[1]
            if profile.winograd_ms is not None and warm[2] is not None and cold[2] is not None:
                profile.winograd_warm_ms, profile.winograd_cold_ms = warm[2], cold[2]
    return profile


def _with_measurements(predicted: LayerProfile, measured: LayerProfile, correction: str = "none") -> LayerProfile:
    """``predicted`` where ``measured`` has points: those exact, and the layer's other grid points corrected by
    the layer's own log residual at its measured points (the fit's error on this layer, which its neighbouring
    points share): ``"interp"``: interpolated linearly in sparsity between the measured points (dense is one),
    constant beyond them; ``"mean"``: their mean everywhere; ``"none"``: the other points stay predicted."""
    for quantity in ("ms", "warm", "cold"):
        p_pairs, p_dense, _ = _values(predicted, quantity)
        m_pairs, m_dense, _ = _values(measured, quantity)
        if not p_pairs or not m_pairs:
            continue
        lookup = dict(m_pairs)
        if m_dense is not None:
            lookup[0.0] = m_dense
        at = sorted(s for s, _ in p_pairs if s in lookup)
        predicted_at = dict(p_pairs)
        if p_dense is not None:
            predicted_at[0.0] = p_dense
        logs = [math.log(lookup[s]) - math.log(predicted_at[s]) for s in at]

        def factor(s):
            if not logs or correction == "none":
                return 1.0
            return math.exp(float(np.interp(s, at, logs)) if correction == "interp" else float(np.mean(logs)))

        new = [lookup[s] if s in lookup else ms * factor(s) for s, ms in p_pairs]
        grid_name, dense_name, _ = _QUANTITIES[quantity]
        setattr(predicted, grid_name, new)
        if m_dense is not None:
            setattr(predicted, dense_name, m_dense)
    predicted.sparse_spread_ms = [0.0] * len(predicted.sparsities)
    if measured.winograd_ms is not None:
        predicted.winograd_tile = measured.winograd_tile
        predicted.winograd_ms, predicted.winograd_warm_ms, predicted.winograd_cold_ms = \
            measured.winograd_ms, measured.winograd_warm_ms, measured.winograd_cold_ms
    return predicted


def transfer_table(source: LatencyTable, layers, info, measured: dict, fit: TransferFit, *, fits: dict | None = None,
                   device_key: str = "local", model_name: str | None = None, cold_fraction: float | None = None,
                   points=None, use_measurements: bool = True, correction: str = "none") -> LatencyTable:
    """The new device's latency table for ``layers`` (``compiler.model_layers(model, info)``: keyed by the new
    device's group widths): every layer predicted from the source's profile of its conv shape by ``fit``, on the
    source's sparsity grid; with ``use_measurements`` the ``measured`` layers keep their measured points, and
    ``correction`` (``"none"``, ``"interp"``, ``"mean"``, see :func:`_with_measurements`) says whether their other
    points follow those points' residuals (``"none"``, the default: in the validation one slow-episode
    measurement or one noisy source point spread over a whole layer that way). ``fits``: ``{"warm": fit,
    "cold": fit}`` to fill the raw cache-state fields as well. The rest of the model (``rest_ms[model_name]``) is
    the source's, scaled by the predicted / source ratio of the model's dense conv time, when the source has the
    same architecture (conv shapes in order). ``table.settings["transferred_from"]`` says where it came from,
    ``["transfer"]`` what was measured and fitted; the table is otherwise an ordinary one (it loads, predicts and
    drives the compiler)."""
    fits = {"ms": fit, **(fits or {})}
    grid = [float(s) for s in (source.settings.get("sparsities") or next(iter(source.layers.values())).sparsities)]
    if cold_fraction is None:
        cold_fraction = source_cold_fraction(source, model_name)
    index = _spec_index(source)
    table = LatencyTable(json.loads(info.key), info.family, device_key, tvm.__version__)
    skipped = []
    for layer in layers:
        if layer.key in table.layers:
            continue
        src = source_profile(source, layer.spec, index)
        if src is None:
            skipped.append(layer.key)
            continue
        profile = _predicted_profile(layer, src, fits, info, grid)
        if use_measurements and layer.key in measured:
            profile = _with_measurements(profile, measured[layer.key], correction)
        table.layers[layer.key] = profile
    settings = {k: v for k, v in source.settings.items() if k not in ("group_widths",)}
    settings.update({"sparsities": grid, "group_widths": list(info.group_widths())})
    settings["transferred_from"] = {"target": source.target, "target_family": source.target_family,
                                    "device_key": source.device_key, "tvm_version": source.tvm_version,
                                    "models": sorted(source.models)}
    settings["transfer"] = {
        "method": "alcs_tvm.latency_transfer: log(ms_new) - log(ms_source) by ridge regression on few features, "
                  "fitted on the measured points; every entry not measured is a prediction",
        "fit": fit.to_json(), "raw_fits": {q: f.to_json() for q, f in fits.items() if q != "ms"},
        "cold_fraction": cold_fraction,
        "points": [p.to_json() for p in (points or [])],
        "measured": {key: p.to_json() for key, p in sorted(measured.items())},
        "measurements_kept": bool(use_measurements),
        "not_in_source": skipped}
    table.settings = settings
    keys = [layer.key for layer in layers]
    if model_name is not None and not skipped:
        table.models[model_name] = {"layers": [[layer.name, layer.key] for layer in layers],
                                    "cold_fraction": cold_fraction, "transferred": True}
        try:  # the source's model with these conv shapes, whatever their widths
            rest = source.rest_ms[source.rest_model_for(keys)]
        except LayerNotProfiledError:
            rest = None
        if rest is not None:
            src_convs = sum(_dense_ms(source_profile(source, layer.spec, index)) for layer in layers)
            new_convs = sum(_dense_ms(table.layers[k]) for k in keys)
            table.rest_ms[model_name] = rest * new_convs / src_convs
            table.models[model_name].update({"rest_ms": table.rest_ms[model_name], "source_rest_ms": rest,
                                             "rest": "the source's, scaled by the model's dense conv time"})
    return table


def measured_from_table(table: LatencyTable) -> dict:
    """The measured profiles a transferred table was made from (``settings["transfer"]["measured"]``): refit
    without measuring again."""
    found = table.settings.get("transfer", {}).get("measured")
    if not found:
        raise ValueError("the table holds no transfer measurements (not made by latency_transfer)")
    return {key: LayerProfile.from_json(entry) for key, entry in found.items()}


# ----------------------------------------------------------------------------------------------- checking
def compare_tables(predicted: LatencyTable, reference: LatencyTable, *, exclude_measured: bool = False,
                   cold_fraction: float | None = None) -> dict:
    """Per-point error of ``predicted`` against a fully measured ``reference`` of the same device: every grid
    point of every layer both have (sparse, s > 0), the dense entries, the Winograd ones, and the raw warm and
    cold ones where both have them. Returns ``{kind: {"n", "mape_pct", "max_err_pct", "mean_err_pct",
    "worst"}}`` for kinds ``sparse``, ``dense``, ``all`` (sparse + dense), ``winograd``, ``warm``, ``cold``, and
    ``"by_sparsity"``: ``{sparsity: MAPE %}`` of ``all`` at each grid point (0: dense).
    ``exclude_measured``: leave out the layers ``predicted`` measured on the device (``settings["transfer"]``).
    ``cold_fraction``: compare against the reference's raw warm and cold times mixed with this fraction instead of
    its own calibrated one (the prediction's fraction is the source's: this separates the transfer's error from
    the two calibrations' difference)."""
    if cold_fraction is not None:
        reference = LatencyTable.from_json(json.loads(json.dumps(reference.to_json())))
        for profile in reference.layers.values():
            profile.mix_cache_states(cold_fraction)
    skip = set(predicted.settings.get("transfer", {}).get("measured", {})) if exclude_measured else set()
    errors = {kind: [] for kind in ("sparse", "dense", "winograd", "warm", "cold")}
    for key, ref in reference.layers.items():
        if key not in predicted.layers or key in skip:
            continue
        pred = predicted.layers[key]
        for s, ms in zip(ref.sparsities, ref.sparse_ms):
            if s > 0.0:
                errors["sparse"].append((pred.sparse_latency(s) / ms - 1.0, key, s))
        if ref.dense_ms is not None and pred.dense_ms is not None:
            errors["dense"].append((pred.dense_ms / ref.dense_ms - 1.0, key, 0.0))
        if ref.winograd_ms is not None and pred.winograd_ms is not None:
            errors["winograd"].append((pred.winograd_ms / ref.winograd_ms - 1.0, key, 0.0))
        for kind, grid_name in (("warm", "warm_ms"), ("cold", "cold_ms")):
            ref_ms, pred_ms = getattr(ref, grid_name), getattr(pred, grid_name)
            if ref_ms is not None and pred_ms is not None:
                errors[kind] += [(float(np.interp(s, pred.sparsities, pred_ms)) / ms - 1.0, key, s)
                                 for s, ms in zip(ref.sparsities, ref_ms)]
    errors["all"] = errors["sparse"] + errors["dense"]
    out = {"by_sparsity": {f"{s:g}": float(np.mean([abs(e) for e, _, t in errors["all"] if t == s]) * 100)
                           for s in sorted({t for _, _, t in errors["all"]})}}
    for kind, found in errors.items():
        if not found:
            continue
        rel = np.asarray([e for e, _, _ in found])
        worst = max(found, key=lambda e: abs(e[0]))
        out[kind] = {"n": len(found), "layers": len({k for _, k, _ in found}),
                     "mape_pct": float(np.mean(np.abs(rel)) * 100), "max_err_pct": float(np.max(np.abs(rel)) * 100),
                     "mean_err_pct": float(np.mean(rel) * 100),
                     "worst": {"layer": worst[1], "sparsity": worst[2], "err_pct": float(worst[0] * 100)}}
    return out
