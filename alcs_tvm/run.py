"""Run a compiled model here or on an RPC device, optionally timing it (the library behind ``alcs run``).

``OUT.so`` is a standard Relax executable library (``tvm.compile(...).export_library(...)``). It is loaded with
``tvm.runtime.load_module`` (or uploaded and loaded on the device) and run with ``tvm.relax.VirtualMachine``.

Input names come from the VM itself (the parameter names of ``main``). Shapes and dtypes are not kept in the
library, so a JSON *sidecar* ``OUT.so.json`` may be written next to it at compile time (:func:`write_sidecar`)::

    {
      "function": "main",                                    # optional, default "main"
      "inputs":  [{"name": "data", "shape": [1, 3, 32, 32], "dtype": "float32"}, ...],
      "outputs": [{"name": "out",  "shape": [1, 10],        "dtype": "float32"}, ...],   # optional
      "target":  {"kind": "llvm", "mtriple": "aarch64-linux-gnu", ...}                 # optional, informational
    }

The sidecar is needed only to *make up* inputs (``--fill-mode``) and to check shapes before sending them; with
``--inputs in.npz`` a library without sidecar runs fine. ``in.npz`` keys are the input names (or ``arr_0``,
``arr_1``, ... in parameter order); ``--outputs out.npz`` keys are the sidecar's output names or ``output_0``, ...
"""
from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from . import rpc as alcs_rpc
from .files import sidecar_path

__all__ = ["run_model", "time_model", "read_sidecar", "write_sidecar", "sidecar_path", "make_inputs",
           "flatten_outputs"]


def read_sidecar(lib_path) -> dict | None:
    """The sidecar of ``lib_path`` (``lib_path + ".json"``), or None."""
    path = sidecar_path(lib_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list):
        raise ValueError(f"{path} has no 'inputs' list")
    return data


def _type_entries(ty, name):
    """Sidecar entries for a Relax type (TVM 0.27: ``relax.type.TensorType``, ``ir.TupleType``)."""
    fields = getattr(ty, "fields", None)
    if fields is not None:
        out = []
        for i, field in enumerate(fields):
            out += _type_entries(field, f"{name}_{i}" if len(fields) > 1 else name)
        return out
    if hasattr(ty, "dtype") and hasattr(ty, "shape"):
        shape = None
        values = getattr(ty.shape, "values", None)
        if values is not None:
            try:
                shape = [int(v) for v in values]
            except TypeError:
                shape = None  # symbolic
        return [{"name": name, "shape": shape, "dtype": str(ty.dtype) or None}]
    return [{"name": name, "shape": None, "dtype": None}]


def write_sidecar(lib_path, mod, function: str = "main", target=None, output_names=None) -> Path:
    """Write ``lib_path + ".json"`` from the Relax ``mod`` (IRModule or relax.Function) the library was built from."""
    func = mod[function] if not isinstance(mod, relax.Function) else mod
    inputs = []
    for param in func.params:
        inputs += _type_entries(param.ty, str(param.name))
    outputs = _type_entries(func.ret_ty, "output")
    for i, entry in enumerate(outputs):
        entry["name"] = output_names[i] if output_names and i < len(output_names) else f"output_{i}"
    data = {"function": function, "inputs": inputs, "outputs": outputs}
    if target is not None:
        data["target"] = {k: (list(map(str, v)) if isinstance(v, (list, tuple)) or type(v).__name__ == "Array"
                              else str(v)) for k, v in target.export().items()} \
            if hasattr(target, "export") else target
    path = sidecar_path(lib_path)
    path.write_text(json.dumps(data, indent=1))
    return path


def make_inputs(sidecar: dict, fill_mode: str = "random", seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs made up from the sidecar's shapes: zeros, ones, or random (normal floats / small ints)."""
    rng = np.random.default_rng(seed)
    out = {}
    for entry in sidecar["inputs"]:
        if entry.get("shape") is None or entry.get("dtype") is None:
            raise ValueError(f"input {entry.get('name')!r} has no static shape/dtype in the sidecar; pass --inputs")
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        if fill_mode == "zeros":
            arr = np.zeros(shape, dtype)
        elif fill_mode == "ones":
            arr = np.ones(shape, dtype)
        elif fill_mode == "random":
            arr = (rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 8, shape)).astype(dtype)
        else:
            raise ValueError(f"unknown fill mode {fill_mode!r} (zeros, ones, random)")
        out[entry["name"]] = arr
    return out


def _order_inputs(inputs, names: list[str]) -> list[np.ndarray]:
    if isinstance(inputs, dict):
        keys = list(inputs)
        if all(k in inputs for k in names) and len(keys) == len(names):
            return [np.asarray(inputs[k]) for k in names]
        if keys == [f"arr_{i}" for i in range(len(keys))]:
            inputs = [inputs[k] for k in keys]
        else:
            raise ValueError(f"input names {sorted(keys)} do not match the model's inputs {names}")
    inputs = [np.asarray(a) for a in inputs]
    if len(inputs) != len(names):
        raise ValueError(f"the model takes {len(names)} input(s) {names}, got {len(inputs)}")
    return inputs


def _check_against_sidecar(arrays, names, sidecar):
    if not sidecar:
        return
    by_name = {e["name"]: e for e in sidecar["inputs"]}
    for name, arr in zip(names, arrays):
        entry = by_name.get(name)
        if not entry:
            continue
        if entry.get("shape") is not None and list(arr.shape) != list(entry["shape"]):
            raise ValueError(f"input {name!r} has shape {list(arr.shape)}, the model expects {entry['shape']}")
        if entry.get("dtype") and str(arr.dtype) != entry["dtype"]:
            raise ValueError(f"input {name!r} has dtype {arr.dtype}, the model expects {entry['dtype']}")


def flatten_outputs(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("Array", "List"):
        out = []
        for item in value:
            out += flatten_outputs(item)
        return out
    if isinstance(value, (int, float, bool, np.generic)):
        return [np.asarray(value)]
    raise TypeError(f"unsupported model output of type {type(value).__name__}")


def _timings(result, number, repeat) -> dict:
    ms = [float(r) * 1e3 for r in result.results]
    return {"mean_ms": float(np.mean(ms)), "median_ms": float(np.median(ms)), "std_ms": float(np.std(ms)),
            "min_ms": float(np.min(ms)), "max_ms": float(np.max(ms)), "results_ms": ms,
            "number": number, "repeat": repeat}


def run_model(lib_path, inputs=None, *, rpc: str | None = None, tracker: str | None = None,
              key: str | None = None, session=None, repeat: int = 0, number: int = 1,
              fill_mode: str | None = None, function: str | None = None, timeout: float | None = None):
    """Run the Relax executable library ``lib_path`` once; time it when ``repeat > 0``.

    * ``inputs``: dict name -> array, or list of arrays in parameter order; None = made up from the sidecar
      with ``fill_mode`` (default ``"random"``).
    * where: here (default), ``tracker="HOST:PORT", key=KEY``, ``rpc="HOST:PORT"``, or an open ``session``
      from :func:`alcs_tvm.rpc.connect`.
    * ``timeout``: bound (s) on getting a device and on each remote step (default: learnt per kind of step,
      :class:`alcs_tvm.rpc.StepBudget`).

    Returns ``(outputs, timings)``: ``outputs`` a list of numpy arrays; ``timings`` None, or a dict with
    ``mean_ms, median_ms, std_ms, min_ms, max_ms, results_ms, number, repeat`` (each of the ``repeat`` results
    is the mean of ``number`` runs).
    """

    lib_path = Path(lib_path)
    alcs_rpc.check_library(lib_path, relax=True)  # a cut-short library kills whoever loads it (SIGBUS)
    sidecar = read_sidecar(lib_path)
    function = function or (sidecar or {}).get("function", "main")
    if inputs is None:
        if sidecar is None:
            raise ValueError(f"{lib_path} has no sidecar {sidecar_path(lib_path).name} with input shapes; "
                             f"pass the inputs (--inputs in.npz)")
        inputs = make_inputs(sidecar, fill_mode or "random")
    remote = session is not None or rpc is not None or tracker is not None
    machine = alcs_rpc.elf_machine(lib_path)
    if not remote and machine and machine != platform.machine() and lib_path.suffix == ".so":
        raise ValueError(f"{lib_path.name} is an {machine} library and this host is {platform.machine()}: "
                         f"run it on a device (--rpc-tracker HOST:PORT --rpc-key KEY, or --rpc HOST:PORT)")

    if not remote:
        lib = tvm.runtime.load_module(str(lib_path))
        dev = tvm.cpu(0)
        return _execute(lib, dev, inputs, sidecar, function, repeat, number, guard=None)

    own = session is None
    if own:
        session = alcs_rpc.connect(tracker=tracker, key=key, rpc=rpc, timeout=timeout)
    try:
        lib = alcs_rpc.upload_library(session, lib_path, timeout=timeout)
        return _execute(lib, session.cpu(0), inputs, sidecar, function, repeat, number,
                        guard=lambda what, **step: alcs_rpc.guard(session, what, timeout, **step))
    finally:
        if own:
            lib = session = None  # the session ends with its last reference: the device is free at once
            alcs_rpc.end_dropped_sessions()


def time_model(lib_path, inputs=None, *, repeat: int, sample_ms: float = 10.0, min_number: int = 1,
               probe_number: int = 1, **where):
    """:func:`run_model` timed with ``repeat`` samples of about ``sample_ms`` each: a short probe run picks how many
    back-to-back calls (at least ``min_number``) make one sample. ``where``: as for :func:`run_model`."""
    _, probe = run_model(lib_path, inputs, repeat=3, number=probe_number, **where)
    number = max(min_number, int(np.ceil(sample_ms / max(probe["median_ms"], 1e-3))))
    return run_model(lib_path, inputs, repeat=repeat, number=number, **where)


def _execute(lib, dev, inputs, sidecar, function, repeat, number, guard):

    guard = guard or (lambda what, **step: contextlib.nullcontext())
    with guard("VM creation"):
        vm = relax.VirtualMachine(lib, dev)
        try:
            arity = int(vm._get_function_arity(function))
        except Exception as err:  # noqa: BLE001
            if "not found" in str(err).lower() or "cannot find" in str(err).lower():
                raise ValueError(f"the library has no Relax function {function!r}") from None
            raise
        names = [str(vm._get_function_param_name(function, i)) for i in range(arity)]
    arrays = _order_inputs(inputs, names)
    _check_against_sidecar(arrays, names, sidecar)
    with guard("input transfer", kind="transfer", units=sum(a.nbytes for a in arrays)):
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
    started = time.monotonic()
    with guard("inference"):
        result = vm[function](*args)
        if type(result).__name__ == "RPCObjectRef":
            # a tuple of outputs stays on the device as one remote object: fetch its fields one by one
            vm.set_input(function, *args)
            vm.invoke_stateful(function)
            result = vm.get_outputs(function)
        outputs = flatten_outputs(result)
    inference = time.monotonic() - started  # with the outputs' transfer: an upper bound on one run
    timings = None
    if repeat and repeat > 0:
        # the time evaluator runs the model once to warm up, then repeat x number times
        with guard("timing", expected=inference * (repeat * max(1, number) + 1)):
            vm.set_input(function, *args)
            evaluator = vm.time_evaluator("invoke_stateful", dev, number=max(1, number), repeat=repeat)
            timings = _timings(evaluator(function), max(1, number), repeat)
    return outputs, timings
