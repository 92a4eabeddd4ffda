#!/usr/bin/env python
"""Predict a new device's latency table from another device's table and a few measurements on the new device
(alcs_tvm/latency_transfer.py; docs/latency_transfer.md).

Picks ``--measure`` (layer, sparsity) points of ``--model`` spread over the source table, measures them on the
new device (``--target``) as ``alcs profile`` measures, fits the source -> new map on them and writes the new
device's whole table for the model (keyed by the new target's group widths). With ``--reference`` (a table of
the new device measured in full by ``alcs profile``) prints the per-point error of the prediction: every grid
point of every layer, sparse and dense, Winograd and the raw warm / cold states apart.

Examples::

    # AVX2 from AVX-512 on this host, measured in-process
    python tools/transfer_latency.py --source resnet18_avx512.json --model resnet18 --target x86-avx2 \\
        --measure 10 --local --reference resnet18_avx2.json -o resnet18_avx2_transferred.json
    # a device behind a tracker
    python tools/transfer_latency.py --source t.json --model model.onnx --target arm64 \\
        --rpc-tracker 127.0.0.1:9190 --rpc-key my-phone -o phone.json

Without --local, --rpc or --rpc-tracker a tracker and the local x86 RPC server are started here (as
tools/validate_latency.py does) and stopped at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402

from alcs_tvm import latency_transfer as lt, public_models  # noqa: E402
from alcs_tvm.compiler import model_layers  # noqa: E402
from alcs_tvm.latency import LatencyTable  # noqa: E402
from alcs_tvm.target import resolve_target  # noqa: E402


def model_path(name_or_path: str, input_shape, work: Path) -> tuple:
    """``(onnx path, model name)``: an ONNX file as given, a public or zoo network
    (:func:`alcs_tvm.public_models.network`, seed 0) written into ``work``."""
    path = Path(name_or_path)
    if path.suffix == ".onnx" or path.exists():
        return str(path), path.stem
    out = work / f"{name_or_path}.onnx"
    onnx.save(public_models.network(name_or_path, input_shape=input_shape), str(out))
    return str(out), name_or_path


def print_comparison(found: dict, title: str, log):
    log(title)
    log(f"  {'entries':10s} {'n':>4s} {'layers':>6s} {'MAPE %':>7s} {'max %':>7s} {'mean %':>7s}  worst")
    for kind in ("all", "sparse", "dense", "winograd", "warm", "cold"):
        if kind in found:
            m = found[kind]
            w = m["worst"]
            log(f"  {kind:10s} {m['n']:4d} {m['layers']:6d} {m['mape_pct']:7.2f} {m['max_err_pct']:7.2f} "
                f"{m['mean_err_pct']:+7.2f}  {w['layer']} s={w['sparsity']:g} {w['err_pct']:+.1f}%")
    if found.get("by_sparsity"):
        log("  MAPE % by sparsity: " + ", ".join(f"{s}: {e:.1f}" for s, e in found["by_sparsity"].items()))


def measure(points, info, source, name, args, work, log):
    """``(measured profiles, device key)``: the points measured where the arguments say."""
    from alcs_tvm import rpc as alcs_rpc
    from alcs_tvm.profiler import Measurer

    with contextlib.ExitStack() as stack:
        if not (args.local or args.rpc or args.rpc_tracker):
            from alcs_tvm import device

            args.rpc_tracker = stack.enter_context(device.started(work, first_port=9590, x86_key=args.rpc_key))
            log(f"started tracker {args.rpc_tracker} with {args.rpc_key}")
        t0 = time.time()
        measurer = Measurer(info, tracker=args.rpc_tracker, key=args.rpc_key if args.rpc_tracker else None,
                            rpc=args.rpc, local=args.local, timeout=args.timeout)
        try:
            measured = lt.measure_points(points, info, measurer, source=source,
                                         cold_fraction=lt.source_cold_fraction(source, name), seed=args.seed,
                                         log=log)
        finally:
            measurer.close()
            alcs_rpc.end_dropped_sessions()
    log(f"measured in {time.time() - t0:.0f} s")
    return measured, measurer.device_key


def alternatives(source, reference, layers, info, measured, name, log) -> dict:
    """Every fit of the module scored on the same measured points against ``reference``: each feature set at
    each penalty, the source unchanged, warm and cold fitted apart then mixed, and an XGBoost model of the
    source (latency_regressor) in place of the source's measured values. Pure predictions (measured points not
    kept) and with them kept."""
    import copy

    from alcs_tvm.latency_regressor import LatencyRegressor

    fraction = lt.source_cold_fraction(source, name)
    rows = {}

    def score(label, fit, src=source, fits=None, mix=False):
        for keep, correction in ((False, None), (True, "none"), (True, "interp"), (True, "mean")):
            table = lt.transfer_table(src, layers, info, measured, fit, fits=fits, model_name=name,
                                      use_measurements=keep, correction=correction)
            if mix:
                for p in table.layers.values():
                    p.mix_cache_states(fraction)
            every, unmeasured = lt.compare_tables(table, reference), lt.compare_tables(table, reference,
                                                                                        exclude_measured=True)
            rows[f"{label}{f' +measured ({correction})' if keep else ''}"] = {
                "all": every["all"]["mape_pct"], "max": every["all"]["max_err_pct"],
                "sparse": every["sparse"]["mape_pct"], "dense": every["dense"]["mape_pct"],
                "unmeasured_layers": unmeasured["all"]["mape_pct"] if "all" in unmeasured else None,
                "winograd": every.get("winograd", {}).get("mape_pct"),
                "holdout": fit.holdout.get("mape_pct")}

    identity = lt.TransferFit("identity", (), 0.0, 0.0, [], [], [])
    score("source unchanged", identity)
    for set_name in lt.FEATURE_SETS:
        for alpha in (lt.ALPHAS if lt.FEATURE_SETS[set_name] else (0.0,)):
            try:
                fit = lt.fit_transfer(source, measured, feature_sets=[set_name], alphas=[alpha])
            except ValueError:
                continue
            if fit.name == set_name:
                score(f"{set_name} alpha={alpha:g}", fit)
    auto = lt.fit_transfer(source, measured)
    score(f"default ({auto.name} alpha={auto.alpha:g})", auto)
    score("default, not robust (plain least squares)", lt.fit_transfer(source, measured, robust=False))
    chosen = lt.fit_transfer(source, measured, feature_sets=None, alphas=lt.ALPHAS, choose="holdout")
    score(f"by held-out error ({chosen.name} alpha={chosen.alpha:g})", chosen)
    try:
        raw = {q: lt.fit_transfer(source, measured, quantity=q) for q in ("warm", "cold")}
        score("warm, cold apart, mixed", auto, fits=raw, mix=True)
    except ValueError:
        pass
    regressor = LatencyRegressor.fit(source)
    estimated = copy.copy(source)
    estimated.layers = {k: regressor.profile(p.spec, p.vector_width, p.sparsities) for k, p in source.layers.items()}
    score("XGBoost model of the source + default fit", lt.fit_transfer(estimated, measured), src=estimated)
    log(f"alternatives on the same {len(measured)} measured layers (MAPE % against the reference; holdout: the "
        f"fit's own leave-one-layer-out MAPE):")
    log(f"  {'fit':44s} {'all':>6s} {'max':>6s} {'sparse':>6s} {'dense':>6s} {'unmeas':>6s} {'wino':>6s} "
        f"{'holdout':>7s}")

    def fmt(v):
        return f"{v:6.2f}" if v is not None and v == v else "     -"

    for label, r in rows.items():
        log(f"  {label:44s} {fmt(r['all'])} {fmt(r['max'])} {fmt(r['sparse'])} {fmt(r['dense'])} "
            f"{fmt(r['unmeasured_layers'])} {fmt(r['winograd'])}  {fmt(r['holdout'])}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="latency table of the known device (alcs profile)")
    ap.add_argument("--model", required=True, help="ONNX file, public model (light_squeezenet) or zoo model name (exported with seed 0)")
    ap.add_argument("--input-shape", help="input shape for a zoo model, e.g. 1x3x224x224")
    ap.add_argument("--target", default="x86-avx2", help="the new device's target (default x86-avx2)")
    ap.add_argument("--measure", type=int, default=10, help="(layer, sparsity) points measured on it (default 10)")
    ap.add_argument("--reference", help="a fully measured table of the new device: print the prediction's error")
    ap.add_argument("-o", "--output", required=True, help="the predicted table (JSON)")
    ap.add_argument("--local", action="store_true", help="measure in this process (the new device is this host)")
    ap.add_argument("--rpc", help="RPC server HOST:PORT")
    ap.add_argument("--rpc-tracker", help="tracker HOST:PORT (with --rpc-key)")
    ap.add_argument("--rpc-key", default="x86-local", help="device key at the tracker (default x86-local)")
    ap.add_argument("--model-name", help="name of the model's entry (default: the file stem / zoo name)")
    ap.add_argument("--no-keep-measured", action="store_true",
                    help="predict the measured layers too (default: their measured points are kept)")
    ap.add_argument("--correction", choices=["none", "interp", "mean"], default="none",
                    help="a measured layer's other points: as predicted (none, default), or following its measured "
                         "points' residuals (interp: in sparsity between them; mean)")
    ap.add_argument("--estimate-missing", action="store_true",
                    help="conv shapes the source lacks: the source's XGBoost regressor estimates them "
                         "(latency_regressor, trained on the source table)")
    ap.add_argument("--fit", choices=["default", "holdout"],
                    help="default: latency_transfer's fixed feature set; holdout: the set and penalty with the "
                         "lowest leave-one-layer-out error (the default with --estimate-missing: it did better "
                         "where the source's values are estimates, worse where they are measured; "
                         "docs/latency_transfer.md)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--json", help="write the points, the fit and the comparison here")
    ap.add_argument("--reuse-measured", metavar="PREDICTED.json",
                    help="take the measured points from a table this tool wrote (no measuring): refit")
    ap.add_argument("--alternatives", action="store_true",
                    help="with --reference: also score the other fits on the same measured points")
    args = ap.parse_args(argv)
    if args.measure < 1:
        ap.error("--measure must be at least 1")
    if sum(map(bool, (args.local, args.rpc, args.rpc_tracker))) > 1:
        ap.error("give one of --local, --rpc, --rpc-tracker")
    if args.alternatives and not args.reference:
        ap.error("--alternatives needs --reference")

    def log(msg):
        print(msg, flush=True)

    source = LatencyTable.load(args.source)
    if args.estimate_missing:
        from alcs_tvm.latency_regressor import LatencyRegressor

        regressor = LatencyRegressor.fit(source)
        source.estimate_missing(regressor)
        print(regressor.describe(), flush=True)
    reference = LatencyTable.load(args.reference) if args.reference else None
    info = resolve_target(args.target)
    work = Path(tempfile.mkdtemp(prefix="alcs-transfer-"))
    shape = tuple(int(d) for d in args.input_shape.split("x")) if args.input_shape else None
    onnx_path, name = model_path(args.model, shape, work)
    name = args.model_name or name
    layers = model_layers(onnx_path, info)
    points = lt.select_points(source, layers, args.measure)
    log(f"source {args.source}: {source.target_family} ({source.device_key}), {len(source.layers)} layers; "
        f"new device {info.family}, group widths {list(info.group_widths())}; {name}: {len(layers)} convs, "
        f"{len({l.key for l in layers})} distinct")
    log(f"measuring {len(points)} points on {len({p.layer.key for p in points})} layers:")
    for p in points:
        log(f"  {p.layer.spec.describe():32s} V={p.layer.vector_width} s={p.sparsity:g} "
            f"(source {p.source_ms:.4f} ms)")

    if args.reuse_measured:
        previous = LatencyTable.load(args.reuse_measured)
        measured, device_key = lt.measured_from_table(previous), previous.device_key
        log(f"measured points from {args.reuse_measured}: {len(measured)} layers")
    else:
        measured, device_key = measure(points, info, source, name, args, work, log)
    how = args.fit or ("holdout" if args.estimate_missing else "default")
    options = dict(feature_sets=None, alphas=lt.ALPHAS, choose="holdout") if how == "holdout" else {}
    fit = lt.fit_transfer(source, measured, **options)
    try:  # the raw cache states too, where the source has them (a regressor's estimates do not)
        fits = {q: lt.fit_transfer(source, measured, quantity=q, **options) for q in ("warm", "cold")}
    except ValueError:
        fits = {}
    h = fit.holdout
    log(f"fit: {fit.name} (alpha {fit.alpha:g}) on {h['points']} points of {h['layers']} layers; leave-one-layer-out "
        f"MAPE {h['mape_pct']:.1f} %, max {h['max_err_pct']:.1f} %; Winograd offset {fit.winograd_offset:+.3f}")
    table = lt.transfer_table(source, layers, info, measured, fit, fits=fits, device_key=device_key,
                              model_name=name, points=points, use_measurements=not args.no_keep_measured,
                              correction=args.correction)
    table.settings["transferred_from"]["path"] = str(args.source)
    Path(args.output).unlink(missing_ok=True)  # a prediction replaces, never merges into, an older file
    table.save(args.output)
    log(f"wrote {args.output}: {len(table.layers)} layers" +
        (f", rest of {name} {table.rest_ms[name]:.3f} ms" if name in table.rest_ms else ", no rest of model "
         "(the source has no model with these conv shapes)"))
    summary = {"points": [p.to_json() for p in points], "fit": fit.to_json(),
               "raw_fits": {q: f.to_json() for q, f in fits.items()}}
    if reference is not None:
        summary["comparison"] = lt.compare_tables(table, reference)
        summary["comparison_unmeasured_layers"] = lt.compare_tables(table, reference, exclude_measured=True)
        print_comparison(summary["comparison"], f"against {args.reference} (every layer):", log)
        print_comparison(summary["comparison_unmeasured_layers"], "the layers not measured on the device:", log)
        fraction = table.settings["transfer"]["cold_fraction"]
        ref_entry = reference.models.get(name, {})
        ref_fraction = ref_entry.get("table_cold_fraction", ref_entry.get("cold_fraction"))
        summary["comparison_same_fraction"] = lt.compare_tables(table, reference, cold_fraction=fraction)
        print_comparison(summary["comparison_same_fraction"],
                         f"the reference's raw times mixed at the prediction's cache-state fraction {fraction:.2f} "
                         f"(its own: {ref_fraction if ref_fraction is None else round(ref_fraction, 2)}):", log)
        if name in table.rest_ms and name in reference.rest_ms:
            total, _ = table.predict(onnx_path)
            ref_total, _ = reference.predict(onnx_path)
            summary["dense_model_ms"] = {"predicted": total, "reference": ref_total}
            log(f"whole model as compiled dense: predicted {total:.3f} ms, reference table {ref_total:.3f} ms "
                f"({(total / ref_total - 1) * 100:+.1f} %)")
        if args.alternatives:
            summary["alternatives"] = alternatives(source, reference, layers, info, measured, name, log)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
