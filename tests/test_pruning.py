"""Latency-constrained SIMD pruning: mask structure, the projection, ADMM on digits, export -> compile, budgets."""
import copy
import math

import numpy as np
import pytest
import torch

from alcs_tvm import profiler, pruning, training, zoo
from alcs_tvm.latency import LatencyTable, LayerProfile
from alcs_tvm.sparse_format import block_mask

V = 16  # the masks and table below use AVX-512 width whatever the host is; measurements use the host's target


def _synthetic_table(layers, seed=0, rest=0.01):
    """Latency curves with the shapes measured tables have (plateau at dense, non-convex, noisy): for property
    tests of the projection only - the ADMM / export tests use a table measured on this host."""
    rng = np.random.default_rng(seed)
    profiles = {}
    for layer in layers:
        grid = [0.0, 0.25, 0.5, 0.7, 0.85, 0.95]
        base = rng.uniform(0.01, 0.05)
        ms = [base * (1 - 0.8 * s) * rng.uniform(0.9, 1.1) for s in grid]
        p = LayerProfile(layer.spec, layer.group_width, grid, ms, [0.0] * len(grid),
                         dense_ms=base * rng.uniform(0.6, 1.0))
        profiles[p.key] = p
    return LatencyTable({"kind": "llvm"}, "x86-avx512", "test", "0", {}, profiles, {"m": rest})


def _layers(model, shape=(1, 1, 28, 28)):
    return pruning.find_prunable_layers(model, shape, V)


def test_group_mask_matches_sparse_format_and_padding():
    torch.manual_seed(0)
    w = torch.randn(20, 3, 3, 3)  # Cout not a multiple of V: last block padded
    keep = torch.rand(2, 27) > 0.5
    masked = w * pruning.expand_group_mask(keep, w.shape, V)
    assert torch.equal(pruning.group_mask(masked, V), keep)
    assert np.array_equal(block_mask(masked.numpy(), V), keep.numpy())
    scores = pruning.group_scores(w, V)
    assert scores.shape == (2, 27)
    assert torch.allclose(scores[0, 5], w[:16].reshape(16, -1)[:, 5].pow(2).sum())
    assert torch.allclose(scores[1, 5], w[16:].reshape(4, -1)[:, 5].pow(2).sum())


def test_find_prunable_layers_specs():
    layers = _layers(zoo.small_cnn())
    assert [layer.name for layer in layers] == ["conv1", "conv2", "conv3"]
    assert layers[1].spec.input_shape == (1, 16, 28, 28) and layers[1].spec.stride == (2, 2)
    assert layers[2].spec.input_shape == (1, 32, 14, 14)
    assert layers[2].num_groups == 2 * 32 * 9


@pytest.mark.parametrize("seed", range(6))
def test_projection_never_exceeds_budget(seed):
    model = zoo.resnet_tiny(num_classes=10, in_channels=1) if seed % 2 else zoo.small_cnn()
    shape = (1, 1, 32, 32) if seed % 2 else (1, 1, 28, 28)
    layers = pruning.find_prunable_layers(model, shape, V)
    lat = pruning.LatencyModel(_synthetic_table(layers, seed), layers, rest_ms=0.01)
    gen = torch.Generator().manual_seed(seed)
    scores = [torch.rand(layer.blocks, layer.positions, generator=gen) for layer in layers]
    lo, hi = lat.min_ms(0.01), lat.dense_ms()
    for frac in (0.0, 0.05, 0.3, 0.6, 0.9, 1.0, 1.2):
        budget = hi * frac if frac >= 1.0 else lo + frac * (hi - lo) + (1e-6 if frac == 0.0 else 0.0)
        keep = pruning.project(scores, lat, budget, min_density=0.01)
        kept = [int(k.sum()) for k in keep]
        assert lat.total_ms(kept) <= budget + 1e-12
        for layer, k, s in zip(layers, keep, scores):
            assert k.shape == (layer.blocks, layer.positions)
            assert int(k.sum()) >= 1
            if 0 < int(k.sum()) < k.numel():  # the kept groups are the layer's most important ones
                assert s[k].min() >= s[~k].max()
        if frac >= 1.0:
            assert kept == [layer.num_groups for layer in layers]


def test_projection_is_optimal_on_a_small_case():
    """Brute force over all keep counts of a 2-layer model: the DP finds the best plan (up to its rounding)."""
    layers = _layers(zoo.small_cnn())[:2]  # 9 and 288 groups
    lat = pruning.LatencyModel(_synthetic_table(layers, 3), layers)
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(layer.blocks, layer.positions, generator=gen) for layer in layers]
    budget = 0.5 * (lat.min_ms(0.0) + lat.dense_ms())
    keep = pruning.project(scores, lat, budget, bins=20000)
    got = sum(float(s[k].sum()) for s, k in zip(scores, keep))
    prefix = [np.concatenate([[0], np.cumsum(np.sort(s.flatten().numpy())[::-1])]) for s in scores]
    best = max(prefix[0][a] + prefix[1][b] for a in range(1, 10) for b in range(1, 289)
               if lat.total_ms([a, b]) <= budget)
    assert got >= best - 1e-3 * best


def _table_with_a_cache(layers, seed=0):
    """``_synthetic_table`` with warm and cold timings and a cache that holds the model's weights once they are
    pruned to half: the table's values are the unpruned model's cache state, fraction 1 (all cold)."""
    from alcs_tvm.latency import cache_exposure

    table = _synthetic_table(layers, seed)
    for p in table.layers.values():
        p.warm_ms = list(p.sparse_ms)
        p.cold_ms = [2.0 * ms for ms in p.sparse_ms]
        p.dense_warm_ms, p.dense_cold_ms = p.dense_ms, 2.0 * p.dense_ms
    dense_run = [(p.key, "dense", 0.0) for p in table.layers.values()]
    cache = 0.5 * table.footprint(dense_run)
    table.models["m"] = {"cold_fraction": 1.0, "cache_bytes": cache, "rest_weight_bytes": 0.0}
    for p in table.layers.values():
        p.mix_cache_states(cache_exposure(table.footprint(dense_run), cache))
    return table


def test_the_pruner_prices_a_configuration_in_its_own_cache_state():
    """A model whose pruned weights fit in the caches (MTCNN's O-Net): the pruner's total for a configuration is
    the table's prediction for it, below the sum of per-layer values in the unpruned model's cache state, so a
    budget between the two keeps more of the model than those values would let it."""
    layers = _layers(zoo.small_cnn())
    table = _table_with_a_cache(layers)
    aware = pruning.LatencyModel(table, layers, table.rest_ms["m"], "m")
    unpruned_state = pruning.LatencyModel(table, layers, table.rest_ms["m"])
    dense = [layer.num_groups for layer in layers]
    assert aware.dense_ms() == pytest.approx(unpruned_state.dense_ms())
    for fraction in (0.2, 0.5, 0.9):
        kept = [max(1, round(fraction * n)) for n in dense]
        rows = [(layer.name, layer.spec, layer.group_width, 1 - k / layer.num_groups) for layer, k in zip(layers, kept)]
        assert aware.total_ms(kept) == pytest.approx(table.predict(rows, "m")[0])
        assert aware.total_ms(kept) <= unpruned_state.total_ms(kept) + 1e-12
    half = [n // 2 for n in dense]
    assert aware.total_ms(half) < 0.8 * unpruned_state.total_ms(half)  # warm once pruned, cold unpruned
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(layer.blocks, layer.positions, generator=gen) for layer in layers]
    budget = 0.6 * unpruned_state.dense_ms()
    with_cache = [int(k.sum()) for k in pruning.project(scores, aware, budget, min_density=0.01)]
    without = [int(k.sum()) for k in pruning.project(scores, unpruned_state, budget, min_density=0.01)]
    assert aware.total_ms(with_cache) <= budget and unpruned_state.total_ms(without) <= budget
    # more of the model kept, in a plan the unpruned state's values would have refused
    assert sum(with_cache) > sum(without) and unpruned_state.total_ms(with_cache) > budget


def test_bad_budgets_give_the_minimum():
    layers = _layers(zoo.small_cnn())
    table = _synthetic_table(layers)
    model = zoo.small_cnn()
    for budget in (-1.0, 0.0, float("nan"), 1e-5):
        with pytest.raises(pruning.BudgetError, match=r"minimum achievable latency under the table is \d+\.\d+ ms"):
            pruning.ADMMPruner(model, table, budget, (1, 1, 28, 28), group_width=V, rest_model="m").prepare()


def test_missing_layer_in_table_is_a_clear_error():
    layers = _layers(zoo.small_cnn())
    table = _synthetic_table(layers[:2])
    with pytest.raises(ValueError, match="no entry for: conv3"):
        pruning.ADMMPruner(zoo.small_cnn(), table, 1.0, (1, 1, 28, 28), group_width=V).prepare()


# ------------------------------------------------------------------- measured on this host: ADMM and export
@pytest.fixture(scope="module")
def digits_setup():
    from alcs_tvm.data import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: 1 thread is fastest, and far faster on a busy host
    data = load_digits()
    torch.manual_seed(0)
    model = zoo.small_cnn()
    training.train_dense(model, data, 8, batch_size=32, log=lambda *a: None)
    table = profiler.measure_latency_table(model, data.input_shape, "x86", model_name="small_cnn",
                                          sparsities=(0.0, 0.6, 0.95), repeat=5)
    yield data, model, table
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def admm_pruned(digits_setup):
    """``(budget, result)``: the digits model pruned by ADMM to 40% of the way from its minimum latency to its
    dense one (``result.model`` is a pruned copy; the tests that read it must not change it)."""
    data, dense, table = digits_setup
    model = copy.deepcopy(dense)
    layers = pruning.find_prunable_layers(model, data.input_shape, pruning_v(table))
    lat = pruning.LatencyModel(table, layers, table.rest_ms["small_cnn"], "small_cnn")
    budget = lat.min_ms(0.01) + 0.4 * (lat.dense_ms() - lat.min_ms(0.01))
    result = training.prune(model, data, table, budget, group_width=pruning_v(table), admm_epochs=4,
                            finetune_epochs=3, batch_size=32, rest_model="small_cnn", log=lambda *a: None)
    return budget, result


def test_admm_reaches_budget_and_keeps_accuracy(digits_setup, admm_pruned):
    data, dense, table = digits_setup
    dense_acc = training.evaluate(copy.deepcopy(dense), data.x_test, data.y_test)
    assert dense_acc > 0.9
    budget, result = admm_pruned
    assert result.predicted_ms <= budget + 1e-9
    assert result.accuracy >= 0.85, result.accuracy  # stated floor: 85% on digits (dense ~95-98%)
    assert any(s > 0.05 for s in result.sparsities.values())
    assert [layer.group_width for layer in result.layers] == \
        [pruning_v(table).group_width(layer.spec.out_channels) for layer in result.layers]
    for layer in result.layers:  # SIMD structure: every V-group all zero or (trained) all kept
        w = layer.module.weight.detach()
        assert not hasattr(layer.module, "weight_mask")
        kept = pruning.group_mask(w, layer.group_width)
        assert 1.0 - int(kept.sum()) / kept.numel() == pytest.approx(result.sparsities[layer.name], abs=1e-12)
        lanes = (pruning._blocked(w, layer.group_width) != 0).sum(dim=1)  # non-zero lanes per group
        assert torch.all((lanes == 0) | (lanes == layer.group_width))


def test_several_admm_updates_per_epoch(digits_setup):
    """Z/U-steps inside each epoch: the plan still meets the budget, rho ends where one step per epoch would."""
    data, dense, table = digits_setup
    model = copy.deepcopy(dense)
    layers = pruning.find_prunable_layers(model, data.input_shape, pruning_v(table))
    lat = pruning.LatencyModel(table, layers, table.rest_ms["small_cnn"], "small_cnn")
    budget = lat.min_ms(0.01) + 0.5 * (lat.dense_ms() - lat.min_ms(0.01))
    with pytest.raises(ValueError, match="updates_per_epoch"):
        training.prune(copy.deepcopy(dense), data, table, budget, group_width=pruning_v(table), updates_per_epoch=0,
                       rest_model="small_cnn")
    result = training.prune(model, data, table, budget, group_width=pruning_v(table), admm_epochs=2,
                            finetune_epochs=1, batch_size=32, updates_per_epoch=3, rest_model="small_cnn",
                            log=lambda *a: None)
    admm = [row for row in result.history if row["phase"] == "admm"]
    assert len(admm) == 2 and result.predicted_ms <= budget + 1e-9
    assert result.pruner.rho == pytest.approx(pruning.DEFAULT_RHO * 1.6 ** 2, rel=1e-9)  # 6 steps of 1.6^(1/3)
    assert result.accuracy > 0.5


def pruning_v(table):
    """The host target, whose group width per layer the table below was measured with (32 for AVX-512 convs
    with a multiple of 32 output channels, else the register width)."""
    from alcs_tvm.target import resolve_target

    info = resolve_target("x86")
    assert {p.vector_width for p in table.layers.values()} <= set(info.group_widths())
    return info


def test_export_compile_outputs_equal(digits_setup, admm_pruned, tmp_path):
    from alcs_tvm.compiler import compile as alcs_compile
    from alcs_tvm.compiler import export
    from alcs_tvm.run import run_model, write_sidecar

    data, _, _ = digits_setup
    model = copy.deepcopy(admm_pruned[1].model)
    path = pruning.export_pruned(model, str(tmp_path / "p.onnx"), data.input_shape)
    executable, report = alcs_compile(path, "x86")
    # every layer the pruner thinned below the compiler's dense threshold (0.95) runs the sparse kernel
    assert report.sparse_layers, report.table()
    assert all(layer.decision == "sparse" for layer in report.layers
               if layer.op == "conv2d" and layer.density is not None and layer.density <= 0.95), report.table()
    lib = str(tmp_path / "p.so")
    export(executable, lib, "x86")
    write_sidecar(lib, report.relax_module)
    x = data.x_test[:1].numpy()
    (out,), _ = run_model(lib, [x])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_cli_bad_budget_exit_2(digits_setup, tmp_path, capsys):
    from alcs_tvm import cli

    _, _, table = digits_setup
    path = str(tmp_path / "t.json")
    table.save(path)
    for budget in ("-1", "1e-6"):
        code = cli.main(["prune", "--model", "small_cnn", "--data", "digits", "--latency-table", path,
                               "--budget-ms", budget, "-o", str(tmp_path / "x.onnx")])
        assert code == 2
        err = capsys.readouterr().err
        assert "alcs prune: error: latency budget" in err and "minimum achievable" in err
        assert math.isfinite(float(err.split("under the table is ")[1].split()[0]))


def test_load_model_passes_only_what_the_factory_takes(tmp_path):
    from alcs_tvm.zoo import load_model

    model = load_model("mobilenet_v2", num_classes=10, in_channels=1)  # 1-channel MNIST into a zoo MobileNetV2
    assert model.features[0][0].in_channels == 1 and model.classifier[1].out_features == 10
    factories = tmp_path / "factories.py"
    factories.write_text(
        "import torch\n"
        "def classes_only(num_classes):\n"
        "    return torch.nn.Linear(4, num_classes)\n"
        "def broken(num_classes, in_channels):\n"
        "    raise TypeError('a bug inside the factory')\n")
    assert load_model(f"{factories}:classes_only", num_classes=3, in_channels=1).out_features == 3
    with pytest.raises(TypeError, match="a bug inside the factory"):  # not retried as factory()
        load_model(f"{factories}:broken", num_classes=3, in_channels=1)


def test_projected_accuracy_reestimates_batchnorm_on_a_copy_of_the_statistics():
    from alcs_tvm.data import load_digits

    data = load_digits()
    torch.manual_seed(0)
    model = zoo.mobilenet_v2_tiny(num_classes=10, in_channels=1)  # BatchNorm after every conv
    training.train_dense(model, data, 2, batch_size=64, log=lambda *a: None)
    layers = _layers(model, data.input_shape)
    table = _synthetic_table(layers)
    lat = pruning.LatencyModel(table, layers, table.rest_ms["m"], "m")
    budget = 0.5 * (lat.dense_ms() + lat.min_ms(0.01))
    pruner = pruning.ADMMPruner(model, table, budget, data.input_shape, group_width=V, rest_model="m").prepare()
    pruner.step()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    acc = training._accuracy_with_plan(model, pruner, data)

    assert torch.equal(torch.get_rng_state(), rng)  # the training after it draws the same numbers

    after = model.state_dict()  # weights, running statistics and momenta all back
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # the same thing written out: hard-prune a copy, re-estimate its statistics on 16 training batches
    ref = copy.deepcopy(model)
    ref_layers = _layers(ref, data.input_shape)
    with torch.no_grad():
        for layer, keep in zip(ref_layers, pruner.keep):
            layer.module.weight.mul_(pruning.expand_group_mask(keep, layer.module.weight.shape, V))
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for m in ref.modules():
            m.train(isinstance(m, torch.nn.BatchNorm2d))
        for i, (x, _) in enumerate(data.loader(64, seed=0)):
            if i == 16:
                break
            ref(x)
    assert acc == training.evaluate(ref, data.x_test, data.y_test)
    assert sum(int((~k).sum()) for k in pruner.keep) > 0  # the plan pruned something
