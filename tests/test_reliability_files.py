"""The files that hold measurements - latency tables and tuning records - and the commands that write and read
them, under concurrent runs, bad input, interruption and dynamic-batch models.

Every case runs the real thing: ``alcs`` processes (``python -m alcs_tvm.cli``) on small ONNX models, measured on
this host (``--local``), real table files. Tables that must hold particular numbers (inflated layers, a rest for
another architecture, another target) are written as files the way ``alcs profile`` writes them, with the layer
keys of the real model."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import helpers
import onnx
import pytest
import torch
import tvm

from alcs_tvm import zoo
from alcs_tvm.compiler import model_layers
from alcs_tvm.files import TableMismatchError
from alcs_tvm.latency import LatencyTable, LayerProfile
from alcs_tvm.target import resolve_target
from alcs_tvm.tuning_records import TuningRecords

REPO = Path(__file__).resolve().parents[1]
GRID = [0.0, 0.9]
FAST_PROFILE = ["--local", "--sparsities", "0,0.9", "--repeat", "3", "--min-repeat-ms", "1", "--masks", "1",
                "--quiet"]
FAST_TUNE = ["--local", "--repeat", "3", "--min-repeat-ms", "1", "--candidates", "2", "--quiet"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _command(*args):
    return [sys.executable, "-m", "alcs_tvm.cli", *map(str, args)]


def _cli(*args, timeout=600, **kw):
    return subprocess.run(_command(*args), capture_output=True, text=True, cwd=REPO, env=_env(), timeout=timeout,
                          **kw)


def _one_line_error(result, command, *needles):
    """``result`` failed the way a user error must: exit 2, one line ``alcs COMMAND: error: ...`` naming
    ``needles``, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f"alcs {command}: error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Small ONNX models at 8x8: ``small_a`` (1 input channel, what ``alcs prune --model small_cnn --data digits``
    builds), ``small_b`` (3 channels: its first conv differs, the other two are the same layers), ``small_b_renamed``
    (small_b with other node names: its tuning records do not collide with small_a's), ``dyn`` (small_a with a
    dynamic batch dimension, as most exported models have)."""
    d = tmp_path_factory.mktemp("models")
    a = zoo.export_onnx(zoo.get_model("small_cnn", in_channels=1), d / "small_a.onnx", (1, 1, 8, 8))
    b = zoo.export_onnx(zoo.get_model("small_cnn", in_channels=3), d / "small_b.onnx", (1, 3, 8, 8))
    renamed = onnx.load(b)
    for node in renamed.graph.node:
        node.name = "b" + node.name
    onnx.save(renamed, str(d / "small_b_renamed.onnx"))
    dyn = d / "dyn.onnx"
    with torch.no_grad():
        torch.onnx.export(zoo.get_model("small_cnn").eval(), (torch.randn(1, 1, 8, 8),), str(dyn), input_names=["x"],
                          output_names=["y"], opset_version=zoo.ONNX_OPSET, dynamic_axes={"x": {0: "batch"}},
                          dynamo=False)
    return {"a": Path(a), "b": Path(b), "b_renamed": d / "small_b_renamed.onnx", "dyn": dyn, "dir": d}


@functools.lru_cache(maxsize=None)
def _model_layers(path, target="x86"):
    """The model's rewritable convs as the compiler sees them (imported once per model and target)."""
    return tuple(model_layers(str(path), resolve_target(target)))


def _layer_keys(path, target="x86"):
    return [layer.key for layer in _model_layers(path, target)]


def _table(onnx_path, *, target="x86", name="model", rest=0.05, dense=0.01, tvm_version=None, weights="calibrated",
           layers_of=None):
    """A table as ``alcs profile --local`` writes it for the model at ``onnx_path`` (its real layer keys), every
    conv ``dense`` ms dense, and ``rest`` ms for the rest of ``name`` (whose conv layers are ``layers_of``'s,
    default the same model's)."""
    info = resolve_target(target)
    layers = _model_layers(onnx_path, target)
    table = LatencyTable(json.loads(info.key), info.family, "local", tvm_version or tvm.__version__,
                         {"sparsities": GRID, "group_widths": list(info.group_widths()), "weights": weights})
    for layer in layers:
        curve = [dense, 0.3 * dense]
        table.layers[layer.key] = LayerProfile(layer.spec, layer.vector_width, list(GRID), list(curve), [0.0, 0.0],
                                               dense, 0.0, list(curve), list(curve), dense, dense)
    owner = layers if layers_of is None else _model_layers(layers_of, target)
    table.models[name] = {"layers": [[layer.name, layer.key] for layer in owner], "rest_ms": rest}
    table.rest_ms[name] = rest
    return table


def _write(table, path) -> str:
    Path(path).write_text(json.dumps(table.to_json(), indent=1))
    return str(path)


def _run_together(commands, timeout=900):
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


PRUNE_FAST = ["--data", "digits", "--budget-ms", "1", "--pretrain-epochs", "1", "--epochs", "1",
              "--finetune-epochs", "0", "--no-measure", "--batch-size", "256"]


def _prune(table_path, out, *extra, model="small_cnn"):
    return _cli("prune", "--model", model, "--latency-table", table_path, "-o", out / "p.onnx", *PRUNE_FAST, *extra)


def _predicted_dense(stdout) -> float:
    line = next(l for l in stdout.splitlines() if l.startswith("predicted latency: dense"))
    return float(line.split("dense ")[1].split(" ms")[0])


def _corrupt(tmp_path, models, change, name="bad.json"):
    data = json.loads(json.dumps(_table(models["a"], name="small_a").to_json()))
    change(data, next(iter(data["layers"])))
    path = tmp_path / name
    path.write_text(json.dumps(data))  # Python's json writes NaN / Infinity tokens as they are
    return str(path)


def _records(tmp_path, change):
    info = resolve_target("x86")
    entry = {"key": "k", "layout": {}, "density": 0.5, "tuned_ms": 0.01, "default_ms": 0.02,
             "schedule": {"vector_width": 16, "tile_rows": 2, "tile_cols": 4, "row_outer": False},
             "default_schedule": {"vector_width": 16, "tile_rows": 2, "tile_cols": 4, "row_outer": False}}
    data = {"format": "alcs-tvm-tuning/1", "target": json.loads(info.key), "target_family": info.family,
            "device_key": "local", "tvm_version": tvm.__version__, "settings": {}, "layers": {"/conv1/Conv": entry}}
    change(data, entry)
    path = tmp_path / "records.json"
    path.write_text(json.dumps(data))
    return str(path)


# ------------------------------------------------------------------------ 1. concurrent runs lose nothing
def test_two_profiles_writing_one_table_keep_both_models(models, tmp_path):
    """Two ``alcs profile`` runs on two models (sharing two of their three conv layers) write one table at the same
    time: both exit 0 and the table holds every layer and the 'rest of model' of both."""
    table_path = tmp_path / "table.json"
    results = _run_together([_command("profile", models["a"], "-o", table_path, *FAST_PROFILE),
                             _command("profile", models["b"], "-o", table_path, *FAST_PROFILE)])
    for code, out, err in results:
        assert code == 0, err[-3000:]
    table = LatencyTable.load(str(table_path))
    assert set(table.rest_ms) == {"small_a", "small_b"}, table.rest_ms
    assert set(table.models) == {"small_a", "small_b"}
    assert set(_layer_keys(models["a"])) | set(_layer_keys(models["b"])) == set(table.layers)
    for name in ("small_a", "small_b"):  # each prediction finds its own rest
        total, breakdown = table.predict(str(models[name[-1]]))
        assert breakdown["(rest of model)"] == table.rest_ms[name] and total > 0


def test_two_tunes_writing_one_records_file_keep_both_models(models, tmp_path):
    out = tmp_path / "records.json"
    results = _run_together([_command("tune", models["a"], "-o", out, *FAST_TUNE),
                             _command("tune", models["b_renamed"], "-o", out, *FAST_TUNE)])
    for code, _, err in results:
        assert code == 0, err[-3000:]
    records = TuningRecords.load(str(out))
    expected = [layer.name for path in (models["a"], models["b_renamed"]) for layer in _model_layers(path)]
    assert sorted(records.layers) == sorted(expected)


def test_a_stale_copy_never_overwrites_what_another_run_saved_since(models, tmp_path):
    """Two handles on one table (two processes, in effect): each save adds its own changes to what is in the file
    by then; an entry the other run updated is not reverted to the copy this one loaded."""
    path = _write(_table(models["a"], name="small_a"), tmp_path / "t.json")
    first, second = LatencyTable.load(path), LatencyTable.load(path)
    second.rest_ms["small_a"] = 0.07  # re-measured by the second run
    second.models["small_a"]["rest_ms"] = 0.07
    second.save(path)
    extra = _table(models["b"], name="small_b")
    first.layers.update(extra.layers)  # the first run adds small_b
    first.rest_ms["small_b"], first.models["small_b"] = 0.04, extra.models["small_b"]
    first.save(path)
    merged = LatencyTable.load(path)
    assert merged.rest_ms == {"small_a": 0.07, "small_b": 0.04}
    assert set(merged.layers) == set(_layer_keys(models["a"])) | set(_layer_keys(models["b"]))
    # the saving handle now holds what the file holds
    assert first.to_json() == merged.to_json()


def test_save_into_a_table_for_another_target_keeps_the_measurements_aside(models, tmp_path):
    """A run that finds the file rewritten for another target (two first runs with different targets) must not mix
    the two, nor drop its own measurements."""
    path = str(tmp_path / "t.json")
    _table(models["a"], target="arm64", name="small_a").save(path)
    ours = _table(models["a"], name="small_a")
    with pytest.raises(TableMismatchError, match="another target") as err:
        ours.save(path)
    assert "\n" not in str(err.value)
    aside = [p for p in tmp_path.iterdir() if p.name != "t.json"]
    assert len(aside) == 1 and aside[0].name in str(err.value)
    assert LatencyTable.load(str(aside[0])).to_json() == ours.to_json()
    assert LatencyTable.load(path).target_family == "arm64"  # the other run's table is untouched


# ---------------------------------------------------------------------- 2./3. alcs prune and the table's rest
def test_prune_finds_the_rest_by_the_models_conv_layers(models, tmp_path):
    """README's sequence: ``alcs profile model.onnx`` names the entry 'model', ``alcs prune --model small_cnn``: the
    rest of the model with small_cnn's conv layers is added (3 convs x 0.01 + 0.05 ms), not silently dropped."""
    table = _write(_table(models["a"], name="model", rest=0.05, dense=0.01), tmp_path / "t.json")
    r = _prune(table, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _predicted_dense(r.stdout) == pytest.approx(0.08, abs=1e-4)


def test_prune_with_a_rest_model_not_in_the_table_is_one_line(models, tmp_path):
    table = _write(_table(models["a"], name="model"), tmp_path / "t.json")
    _one_line_error(_prune(table, tmp_path, "--rest-model", "smal_cnn"), "prune", "'smal_cnn'", "'model'")
    assert not (tmp_path / "p.onnx").exists()


def test_prune_without_a_rest_for_its_architecture_refuses_naming_what_the_table_holds(models, tmp_path):
    """The table has small_cnn's conv layers, but the only rest it holds is another architecture's."""
    table = _write(_table(models["a"], name="resnet_tiny", layers_of=models["b"]), tmp_path / "t.json")
    _one_line_error(_prune(table, tmp_path), "prune", "'resnet_tiny'", "--rest-model")


def test_prune_checks_the_tables_target_and_tvm_version(models, tmp_path):
    old_tvm = _write(_table(models["a"], tvm_version="0.1.0"), tmp_path / "old.json")
    _one_line_error(_prune(old_tvm, tmp_path), "prune", "TVM 0.1.0")
    avx2 = _write(_table(models["a"], target="x86-avx2"), tmp_path / "avx2.json")  # layers at V=8
    _one_line_error(_prune(avx2, tmp_path, "--vector-width", "8"), "prune", "measured for target")


# -------------------------------------------------------------------- 4. the rest of a model is never < 0
def test_profile_bounds_a_negative_rest_at_zero_and_says_so(models, tmp_path):
    """A table whose layers were measured on a busy host (30 ms each for a model that runs in well under 1 ms):
    the rest fitted from the whole model comes out negative; the table stores 0 and the summary says why."""
    path = _write(_table(models["a"], name="other", dense=30.0, weights="warm"), tmp_path / "t.json")
    r = _cli("profile", models["a"], "-o", path, *FAST_PROFILE, "--weights", "warm")
    assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(path)
    assert table.rest_ms["small_a"] == 0.0 and table.models["small_a"]["rest_ms"] == 0.0
    assert table.models["small_a"]["rest_fit_ms"] < -80  # what the fit wanted, kept for the record
    assert "rest of small_a 0.000 ms" in r.stdout and "bounded at 0" in r.stdout


# ------------------------------------------------------------------------------- 5. tables checked on load
@pytest.mark.parametrize("change,needles", [
    (lambda d, k: d["layers"][k].update(dense_ms=float("nan")), ["dense_ms", "nan"]),
    (lambda d, k: d["layers"][k].update(sparse_ms=[0.01, -0.002]), ["sparse_ms", "-0.002"]),
    (lambda d, k: d["layers"][k].update(dense_ms=-2.231), ["dense_ms", "-2.231"]),
    (lambda d, k: d["layers"][k].update(sparsities=[0.0, 1.5]), ["sparsities", "1.5"]),
    (lambda d, k: d["layers"][k].update(sparsities=[-0.1, 0.9]), ["sparsities", "-0.1"]),
    (lambda d, k: d["layers"][k].update(dense_ms="1.0"), ["dense_ms", "'1.0'"]),
    (lambda d, k: d["layers"][k].update(sparse_ms=["0.01", "0.003"]), ["sparse_ms", "'0.01'"]),
    (lambda d, k: d["layers"][k].update(warm_ms=[0.01, float("inf")]), ["warm_ms", "inf"]),
    (lambda d, k: d["layers"][k].update(vector_width="16"), ["vector_width"]),
    (lambda d, k: d["layers"][k]["spec"].update(stride="1x1"), ["stride"]),
    (lambda d, k: d["layers"][k].pop("spec"), ["spec"]),
])
def test_bad_layer_measurements_are_one_line_errors_naming_file_and_layer(models, tmp_path, change, needles):
    path = _corrupt(tmp_path, models, change)
    key = next(iter(json.loads(Path(path).read_text())["layers"]))
    with pytest.raises(ValueError) as err:
        LatencyTable.load(path)
    message = str(err.value)
    assert "\n" not in message and path in message and key in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("change,needles", [
    (lambda d, k: d.update(layers=[]), ["'layers'", "list"]),
    (lambda d, k: d.update(layers=None), ["'layers'", "null"]),
    (lambda d, k: d.update(rest_ms={"small_a": -0.015}), ["small_a", "-0.015"]),
    (lambda d, k: d.update(rest_ms={"small_a": float("nan")}), ["small_a", "nan"]),
    (lambda d, k: d.update(rest_ms={"small_a": "0.05"}), ["small_a", "'0.05'"]),
    (lambda d, k: d.update(rest_ms=[0.05]), ["'rest_ms'"]),
    (lambda d, k: d.update(models={"small_a": {"layers": "conv1"}}), ["small_a", "layers"]),
    (lambda d, k: d.update(target="x86"), ["'target'"]),
    (lambda d, k: d.update(settings=None), ["'settings'"]),
])
def test_bad_table_structure_is_a_one_line_error_naming_the_file(models, tmp_path, change, needles):
    path = _corrupt(tmp_path, models, change)
    with pytest.raises(ValueError) as err:
        LatencyTable.load(path)
    message = str(err.value)
    assert "\n" not in message and path in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_bad_tables_through_the_commands_are_one_line_errors(models, tmp_path):
    """A directory as the table, and a NaN latency, through ``alcs compile`` and ``alcs prune``."""
    folder = tmp_path / "folder.json"
    folder.mkdir()
    _one_line_error(_cli("compile", models["a"], "-o", tmp_path / "m.so", "--latency-table", folder), "compile",
                    str(folder), "directory")
    nan = _corrupt(tmp_path, models, lambda d, k: d["layers"][k].update(dense_ms=float("nan")))
    _one_line_error(_cli("compile", models["a"], "-o", tmp_path / "m.so", "--latency-table", nan), "compile",
                    nan, "dense_ms")
    _one_line_error(_prune(folder, tmp_path), "prune", str(folder), "directory")


@pytest.mark.parametrize("change,needles", [
    (lambda d, e: e.update(tuned_ms=float("nan")), ["/conv1/Conv", "tuned_ms", "nan"]),
    (lambda d, e: e.update(default_ms=-1.0), ["/conv1/Conv", "default_ms", "-1.0"]),
    (lambda d, e: e.update(tuned_ms="0.01"), ["/conv1/Conv", "tuned_ms", "'0.01'"]),
    (lambda d, e: e.update(density=2.0), ["/conv1/Conv", "density", "2.0"]),
    (lambda d, e: e["schedule"].update(tile_rows="x"), ["/conv1/Conv", "tile_rows", "'x'"]),
    (lambda d, e: e["schedule"].update(tile_cols=0), ["/conv1/Conv", "tile_cols", "0"]),
    (lambda d, e: e["schedule"].update(tile_cols=2.5), ["/conv1/Conv", "tile_cols", "2.5"]),
    (lambda d, e: e.update(layout="nchw"), ["/conv1/Conv", "layout"]),
    (lambda d, e: d.update(layers=[]), ["'layers'", "list"]),
    (lambda d, e: d.update(layers=None), ["'layers'", "null"]),
])
def test_bad_tuning_records_are_one_line_errors_naming_file_and_conv(tmp_path, change, needles):
    path = _records(tmp_path, change)
    with pytest.raises(ValueError) as err:
        TuningRecords.load(path)
    message = str(err.value)
    assert "\n" not in message and path in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    TuningRecords.load(_records(tmp_path, lambda d, e: None))  # the unchanged file loads
    with pytest.raises(ValueError, match="directory"):
        TuningRecords.load(str(tmp_path))


# ------------------------------------------------------------------------------ 6. --weights that do not fit
def test_wrong_weights_are_one_line_errors(models, tmp_path):
    from alcs_tvm.zoo import load_model

    text = tmp_path / "notes.txt"
    text.write_text("not a state dict\n")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    other = tmp_path / "resnet.pt"
    torch.save(zoo.get_model("resnet_tiny").state_dict(), other)
    wide = tmp_path / "wide.pt"
    torch.save(zoo.get_model("small_cnn", in_channels=3).state_dict(), wide)  # same names, another shape
    for path, needle in ((text, "not a PyTorch"), (tensor, "not a state dict"), (other, "missing"),
                         (wide, "conv1.weight")):
        with pytest.raises(ValueError) as err:
            load_model("small_cnn", 10, 1, str(path))
        assert "\n" not in str(err.value) and str(path) in str(err.value) and needle in str(err.value), str(err.value)
    good = tmp_path / "good.pt"
    torch.save(zoo.get_model("small_cnn").state_dict(), good)
    assert load_model("small_cnn", 10, 1, str(good)) is not None
    table = _write(_table(models["a"], name="model"), tmp_path / "t.json")
    _one_line_error(_prune(table, tmp_path, "--weights", other), "prune", str(other), "small_cnn")


# --------------------------------------------------------------------------- 7. Ctrl-C leaves nothing behind
def test_interrupted_prune_leaves_no_file_behind(models, tmp_path):
    table = _write(_table(models["a"], name="model"), tmp_path / "t.json")
    weights = tmp_path / "w.pt"
    torch.save(zoo.get_model("small_cnn").state_dict(), weights)
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    # importing ONNX Runtime leaves its own session-id file ('.ses') in TMPDIR: not ours to remove
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=_env(TMPDIR=str(tmp)), check=True, timeout=300)
    before = sorted(p.name for p in tmp.iterdir())
    proc = subprocess.Popen(_command("prune", "--model", "small_cnn", "--weights", weights, "--data", "digits",
                                     "--latency-table", table, "--budget-ms", "1", "-o", out / "p.onnx",
                                     "--epochs", "500"),
                            cwd=REPO, env=_env(PYTHONUNBUFFERED="1", TMPDIR=str(tmp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=helpers.default_sigint)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:  # the pruner's first line: the dense model is exported, ADMM starts
            if line.startswith("dense: test acc"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err[-3000:]
    assert sorted(p.name for p in out.iterdir()) == []
    assert sorted(p.name for p in tmp.iterdir()) == before


# -------------------------------------------------------------------- 8. files get the umask's permissions
def test_tables_and_records_get_the_mode_the_umask_gives(models, tmp_path):
    table = _table(models["a"])
    records = TuningRecords.load(_records(tmp_path, lambda d, e: None))
    for umask in (0o022, 0o002, 0o077):
        previous = os.umask(umask)
        try:
            for name, thing in (("table", table), ("records", records)):
                path = tmp_path / f"{name}-{umask:o}.json"
                thing.save(str(path))
                assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, (name, oct(umask))
        finally:
            os.umask(previous)
    # a file that exists keeps the mode its owner gave it
    path = tmp_path / "shared.json"
    table.save(str(path))
    path.chmod(0o664)
    previous = os.umask(0o077)
    try:
        table.save(str(path))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


# ------------------------------------------------------------------------------ 9. dynamic-batch ONNX files
def test_profile_of_a_dynamic_batch_model_with_input_shapes(models, tmp_path):
    path = tmp_path / "t.json"
    r = _cli("profile", models["dyn"], "-o", path, *FAST_PROFILE, "--input-shapes", "x:1x1x8x8")
    assert r.returncode == 0, r.stderr[-3000:]
    table = LatencyTable.load(str(path))
    assert "dyn" in table.rest_ms and set(table.layers) == set(_layer_keys(models["a"]))
    total, breakdown = table.predict(str(models["dyn"]), input_shapes={"x": (1, 1, 8, 8)})
    assert total > 0 and breakdown["(rest of model)"] == table.rest_ms["dyn"]


def test_tune_and_compile_of_a_dynamic_batch_model_with_input_shapes(models, tmp_path):
    out = tmp_path / "records.json"
    r = _cli("tune", models["dyn"], "-o", out, *FAST_TUNE, "--input-shapes", "x:1x1x8x8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(TuningRecords.load(str(out)).layers) == 3
    r = _cli("compile", models["dyn"], "-o", tmp_path / "m.so", "--tuning", out, "--input-shapes", "x:1x1x8x8")
    assert r.returncode == 0, r.stderr[-3000:]


def test_measure_latency_of_a_dynamic_batch_model(models):
    """What ``alcs prune`` and ``alcs flow`` time (``profiler.measure_latency``): the input shape given is the
    shape the model is compiled for."""
    from alcs_tvm.profiler import measure_latency

    ms, report = measure_latency(str(models["dyn"]), (1, 1, 8, 8), "x86", repeat=3)
    assert math.isfinite(ms) and ms > 0 and len([d for d in report.layers if d.op == "conv2d"]) == 3
