"""A new device's latency table from another device's table and a few measurements (alcs_tvm/latency_transfer.py):
the fit recovers a known device-to-device transform, point selection is deterministic and spread, the predicted
table is an ordinary table keyed by the new target's widths; one real AVX-512 -> AVX2 transfer on this host."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tvm
from helpers import HOST_FEATURES, REPO

from alcs_tvm import latency_transfer as lt
from alcs_tvm.compiler import ModelLayer
from alcs_tvm.latency import LatencyTable, LayerProfile
from alcs_tvm.layer import Conv2dSpec, KernelLayout
from alcs_tvm.target import resolve_target

SOURCE = resolve_target("x86-avx512")
NEW = resolve_target("x86-avx2")
GRID = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9]
SPECS = [Conv2dSpec.create((1, c, h, h), (o, c, k, k), s, k // 2) for c, h, o, k, s in (
    (3, 64, 32, 3, 1), (16, 32, 48, 3, 2), (32, 32, 64, 1, 1), (64, 16, 64, 3, 1), (64, 16, 128, 1, 2),
    (128, 8, 128, 3, 1), (128, 8, 256, 3, 2), (256, 4, 256, 3, 1), (96, 14, 32, 1, 1), (48, 28, 96, 3, 1),
    (256, 4, 512, 1, 1), (24, 56, 144, 1, 1))]


def _source_ms(spec, v, density):
    """A made-up source device: work over a rate that grows with the block width, plus a call overhead."""
    return 2e-9 * spec.dense_flops * (0.05 + density) * (32 / v) ** 0.3 + 0.004 * math.log2(spec.in_channels + 1)


def _source_table():
    table = LatencyTable(json.loads(SOURCE.key), SOURCE.family, "source-dev", tvm.__version__,
                         {"sparsities": GRID, "group_widths": list(SOURCE.group_widths()), "repeat": 5})
    for spec in SPECS:
        v = SOURCE.group_width(spec.out_channels)
        ms = [_source_ms(spec, v, 1.0 - s) for s in GRID]
        table.layers[LayerProfile(spec, v).key] = LayerProfile(spec, v, list(GRID), ms, [0.0] * len(GRID), ms[0], 0.0)
    return table


def _new_layers():
    return [ModelLayer(f"conv{i}", spec, NEW.group_width(spec.out_channels), 1.0, KernelLayout(bias=True))
            for i, spec in enumerate(SPECS)]


def _transform(ms, spec, density):
    """The new device as a known function of the source: in the "density" feature set of the fit."""
    return 1.7 * ms ** 0.9 * math.exp(0.25 * density)


def _measured(source, points, transform, noise=0.0, seed=0):
    """What measuring ``points`` on the made-up new device gives: dense and each point's sparsity."""
    rng = np.random.default_rng(seed)
    found = {}
    for point in points:
        layer = point.layer
        src = lt.source_profile(source, layer.spec)
        grid = sorted({*found.get(layer.key, LayerProfile(layer.spec, 8)).sparsities, point.sparsity})

        def value(s):
            return transform(src.sparse_latency(s), layer.spec, 1.0 - s) * math.exp(noise * rng.standard_normal())

        ms = [value(s) for s in grid]
        found[layer.key] = LayerProfile(layer.spec, layer.vector_width, grid, ms, [0.0] * len(grid),
                                        transform(src.dense_ms, layer.spec, 1.0), 0.0)
    return found


# ----------------------------------------------------------------------------------------------- selection
def test_points_are_deterministic_at_most_n_spread_over_latency_and_sparsity():
    source, layers = _source_table(), _new_layers()
    points = lt.select_points(source, layers, 10)
    assert [p.to_json() for p in points] == [p.to_json() for p in lt.select_points(source, layers, 10)]
    assert len(points) == 10 and len({p.layer.key for p in points}) == 10  # distinct layers while there are enough
    assert all(p.sparsity in GRID[1:] for p in points)
    assert len({p.sparsity for p in points}) == len(GRID) - 1  # every non-zero grid point used
    dense = sorted(lt.source_profile(source, l.spec).dense_ms for l in layers)
    chosen = [lt.source_profile(source, p.layer.spec).dense_ms for p in points]
    assert min(chosen) == dense[0] and max(chosen) == dense[-1]  # the range's ends
    for p in points:  # the source's value of the same conv shape, the new device's width and key
        assert p.source_ms == pytest.approx(lt.source_profile(source, p.layer.spec).sparse_latency(p.sparsity))
        assert p.layer.key.endswith("_v8")
    few = lt.select_points(source, layers, 3)
    assert len(few) == 3 and len({p.layer.key for p in few}) == 3
    # more points than layers: second sparsities on the layers, no (layer, sparsity) twice
    many = lt.select_points(source, layers[:4], 9)
    assert len(many) == 9 and len({(p.layer.key, p.sparsity) for p in many}) == 9
    # identical convs are one layer; layers the source lacks are skipped
    other = ModelLayer("x", Conv2dSpec.create((1, 8, 8, 8), (8, 8, 3, 3), 1, 1), 8, 1.0, KernelLayout())
    again = lt.select_points(source, layers + layers + [other], 30)
    assert other.key not in {p.layer.key for p in again} and len(again) <= 30
    with pytest.raises(ValueError, match="at least 1"):
        lt.select_points(source, layers, 0)
    with pytest.raises(ValueError, match="none of the model's conv layers"):
        lt.select_points(source, [other], 5)


# ----------------------------------------------------------------------------------------------- the fit
def test_fit_recovers_a_known_transform_for_every_layer_and_grid_point():
    source, layers = _source_table(), _new_layers()
    points = lt.select_points(source, layers, 10)
    measured = _measured(source, points, _transform)
    # the feature set that holds the transform, (almost) no shrinkage: recovered to rounding
    exact = lt.fit_transfer(source, measured, feature_sets=["density"], alphas=[1e-9])
    assert exact.holdout["layers"] == 10 and exact.holdout["points"] == 20 and exact.holdout["mape_pct"] < 1e-4
    # the default (more columns, ridge-shrunk) within 3 %
    for fit, tolerance in ((exact, 1e-6), (lt.fit_transfer(source, measured), 0.03)):
        table = lt.transfer_table(source, layers, NEW, measured, fit, use_measurements=False)
        for layer in layers:
            src = lt.source_profile(source, layer.spec)
            p = table.profile_for(layer.spec, layer.vector_width)
            for s, ms in zip(p.sparsities, p.sparse_ms):
                assert ms == pytest.approx(_transform(src.sparse_latency(s), layer.spec, 1.0 - s), rel=tolerance), \
                    (fit.name, layer.spec, s)
            assert p.dense_ms == pytest.approx(_transform(src.dense_ms, layer.spec, 1.0), rel=tolerance)
    # one factor: recovered exactly, whichever feature set the held-out error picked
    measured = _measured(source, points, lambda ms, spec, d: 2.5 * ms)
    table = lt.transfer_table(source, layers, NEW, measured, lt.fit_transfer(source, measured),
                              use_measurements=False)
    for layer in layers:
        src = lt.source_profile(source, layer.spec)
        assert table.profile_for(layer.spec, 8).sparse_ms == pytest.approx([2.5 * m for m in src.sparse_ms],
                                                                           rel=1e-6)


def test_fit_with_noisy_measurements_stays_within_the_noise():
    """3 % measurement noise on the 10 points: every unmeasured point within 8 %, the mean error under 3 %."""
    source, layers = _source_table(), _new_layers()
    points = lt.select_points(source, layers, 10)
    measured = _measured(source, points, _transform, noise=0.03, seed=1)
    table = lt.transfer_table(source, layers, NEW, measured, lt.fit_transfer(source, measured),
                              use_measurements=False)
    errors = []
    for layer in layers:
        src = lt.source_profile(source, layer.spec)
        p = table.profile_for(layer.spec, 8)
        errors += [p.sparse_ms[i] / _transform(src.sparse_ms[i], layer.spec, 1.0 - s) - 1.0
                   for i, s in enumerate(GRID)]
    assert max(map(abs, errors)) < 0.08 and np.mean(np.abs(errors)) < 0.03


def test_one_slow_measurement_does_not_move_the_fit():
    """One point measured 1.8x slow (a slow episode of the host): the Huber-weighted fit still predicts the other
    layers within 3 %; plain least squares does not."""
    source, layers = _source_table(), _new_layers()
    points = lt.select_points(source, layers, 10)
    measured = _measured(source, points, _transform)
    bad = sorted(measured)[3]
    measured[bad].dense_ms *= 1.8

    def worst(fit):
        table = lt.transfer_table(source, layers, NEW, measured, fit, use_measurements=False)
        return max(abs(table.profile_for(l.spec, 8).sparse_ms[i] /
                       _transform(lt.source_profile(source, l.spec).sparse_ms[i], l.spec, 1.0 - s) - 1.0)
                   for l in layers if l.key != bad for i, s in enumerate(GRID))

    assert worst(lt.fit_transfer(source, measured)) < 0.03
    assert worst(lt.fit_transfer(source, measured, robust=False)) > 0.05


def test_a_wrong_feature_set_loses_on_held_out_layers():
    """The held-out error tells a transform the density term explains from one a single factor cannot: with the
    density effect strong, the one-factor model is not chosen and scores worse."""
    source, layers = _source_table(), _new_layers()
    measured = _measured(source, lt.select_points(source, layers, 10), lambda ms, spec, d: ms * math.exp(1.0 * d))
    fit = lt.fit_transfer(source, measured, feature_sets=None, alphas=lt.ALPHAS, choose="holdout")
    assert fit.name != "ratio" and fit.candidates["ratio/0"] > 5 * fit.holdout["mape_pct"]
    # with fewer measured layers than its columns need, the default falls back to a smaller set
    few = lt.fit_transfer(source, _measured(source, lt.select_points(source, layers, 3), _transform))
    assert few.name == "affine" and few.holdout["layers"] == 3  # one column: 3 layers allow it
    one = lt.fit_transfer(source, _measured(source, lt.select_points(source, layers, 1), _transform))
    assert one.name == "ratio" and math.isnan(one.holdout["mape_pct"])


# ----------------------------------------------------------------------------------------------- the table
def test_predicted_table_loads_and_answers_for_every_new_layer(tmp_path):
    source, layers = _source_table(), _new_layers()
    source.models["net"] = {"layers": [[l.name, lt.source_profile(source, l.spec).key] for l in layers]}
    source.rest_ms["net"] = 0.5
    points = lt.select_points(source, layers, 10)
    measured = _measured(source, points, _transform, noise=0.02)
    fit = lt.fit_transfer(source, measured)
    table = lt.transfer_table(source, layers, NEW, measured, fit, device_key="new-dev", model_name="net",
                              points=points)
    table.save(str(tmp_path / "new.json"))
    loaded = LatencyTable.load(str(tmp_path / "new.json"))
    loaded.check_compatible(NEW, tvm.__version__)
    assert loaded.target_family == "x86-avx2" and loaded.settings["group_widths"] == [8]
    assert loaded.settings["transferred_from"]["target_family"] == "x86-avx512"
    assert len(loaded.settings["transfer"]["points"]) == 10 and set(loaded.settings["transfer"]["measured"]) == \
        set(measured)
    for layer in layers:
        p = loaded.profile_for(layer.spec, layer.vector_width)  # no LayerNotProfiledError
        assert p.key.endswith("_v8") and p.sparsities == GRID and p.latency(0.5) > 0
    for key, m in measured.items():  # the measured points are in the table as measured
        p = loaded.layers[key]
        assert p.dense_ms == pytest.approx(m.dense_ms)
        for s, ms in zip(m.sparsities, m.sparse_ms):
            assert p.sparse_latency(s) == pytest.approx(ms)
    # the rest of the model scales with the model's dense conv time; the model predicts as a whole
    src_convs = sum(lt.source_profile(source, l.spec).dense_ms for l in layers)
    new_convs = sum(loaded.layers[l.key].dense_ms for l in layers)
    assert loaded.rest_ms["net"] == pytest.approx(0.5 * new_convs / src_convs)
    total, breakdown = loaded.predict([(l.name, l.spec, 8, 0.5) for l in layers], "net")
    assert total == pytest.approx(sum(breakdown.values()))
    # against itself: no error; against a table 10 % slower: -9.1 % everywhere
    assert lt.compare_tables(loaded, loaded)["all"]["max_err_pct"] == pytest.approx(0.0, abs=1e-9)
    slower = LatencyTable.load(str(tmp_path / "new.json"))
    for p in slower.layers.values():
        p.sparse_ms, p.dense_ms = [1.1 * ms for ms in p.sparse_ms], 1.1 * p.dense_ms
    found = lt.compare_tables(loaded, slower)
    assert found["all"]["n"] == len(layers) * len(GRID) and found["all"]["mean_err_pct"] == pytest.approx(-100 / 11)
    assert lt.compare_tables(loaded, slower, exclude_measured=True)["all"]["layers"] == len(layers) - len(measured)


# ----------------------------------------------------------------------------------------------- real run
@pytest.mark.skipif(not all(f in open("/proc/cpuinfo").read() for f in HOST_FEATURES["x86-avx512"]),
                    reason="needs an AVX-512 host (the source table is measured here)")
def test_real_avx512_to_avx2_transfer_with_the_tool(tmp_path):
    """small_cnn: an AVX-512 table and an AVX2 reference profiled here, then the tool measures 2 points on AVX2,
    writes the predicted table and reports its error against the reference."""
    from alcs_tvm import zoo
    from alcs_tvm.compiler import model_layers
    from alcs_tvm.profiler import profile_model

    model = zoo.export_onnx(zoo.get_model("small_cnn"), tmp_path / "small_cnn.onnx", (1, 1, 28, 28))
    # warm weights: no whole-model calibration builds, which the transfer does not use
    kw = dict(local=True, sparsities=[0.0, 0.5, 0.9], repeat=3, min_repeat_ms=1, max_masks=1, quiet=True,
              cold_weights=False)
    profile_model(model, str(tmp_path / "avx512.json"), "x86-avx512", **kw)
    profile_model(model, str(tmp_path / "avx2.json"), "x86-avx2", **kw)
    out = tmp_path / "pred.json"
    args = ["--source", tmp_path / "avx512.json", "--model", model, "--target", "x86-avx2", "--measure", "2",
            "--local", "--reference", tmp_path / "avx2.json", "-o", out, "--json", tmp_path / "summary.json"]
    r = subprocess.run([sys.executable, str(REPO / "tools" / "transfer_latency.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "measuring 2 points on 2 layers" in r.stdout and "against" in r.stdout
    table = LatencyTable.load(str(out))
    table.check_compatible(resolve_target("x86-avx2"), tvm.__version__)
    layers = model_layers(model, "x86-avx2")
    for layer in layers:
        p = table.profile_for(layer.spec, layer.vector_width)
        assert layer.vector_width == 8 and p.sparsities == [0.0, 0.5, 0.9] and min(p.sparse_ms) > 0
    assert len(table.settings["transfer"]["measured"]) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    found = summary["comparison"]["all"]
    assert found["n"] == 3 * len({l.key for l in layers})  # 2 sparse points + dense per layer
    # the error's size is the benchmark's business (docs/latency_transfer.md): timings here share the host
    assert math.isfinite(found["mape_pct"]) and math.isfinite(found["max_err_pct"])
    total, breakdown = table.predict(str(model))
    assert total > 0 and "(rest of model)" in breakdown
