"""Latency of conv layers that are not in a table, estimated by an XGBoost regressor.

A latency table answers only for the layer configurations it measured. For a layer it lacks, the default is a
clear error (:class:`~alcs_tvm.latency.LayerNotProfiledError`); optionally this regressor, trained on every
measured point of the tables at hand (same target), estimates it from what determines the kernel's work: input
and output channels, output size, kernel, stride, V and the block density. It predicts ``log(ms)``, so relative
errors are what it minimises, and reports its own error on layer configurations held out of training (whole
layers, not grid points: that is the situation it is used in).

    from alcs_tvm.latency import LatencyTable
    from alcs_tvm.latency_regressor import LatencyRegressor
    table = LatencyTable.load("resnet18_x86.json")
    regressor = LatencyRegressor.fit([table, LatencyTable.load("mobilenet_v2_x86.json")])
    print(regressor.holdout)        # {"layers": .., "points": .., "mape_pct": .., "max_err_pct": ..}
    table.estimate_missing(regressor)   # table.layer_latency(...) now answers for any conv, marked estimated
"""
from __future__ import annotations

import math

import numpy as np

from .latency import LatencyTable, LayerProfile, TableMismatchError
from .layer import Conv2dSpec

__all__ = ["LatencyRegressor", "features"]


def features(spec: Conv2dSpec, vector_width: int, density: float) -> list:
    """What the sparse kernel's time depends on, on scales the trees split well."""
    density = min(1.0, max(0.0, float(density)))
    kh, kw = spec.kernel
    pixels = spec.batch * spec.out_height * spec.out_width
    flops = spec.dense_flops
    weight_bytes = 4 * math.prod(spec.weight_shape)
    return [math.log2(spec.in_channels), math.log2(spec.out_channels), math.log2(pixels), kh, kw,
            spec.stride[0], spec.dilation[0], vector_width, density, math.log2(flops),
            math.log2(max(1.0, flops * density)), math.log2(max(1.0, weight_bytes * density)),
            math.log2(4 * spec.batch * spec.in_channels * spec.height * spec.width)]


def _rows(profiles):
    x, y, group = [], [], []
    for g, p in enumerate(profiles):
        for s, ms in zip(p.sparsities, p.sparse_ms):
            x.append(features(p.spec, p.vector_width, 1.0 - s))
            y.append(math.log(ms))
            group.append(g)
        if p.dense_ms is not None:  # the dense kernel: density 1 (same features as the grid's s = 0)
            x.append(features(p.spec, p.vector_width, 1.0))
            y.append(math.log(p.dense_ms))
            group.append(g)
    return np.asarray(x, np.float32), np.asarray(y, np.float32), np.asarray(group)


class LatencyRegressor:
    """``fit(tables)`` then ``predict(spec, V, sparsity)`` in ms; ``holdout`` is the measured held-out error."""

    PARAMS = dict(n_estimators=400, max_depth=5, learning_rate=0.05, subsample=0.9, colsample_bytree=0.9,
                  min_child_weight=1, n_jobs=1)

    def __init__(self, booster, target: dict, holdout: dict):
        self._model = booster
        self.target = target
        self.holdout = holdout

    @classmethod
    def _train(cls, x, y, seed):
        try:
            import xgboost
        except ImportError:
            raise ValueError("estimating missing layers needs xgboost: pip install xgboost-cpu") from None
        model = xgboost.XGBRegressor(random_state=seed, **cls.PARAMS)
        model.fit(x, y)
        return model

    @classmethod
    def fit(cls, tables, *, holdout_fraction: float = 0.2, seed: int = 0) -> "LatencyRegressor":
        """Train on every measured point of ``tables`` (all for one target). The held-out error comes from a
        model trained without ``holdout_fraction`` of the layer configurations, evaluated on them."""
        tables = [tables] if isinstance(tables, LatencyTable) else list(tables)
        if not tables:
            raise ValueError("no latency table to train the regressor on")
        target = tables[0].target
        for t in tables[1:]:
            if t.target != target:
                raise TableMismatchError(f"cannot train one regressor on tables of different targets: {target} "
                                         f"and {t.target}")
        profiles = {}
        for t in tables:
            profiles.update(t.layers)
        profiles = list(profiles.values())
        if len(profiles) < 3:
            raise ValueError(f"the tables hold {len(profiles)} layer configurations; the regressor needs at least "
                             f"3 (profile more models)")
        x, y, group = _rows(profiles)
        rng = np.random.default_rng(seed)
        held = rng.permutation(len(profiles))[:max(1, int(round(holdout_fraction * len(profiles))))]
        test = np.isin(group, held)
        trial = cls._train(x[~test], y[~test], seed)
        rel = np.exp(trial.predict(x[test]) - y[test]) - 1.0
        holdout = {"layers": int(len(held)), "points": int(test.sum()), "trained_on_layers": len(profiles),
                   "mape_pct": float(np.mean(np.abs(rel)) * 100), "max_err_pct": float(np.max(np.abs(rel)) * 100)}
        return cls(cls._train(x, y, seed), target, holdout)

    def predict(self, spec: Conv2dSpec, vector_width: int, sparsity: float) -> float:
        row = np.asarray([features(spec, vector_width, 1.0 - sparsity)], np.float32)
        return float(math.exp(self._model.predict(row)[0]))

    def profile(self, spec: Conv2dSpec, vector_width: int, sparsities) -> LayerProfile:
        """An estimated profile on the given grid (dense = the estimate at density 1)."""
        grid = [float(s) for s in sparsities]
        rows = np.asarray([features(spec, vector_width, 1.0 - s) for s in grid], np.float32)
        ms = [float(v) for v in np.exp(self._model.predict(rows))]
        # estimates must not make the curve rise with sparsity (a kernel never gets slower with fewer blocks)
        ms = list(np.minimum.accumulate(ms))
        profile = LayerProfile(spec, vector_width, grid, ms, [0.0] * len(grid), ms[0], 0.0)
        profile.estimated = True
        return profile

    def describe(self) -> str:
        h = self.holdout
        return (f"XGBoost latency regressor on {h['trained_on_layers']} measured layer configurations; held-out "
                f"error on {h['layers']} unseen layers ({h['points']} points): MAPE {h['mape_pct']:.1f}%, max "
                f"{h['max_err_pct']:.1f}%")
