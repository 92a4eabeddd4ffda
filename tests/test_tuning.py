"""MetaSchedule tuning with the on-disk cache: a tiny conv, very few trials, numerics against torch, cache reuse."""
import os
import sys

import numpy as np
from helpers import torch_conv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))


def _ref(x, w, b, stride, pad, relu):
    return torch_conv(x, w, b, stride, pad, 1, "relu" if relu else None)


def test_tune_conv_matches_torch_and_reuses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALCS_TVM_CACHE", str(tmp_path))
    import metaschedule as tuning

    assert tuning.cache_dir() == str(tmp_path / "tuning")
    lines = []
    kw = dict(stride=2, padding=1, bias=True, relu=True, target="x86", trials=4, report=lines.append,
              strategy="replay-trace")
    mod = tuning.tuned_dense_conv2d((1, 4, 9, 9), (8, 4, 3, 3), **kw)
    assert mod.tune is not None and not mod.tune.from_cache
    assert any("trials" in l for l in lines), lines  # progress was reported
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    y = mod.run(x, w, b)
    assert y.shape == (1, 8, 5, 5) == mod.workload.output_shape
    np.testing.assert_allclose(y, _ref(x, w, b, 2, 1, True), rtol=1e-4, atol=1e-4)
    assert mod.tune.meta["best_seconds"] is not None  # at least one candidate built and ran

    # second call: served from the cache, no tuning
    lines.clear()
    again = tuning.tuned_dense_conv2d((1, 4, 9, 9), (8, 4, 3, 3), **kw)
    assert again.tune.from_cache and again.tune.work_dir == mod.tune.work_dir
    assert any("cached" in l for l in lines), lines
    np.testing.assert_allclose(again.run(x, w, b), y, rtol=1e-5, atol=1e-5)

    # trials=0 picks up the cached entry; a different workload is not confused with it
    assert tuning.tuned_dense_conv2d((1, 4, 9, 9), (8, 4, 3, 3), **dict(kw, trials=0)).tune.trials == 4
    other = tuning.tuned_dense_conv2d((1, 4, 9, 9), (8, 4, 1, 1), target="x86", trials=0, report=None)
    assert other.tune is None  # untuned fallback, still correct
    np.testing.assert_allclose(other.run(x, w[:, :, :1, :1]), _ref(x, w[:, :, :1, :1], None, 1, 0, False),
                               rtol=1e-4, atol=1e-4)


def test_workload_shapes_and_cache_key_depend_on_trials(tmp_path, monkeypatch):
    monkeypatch.setenv("ALCS_TVM_CACHE", str(tmp_path))
    import metaschedule as tuning

    wl = tuning.Conv2dWorkload.create((1, 3, 10, 12), (5, 3, 3, 3), stride=(2, 1), padding=(1, 0, 1, 2),
                                      dilation=1)
    assert wl.output_shape == (1, 5, 5, 12)
    mod = tuning._normalize(tuning.dense_conv2d_func(wl))
    k4, _ = tuning._entry_key(mod, "x86", 4)
    k8, _ = tuning._entry_key(mod, "x86", 8)
    assert k4 != k8 and k4 == tuning._entry_key(mod, "x86", 4)[0]
    assert tuning.find_cached(mod, "x86") is None
