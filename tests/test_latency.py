"""Latency tables: the piece-wise linear model, persistence and its errors, ``alcs profile`` over RPC (x86 local
server; one flow check on the emulated ARM64 device), resuming an interrupted profile, prediction on ONNX."""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tvm
from helpers import REPO, requires_avx512, run_cli

from alcs_tvm import frontend, zoo
from alcs_tvm.latency import (LatencyTable, LayerNotProfiledError, LayerProfile, TableMismatchError, cache_exposure,
                               mix_cache_states)
from alcs_tvm.layer import Conv2dSpec, layer_key
from alcs_tvm.profiler import MAX_COLD_FRACTION
from alcs_tvm.target import resolve_target
from alcs_tvm.winograd import winograd_applies

SPEC = Conv2dSpec.create((1, 32, 14, 14), (64, 32, 3, 3), 1, 1)
GRID = [0.0, 0.5, 0.9]


def _profile(dense=1.0, vector_width=16):
    return LayerProfile(SPEC, vector_width, [0.0, 0.25, 0.5, 0.9], [2.0, 1.6, 1.0, 0.3], [0.01] * 4, dense, 0.01)


def _table(info=None, **kw):
    info = info or resolve_target("x86-avx512")
    table = LatencyTable(json.loads(info.key), info.family, "x86-local", tvm.__version__, {"sparsities": GRID}, **kw)
    p = _profile()
    table.layers[p.key] = p
    return table


# ----------------------------------------------------------------------------------------------- the model
def test_interpolation_exact_at_grid_points_and_linear_between():
    p = _profile(dense=None)
    for s, ms in zip(p.sparsities, p.sparse_ms):
        assert p.sparse_latency(s) == pytest.approx(ms, abs=1e-12)
    for (s0, m0), (s1, m1) in zip(zip(p.sparsities, p.sparse_ms), zip(p.sparsities[1:], p.sparse_ms[1:])):
        for t in (0.1, 0.37, 0.5, 0.93):
            assert p.sparse_latency(s0 + t * (s1 - s0)) == pytest.approx(m0 + t * (m1 - m0), rel=1e-9)
    assert p.sparse_latency(0.99) == pytest.approx(0.3)  # clamped beyond the grid
    with pytest.raises(ValueError):
        p.sparse_latency(1.5)


def test_latency_is_min_of_dense_and_sparse_like_the_compiler_choice():
    p = _profile(dense=1.2)
    assert p.latency(0.0) == 1.2 and p.latency(0.9) == pytest.approx(0.3)
    table = _table()
    decision, predicted, _ = table.choose(SPEC, 1.0, 16)  # density 1 -> sparsity 0: sparse 2.0 > dense 1.0
    assert decision == "dense" and predicted == {"sparse": 2.0, "dense": 1.0}
    decision, predicted, _ = table.choose(SPEC, 0.1, 16)
    assert decision == "sparse" and predicted["sparse"] == pytest.approx(0.3)
    total, breakdown = table.predict([("a", SPEC, 16, 0.0), ("b", SPEC, 16, 0.5)])
    assert total == pytest.approx(2.0) and breakdown == {"a": 1.0, "b": 1.0}


def test_winograd_is_an_option_when_measured_and_the_pass_runs_it(tmp_path):
    """A layer whose Winograd time beats both direct ones is chosen as Winograd, predicted at that time, saved
    and loaded with the table, and the compiler runs it so; a table without the measurement loads as before."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from alcs_tvm import compiler
    w = np.random.default_rng(0).standard_normal(SPEC.weight_shape).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3],
                                                pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SPEC.input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(SPEC.output_shape))],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    (layer,) = compiler.model_layers(model, "x86")
    v = layer.vector_width  # the width this host's compiler looks the conv up at
    p = _profile(dense=1.2, vector_width=v)
    p.winograd_tile, p.winograd_ms = 4, 0.5
    assert p.latency(0.0) == 0.5 and p.latency(0.9) == pytest.approx(0.3)
    table = _table(resolve_target("x86"))  # this host's: the compiler checks the table's target
    table.layers[p.key] = p
    decision, predicted, reason = table.choose(SPEC, 1.0, v)
    assert decision == "winograd4" and predicted == {"sparse": 2.0, "dense": 1.2, "winograd4": 0.5}
    assert reason.startswith("table: winograd4 0.500 ms <=")
    assert table.choose(SPEC, 0.1, v)[0] == "sparse"
    table.save(str(tmp_path / "t.json"))
    loaded = LatencyTable.load(str(tmp_path / "t.json"))
    assert loaded.layers[p.key].winograd_tile == 4 and loaded.layers[p.key].winograd_ms == 0.5

    _, report = compiler.compile(model, "x86", latency_table=loaded)
    (row,) = report.layers
    assert row.algorithm == "winograd4" and row.reason.startswith("table: winograd4"), row
    _, report = compiler.compile(model, "x86", latency_table=loaded, winograd="off")
    assert report.layers[0].algorithm == "direct" and report.layers[0].decision == "dense"


def test_profiling_measures_a_3x3_stride1_conv_as_winograd_too():
    from alcs_tvm.compiler import ModelLayer
    from alcs_tvm.layer import KernelLayout
    from alcs_tvm.profiler import Measurer, measure_layer

    info = resolve_target("x86")
    layer = ModelLayer("conv", SPEC, 16, 1.0, KernelLayout(bias=True, activation="relu"))
    p = measure_layer(layer, info, Measurer(info, local=True), GRID, repeat=3, min_repeat_ms=1, max_masks=1,
                      cold_fraction=0.5)
    assert p.winograd_tile in (2, 4) and 0 < p.winograd_warm_ms and 0 < p.winograd_cold_ms
    assert p.winograd_ms == pytest.approx(max(p.winograd_warm_ms + 0.5 * (p.winograd_cold_ms - p.winograd_warm_ms),
                                              min(p.winograd_warm_ms, p.winograd_cold_ms)))


def test_layer_not_in_table_is_a_clear_error():
    table = _table()
    other = Conv2dSpec.create((1, 32, 14, 14), (64, 32, 1, 1))
    with pytest.raises(LayerNotProfiledError, match=r"1x1 32->64 .*not in the latency table"):
        table.layer_latency(other, 16, 0.5)
    with pytest.raises(ValueError, match="not in the latency table"):  # what the pass / CLI turn into one line
        table.choose(other, 0.5, 16)
    with pytest.raises(LayerNotProfiledError, match="rest of model"):
        table.predict([("a", SPEC, 16, 0.5)], rest_model="resnet18")


def test_save_load_roundtrip_and_corrupted_or_mismatched_tables(tmp_path):
    path = tmp_path / "t.json"
    table = _table(rest_ms={"m": 0.5}, models={"m": {"layers": [["conv0", layer_key(SPEC, 16)]], "rest_ms": 0.5}})
    table.save(str(path))
    loaded = LatencyTable.load(str(path))
    assert loaded.to_json() == table.to_json()
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temp file left
    # corrupted
    path.write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match="not valid JSON"):
        LatencyTable.load(str(path))
    data = table.to_json()
    data["layers"][layer_key(SPEC, 16)]["sparse_ms"] = [1.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupted"):
        LatencyTable.load(str(path))
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an alcs latency table"):
        LatencyTable.load(str(path))
    with pytest.raises(FileNotFoundError, match="no latency table"):
        LatencyTable.load(str(tmp_path / "missing.json"))
    # mismatched: other target, other TVM
    with pytest.raises(TableMismatchError, match="measured for target"):
        table.check_compatible(resolve_target("arm64"), tvm.__version__)
    with pytest.raises(TableMismatchError, match="measured with TVM"):
        table.check_compatible(resolve_target("x86-avx512"), "0.1.0")
    table.check_compatible(resolve_target("x86-avx512"), tvm.__version__)


# ----------------------------------------------------------------------------------------------- profiling
@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("latency-models")
    small = zoo.export_onnx(zoo.get_model("small_cnn"), d / "small_cnn.onnx", (1, 1, 28, 28))
    return {"small_cnn": small, "dir": d}


def _in_model_ms(table, model_name, layers_at) -> dict:
    """What a prediction gives each conv of ``layers_at`` (``(ModelLayer, sparsity)`` pairs, one configuration of the
    profiled model ``model_name``): the option the compiler picks, its warm and cold times mixed at the model's cache
    fraction times the exposure of the configuration's weight footprint; the table's values with no cache size."""
    entry = table.models[model_name]
    picked = [(layer, table.layers[layer.key].fastest(s), s) for layer, s in layers_at]
    if not entry.get("cache_bytes"):  # one state for every configuration: the table's values are it
        return {layer.name: table.layers[layer.key].latency(s) for layer, s in layers_at}
    footprint = table.footprint([(layer.key, o, s) for layer, o, s in picked], entry["rest_weight_bytes"])
    state = entry["cold_fraction"] * cache_exposure(footprint, entry["cache_bytes"])
    return {layer.name: mix_cache_states(*table.layers[layer.key].cache_states(o, s), state) for layer, o, s in picked}


@pytest.mark.device
def test_profile_predict_and_compile_decisions_x86(rpc_devices, onnx_models, tmp_path):
    from alcs_tvm import compiler
    from alcs_tvm.compiler import model_layers
    from alcs_tvm.profiler import CALIBRATION_SPARSITIES, calibrate_cold_fraction, layer_options, profile_model

    out = tmp_path / "x86.json"
    measured = []
    table = profile_model(onnx_models["small_cnn"], str(out), "x86", tracker=rpc_devices.tracker,
                          key=rpc_devices.x86_key, sparsities=GRID, repeat=3, min_repeat_ms=1, max_masks=1,
                          quiet=True, on_measured=measured.append)
    layers = model_layers(onnx_models["small_cnn"], "x86")
    assert measured == list(dict.fromkeys(l.key for l in layers)) + ["(rest of model)"]
    loaded = LatencyTable.load(str(out))
    assert loaded.to_json() == table.to_json()
    assert loaded.device_key == rpc_devices.x86_key and loaded.settings["sparsities"] == GRID
    for p in loaded.layers.values():
        assert p.sparsities == GRID and len(p.sparse_ms) == 3 and all(ms > 0 for ms in p.sparse_ms)
        assert p.sparse_ms[0] == p.dense_ms and p.dense_ms > 0
        # a conv that can run as Winograd also has its dense weight measured so, with the faster tile
        winograd = winograd_applies(p.spec, p.vector_width) is None
        assert (p.winograd_tile in (2, 4) and p.winograd_ms > 0) if winograd else p.winograd_ms is None
    assert "small_cnn" in loaded.rest_ms
    # predict on the ONNX file: per-layer breakdown + rest; named sparsities override the weights' own
    total, breakdown = loaded.predict(onnx_models["small_cnn"])
    assert set(breakdown) == {l.name for l in layers} | {"(rest of model)"}
    assert total == pytest.approx(sum(breakdown.values()))
    # unpruned weights: each layer at what the compiler runs dense (the faster of the direct kernel and Winograd)
    dense_total = sum(min(loaded.layers[l.key].dense_ms, loaded.layers[l.key].winograd_ms or float("inf"))
                      for l in layers) + loaded.rest_ms["small_cnn"]
    assert total == pytest.approx(dense_total)
    # the cache-state calibration measured the unpruned model as the table-driven compiler builds it (Winograd
    # where the table says so), so where the final table picks as that build ran, its prediction is that time
    entry = loaded.models["small_cnn"]
    assert [c["sparsity"] for c in entry["calibration"]] == [0.0, *CALIBRATION_SPARSITIES]
    assert entry["calibration"][0]["run"] == entry["dense_run"] and all(c["run"] for c in entry["calibration"])
    # the stored points and runs give back the table's fit
    fraction, rest, cache = calibrate_cold_fraction(loaded, [c["run"] for c in entry["calibration"]],
                                                    [c["whole_ms"] for c in entry["calibration"]],
                                                    entry["rest_weight_bytes"])
    assert fraction == pytest.approx(entry["cold_fraction"]) and rest == pytest.approx(entry["rest_fit_ms"])
    assert cache == pytest.approx(entry["cache_bytes"])
    # the rest's weights: the classifier's (small_cnn's only non-conv weights) and every bias
    assert entry["rest_weight_bytes"] > 0
    _, unpruned = compiler.compile(onnx_models["small_cnn"], "x86", latency_table=loaded)
    if [list(o) for o in layer_options(unpruned)] == entry["dense_run"]:
        assert total == pytest.approx(entry["convs_dense_ms"] + entry["rest_ms"])
    sparse_total, sparse_breakdown = loaded.predict(onnx_models["small_cnn"], {l.name: 0.9 for l in layers})
    expected = _in_model_ms(loaded, "small_cnn", [(l, 0.9) for l in layers])
    assert {name: sparse_breakdown[name] for name in expected} == pytest.approx(expected)
    assert sparse_total == pytest.approx(sum(sparse_breakdown.values()))
    with pytest.raises(ValueError, match="no rewritable conv"):
        loaded.predict(onnx_models["small_cnn"], {"nope": 0.5})
    # the same table drives the compiler's decisions
    _, report = compiler.compile(onnx_models["small_cnn"], "x86", latency_table=loaded)
    convs = [d for d in report.layers if d.op == "conv2d"]
    assert convs and all(d.predicted_ms and "table" in d.reason for d in convs)
    # rerun: everything is in the table, nothing measured
    again = []
    profile_model(onnx_models["small_cnn"], str(out), "x86", tracker=rpc_devices.tracker, key=rpc_devices.x86_key,
                  sparsities=GRID, repeat=3, min_repeat_ms=1, max_masks=1, quiet=True, on_measured=again.append)
    assert again == []
    # a resumed table must match the grid and the device
    r = run_cli("profile", onnx_models["small_cnn"], "-o", out, "--rpc-tracker", rpc_devices.tracker,
                "--rpc-key", rpc_devices.x86_key, "--sparsities", "0,0.3", timeout=120)
    assert r.returncode == 2 and "sparsities" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.device
def test_profile_resumes_after_kill(rpc_devices, onnx_models, tmp_path):
    """Kill ``alcs profile`` after its first saved layer; the rerun measures only the layers not in the table."""
    from alcs_tvm.compiler import model_layers
    from alcs_tvm.profiler import profile_model

    out = tmp_path / "resume.json"
    model = onnx_models["small_cnn"]
    args = [sys.executable, "-m", "alcs_tvm.cli", "profile", model, "-o", str(out), "--rpc-tracker",
            rpc_devices.tracker, "--rpc-key", rpc_devices.x86_key, "--sparsities", "0,0.9", "--repeat", "3",
            "--min-repeat-ms", "1", "--masks", "1", "--quiet"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    distinct = list(dict.fromkeys(l.key for l in model_layers(model, "x86")))
    assert len(distinct) >= 3
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(json.loads(out.read_text())["layers"]) >= 1:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    partial = LatencyTable.load(str(out))  # atomic saves: never torn
    before = set(partial.layers)
    assert 1 <= len(before) < len(distinct), "the profile was not interrupted mid-way"
    measured = []
    table = profile_model(model, str(out), "x86", tracker=rpc_devices.tracker, key=rpc_devices.x86_key,
                          sparsities=[0.0, 0.9], repeat=3, min_repeat_ms=1, max_masks=1, quiet=True,
                          on_measured=measured.append)
    layer_keys = [k for k in measured if k != "(rest of model)"]
    assert not set(layer_keys) & before, "a layer was measured twice"
    assert len(layer_keys) == len(set(layer_keys))
    assert set(table.layers) == set(distinct) == before | set(layer_keys)
    for k in before:  # the measurements from before the kill are kept as they were (the calibrated mix of
        # the two cache states is applied to every layer once the whole model has been measured)
        raw = ("warm_ms", "cold_ms", "dense_warm_ms", "dense_cold_ms", "sparse_spread_ms")
        assert {f: getattr(table.layers[k], f) for f in raw} == {f: getattr(partial.layers[k], f) for f in raw}
    assert 0.0 <= table.models["small_cnn"]["cold_fraction"] <= MAX_COLD_FRACTION
    assert "small_cnn" in table.rest_ms


@pytest.mark.device
def test_profile_flow_on_emulated_arm64(rpc_devices, onnx_models, tmp_path):
    from alcs_tvm.profiler import profile_model

    out = tmp_path / "arm64.json"
    table = profile_model(onnx_models["small_cnn"], str(out), "arm64", tracker=rpc_devices.tracker,
                          key=rpc_devices.arm64_key, sparsities=[0.0, 0.9], repeat=3, min_repeat_ms=0,
                          max_masks=1, quiet=True)
    loaded = LatencyTable.load(str(out))
    assert loaded.target_family == "arm64" and loaded.device_key == rpc_devices.arm64_key
    widths = set(resolve_target("arm64").group_widths())  # 8 where Cout allows, else 4
    assert all(p.vector_width in widths and p.dense_ms > 0 and p.sparse_ms[1] > 0 for p in loaded.layers.values())
    total, breakdown = loaded.predict(onnx_models["small_cnn"])
    assert total > 0 and "(rest of model)" in breakdown
    with pytest.raises(TableMismatchError, match="measured for target"):
        loaded.check_compatible(resolve_target("x86-avx512"), tvm.__version__)
    assert table.to_json() == loaded.to_json()


# ----------------------------------------------------------------------------------------------- estimates
@pytest.mark.device
def test_regressor_estimates_missing_layers_with_reported_error(rpc_devices, onnx_models, tmp_path):
    """Layers not in the table: an error by default; with ``estimate_missing`` an XGBoost estimate trained on the
    measured points (held-out error reported), which the compiler uses and the report marks."""
    from alcs_tvm import compiler
    from alcs_tvm.latency_regressor import LatencyRegressor
    from alcs_tvm.profiler import profile_model

    tiny = zoo.export_onnx(zoo.get_model("resnet_tiny"), onnx_models["dir"] / "resnet_tiny.onnx", (1, 3, 32, 32))
    table = profile_model(tiny, str(tmp_path / "tiny.json"), "x86", tracker=rpc_devices.tracker,
                          key=rpc_devices.x86_key, sparsities=[0.0, 0.3, 0.6, 0.9], repeat=3, min_repeat_ms=1,
                          max_masks=1, quiet=True, measure_rest=False)
    assert len(table.layers) >= 5
    key, left_out = sorted(table.layers.items())[len(table.layers) // 2]
    partial = LatencyTable.load(str(tmp_path / "tiny.json"))
    del partial.layers[key]
    with pytest.raises(LayerNotProfiledError, match="--estimate-missing"):
        partial.layer_latency(left_out.spec, 16, 0.5)
    with pytest.raises(LayerNotProfiledError, match="not in the latency table"):  # not TVM's RuntimeError
        compiler.compile(tiny, "x86", latency_table=partial)
    partial.save(str(tmp_path / "partial.json"))
    r = run_cli("compile", tiny, "-o", tmp_path / "t.so", "--latency-table", tmp_path / "partial.json",
                timeout=300)
    assert r.returncode == 2 and "not in the latency table" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    regressor = LatencyRegressor.fit(partial)
    h = regressor.holdout
    assert h["layers"] >= 1 and h["points"] >= 4 and 0 <= h["mape_pct"] <= h["max_err_pct"]
    assert "held-out error" in regressor.describe()
    partial.estimate_missing(regressor)
    estimate = partial.profile_for(left_out.spec, 16)
    assert estimate.estimated and estimate.sparsities == table.settings["sparsities"]
    assert all(a >= b for a, b in zip(estimate.sparse_ms, estimate.sparse_ms[1:]))  # never rises with sparsity
    for s, measured in zip(left_out.sparsities, left_out.sparse_ms):  # an estimate, not a guess
        assert 0.25 < estimate.sparse_latency(s) / measured < 4.0
    _, report = compiler.compile(tiny, "x86", latency_table=partial)
    reasons = {d.name: d.reason for d in report.layers if d.op == "conv2d"}
    assert any(r.startswith("estimate") for r in reasons.values())
    assert any(r.startswith("table") for r in reasons.values())
    other = LatencyTable({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "arm64", "x", tvm.__version__)
    with pytest.raises(TableMismatchError, match="target"):
        other.estimate_missing(regressor)


@pytest.mark.device
def test_resumed_table_remeasures_rest_for_another_architecture(rpc_devices, onnx_models, tmp_path):
    """The same model name with another input size (other layers) in a resumed table: its rest is measured anew,
    never taken from the other architecture."""
    from alcs_tvm.profiler import profile_model

    out = tmp_path / "two.json"
    digits = zoo.export_onnx(zoo.get_model("small_cnn"), onnx_models["dir"] / "small_cnn_8x8.onnx", (1, 1, 8, 8))
    kw = dict(tracker=rpc_devices.tracker, key=rpc_devices.x86_key, sparsities=[0.0, 0.9], repeat=3,
              min_repeat_ms=1, max_masks=1, quiet=True, model_name="small_cnn")
    profile_model(onnx_models["small_cnn"], str(out), "x86", **kw)
    measured = []
    table = profile_model(digits, str(out), "x86", on_measured=measured.append, **kw)
    assert "(rest of model)" in measured
    keys = [k for _, k in table.models["small_cnn"]["layers"]]
    assert len(keys) == 3 and all("_h8_w8_" in k or "_h4_w4_" in k for k in keys)
    total, breakdown = table.predict(digits)
    assert breakdown["(rest of model)"] == table.rest_ms["small_cnn"] and total > 0


@requires_avx512  # profiles x86-avx512 code on this host's x86 server
def test_a_conv_run_wider_dense_than_pruned_is_profiled_at_both_widths(rpc_devices, tmp_path):
    """A conv classifier of 500 classes runs 32 lanes wide dense (its last block partial) and 16 wide once pruned in
    16-wide groups: the table answers for both, so a pruned copy is predicted (its rest found by architecture) and
    compiled by the table, and the pruner finds the rest with its own group widths."""
    import torch.nn as nn

    from alcs_tvm import compiler
    from alcs_tvm.compiler import model_layers
    from alcs_tvm.profiler import profile_model, random_pruned_onnx

    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 500, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = zoo.export_onnx(net, tmp_path / "classifier.onnx", (1, 3, 8, 8))
    info = resolve_target("x86-avx512")
    [_, classifier] = model_layers(path, info)
    assert classifier.vector_width == 32 and info.group_width(500) == 16
    table = profile_model(path, str(tmp_path / "t.json"), info, tracker=rpc_devices.tracker, key=rpc_devices.x86_key,
                          sparsities=[0.0, 0.9], repeat=3, min_repeat_ms=1, max_masks=1, quiet=True)
    assert {layer_key(classifier.spec, 32), layer_key(classifier.spec, 16)} <= set(table.layers)
    pruned = random_pruned_onnx(frontend.load_onnx(path), info, {classifier.name: 0.5}, 0)
    [_, pruned_classifier] = model_layers(pruned, info)
    assert pruned_classifier.vector_width == 16
    total, breakdown = table.predict(pruned)
    [conv, _] = model_layers(pruned, info)
    expected = _in_model_ms(table, "classifier", [(conv, 1 - conv.density), (pruned_classifier, 0.5)])
    assert pruned_classifier.key == layer_key(classifier.spec, 16)
    assert breakdown[classifier.name] == pytest.approx(expected[classifier.name])
    assert breakdown["(rest of model)"] == table.rest_ms["classifier"]
    _, report = compiler.compile(pruned, info, latency_table=table)
    assert [d.vector_width for d in report.layers if d.name == classifier.name] == [16]
    assert table.rest_model_for([layer_key(l.spec, info.group_width(l.spec.out_channels))
                                 for l in model_layers(path, info)]) == "classifier"


def test_table_knows_its_group_widths():
    """A table records the group widths it was profiled with; one from before that has one width per table."""
    old = _table()  # layers at V=16, no group_widths in its settings
    assert old.target_info().group_widths() == (16,)
    new = _table()
    new.settings["group_widths"] = [32, 16]
    assert new.target_info().group_widths() == (32, 16)
    assert new.target_info().group_width(64) == 32


def _two_layer_calibration_case(fraction, rest):
    """Two layers' warm/cold curves, what four builds run (unpruned, every conv at 0.5, 0.8 and 0.95) and the
    whole-model times they give at ``fraction`` and ``rest``."""
    from types import SimpleNamespace

    grid = [0.0, 0.5, 0.8, 0.95]
    profiles = {
        "a": SimpleNamespace(sparsities=grid, warm_ms=[1.0, 0.5, 0.2, 0.05], cold_ms=[1.4, 0.7, 0.3, 0.1],
                             dense_warm_ms=1.0, dense_cold_ms=1.4),
        "b": SimpleNamespace(sparsities=grid, warm_ms=[2.0, 1.0, 0.4, 0.1], cold_ms=[2.2, 1.1, 0.45, 0.12],
                             dense_warm_ms=2.0, dense_cold_ms=2.2),
    }
    for p in profiles.values():
        p.cache_states = functools.partial(LayerProfile.cache_states, p)
    runs = [[("a", "dense", 0.0), ("b", "dense", 0.0)]] + [[("a", "sparse", s), ("b", "sparse", s)] for s in grid[1:]]

    def whole(i):
        return rest + sum(p.warm_ms[i] + fraction * (p.cold_ms[i] - p.warm_ms[i]) for p in profiles.values())

    return SimpleNamespace(layers=profiles), runs, [whole(i) for i in range(len(grid))]


def test_cold_fraction_calibration_fits_the_points_then_bounded_by_a_non_negative_rest():
    from alcs_tvm.profiler import calibrate_cold_fraction

    # consistent points are reproduced exactly, whatever the fraction (3 > the old cap of 2)
    table, runs, wholes = _two_layer_calibration_case(3.0, 0.5)
    fraction, rest, _ = calibrate_cold_fraction(table, runs, wholes)
    assert fraction == pytest.approx(3.0) and rest == pytest.approx(0.5)
    # one point off by 10 %: a least-squares fit moves less than the exact fit through that point and the unpruned
    # one, which is what calibrating on two points did
    table, runs, wholes = _two_layer_calibration_case(1.0, 0.5)
    noisy = list(wholes)
    noisy[2] *= 1.1
    fraction, rest, _ = calibrate_cold_fraction(table, runs, noisy)
    two_point, _, _ = calibrate_cold_fraction(table, runs[:1] + runs[2:3], noisy[:1] + noisy[2:3])
    assert abs(fraction - 1.0) < abs(two_point - 1.0)
    # measurements that would need a negative rest: the rest is 0 and the fraction fits alone
    table, runs, wholes = _two_layer_calibration_case(3.0, -0.05)
    fraction, rest, _ = calibrate_cold_fraction(table, runs, wholes)
    assert rest == 0.0 and 0.0 < fraction < 3.0
    # and never above the sanity cap
    table, runs, wholes = _two_layer_calibration_case(MAX_COLD_FRACTION + 3, 5.0)
    fraction, rest, _ = calibrate_cold_fraction(table, runs, wholes)
    assert fraction == MAX_COLD_FRACTION and rest > 0


def _in_state(table, run, fraction, rest):
    """``rest`` plus each conv of ``run`` with its warm and cold times mixed at ``fraction``."""
    return rest + sum(mix_cache_states(*table.layers[k].cache_states(o, s), fraction) for k, o, s in run)


def test_a_model_whose_pruned_weights_fit_in_cache_pays_no_cache_gap_once_pruned():
    """MTCNN O-Net's case: a model of 2.2 MB of weights unpruned and 1.3 MB pruned finds them in the caches once
    pruned. From whole-model times made with a cache of C bytes the calibration finds C (within its grid's step)
    and the fraction; a prediction mixes each configuration's cache state by its own footprint; an older table (no
    cache size) is the one fraction's model."""
    from alcs_tvm.profiler import CACHE_SIZE_GRID, calibrate_cold_fraction

    grid = [0.0, 0.5, 0.8, 0.95]
    table = _table()
    table.layers.clear()
    specs = [Conv2dSpec.create((1, 64, 10, 10), (64, 64, 3, 3), 1, 1),
             Conv2dSpec.create((1, 128, 6, 6), (128, 128, 3, 3), 1, 1)]
    for spec, ms in zip(specs, (0.02, 0.06)):
        warm = [ms * (1 - s) + 0.002 for s in grid]
        cold = [w + 3 * ms * (1 - s) for w, s in zip(warm, grid)]
        profile = LayerProfile(spec, 16, grid, list(warm), [0.0] * 4, warm[0], 0.0, warm, cold, warm[0], cold[0])
        table.layers[profile.key] = profile
    keys = list(table.layers)
    rest_bytes, fraction, rest = 1.2e6, 0.8, 0.03
    runs = [[(k, "dense" if s == 0 else "sparse", s) for k in keys] for s in grid]
    cache = table.footprint(runs[1], rest_bytes)  # the 50 % copy just fits

    def whole(run, a, c, r):
        return _in_state(table, run, a * cache_exposure(table.footprint(run, rest_bytes), c), r)

    wholes = [whole(run, fraction, cache, rest) for run in runs]
    a, r, c = calibrate_cold_fraction(table, runs, wholes, rest_bytes)
    assert abs(c - cache) <= table.footprint(runs[0], rest_bytes) / (len(CACHE_SIZE_GRID) - 1)
    fitted = [whole(run, a, c, r) for run in runs]
    assert fitted == pytest.approx(wholes, rel=0.02)
    # one fraction for every configuration fits them worse
    one_a, one_r, no_cache = calibrate_cold_fraction(table, runs, wholes)
    one = [_in_state(table, run, one_a, one_r) for run in runs]
    assert no_cache == 0.0
    assert max(abs(p / w - 1) for p, w in zip(one, wholes)) > 2 * max(abs(p / w - 1) for p, w in zip(fitted, wholes))

    table.rest_ms["m"] = r
    table.models["m"] = {"layers": [["c0", keys[0]], ["c1", keys[1]]], "cold_fraction": a, "cache_bytes": c,
                         "rest_weight_bytes": rest_bytes}
    for p in table.layers.values():  # the table's own values: the unpruned model's cache state
        p.mix_cache_states(a * cache_exposure(table.footprint(runs[0], rest_bytes), c))
    for i, s in enumerate(grid):
        total, breakdown = table.predict([("c0", specs[0], 16, s), ("c1", specs[1], 16, s)], "m")
        assert total == pytest.approx(fitted[i]) and set(breakdown) == {"c0", "c1", "(rest of model)"}
    # pruned, the model pays less than the unpruned state's values say; an older table sums those values
    del table.models["m"]["cache_bytes"]
    pruned = [("c0", specs[0], 16, 0.8), ("c1", specs[1], 16, 0.8)]
    old_total, _ = table.predict(pruned, "m")
    assert old_total == pytest.approx(r + sum(table.layers[k].latency(0.8) for k in keys))
    assert old_total > fitted[2] * 1.05
