"""The package's shape, checked: data flows one way (no import cycle among alcs_tvm modules, counting imports
inside functions), the pruner imports no TVM, and argparse lives only in the command-line modules."""
import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "alcs_tvm"
CLI_MODULES = {"alcs_tvm.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set) -> tuple:
    """``(alcs_tvm modules imported anywhere in the file, other top-level packages imported)``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # "from . import x" names modules; "from .m import f" names m
            targets = [f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in known] or \
                [prefix]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "alcs_tvm":
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name and target != "alcs_tvm":
                    found.add(target)
            else:
                external.add(target.split(".")[0])
    return found, external


def _graph() -> tuple:
    modules = _modules()
    graph, external = {}, {}
    for name, path in modules.items():
        graph[name], external[name] = _imports(name, path, set(modules))
    return graph, external


def _cycle(graph: dict):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycle():
    graph, _ = _graph()
    assert len(graph) > 20  # the walk found the package
    assert "alcs_tvm.compiler" in graph["alcs_tvm.profiler"]  # and resolves relative imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_detection_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_argparse_only_in_the_cli():
    _, external = _graph()
    users = sorted(name for name, packages in external.items() if "argparse" in packages)
    assert users and all(name in CLI_MODULES or name.startswith("alcs_tvm.commands") for name in users), users


def test_pruner_imports_no_tvm():
    graph, external = _graph()
    reachable, todo = set(), ["alcs_tvm.pruning", "alcs_tvm.training"]
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo += graph[name]
    assert not any("tvm" in external[name] for name in reachable), sorted(reachable)
    # and at run time, through the package's __init__
    code = "import sys, alcs_tvm.pruning, alcs_tvm.training; print(any(m.split('.')[0] == 'tvm' for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_cli_parser_imports_no_tvm_or_torch():
    """``alcs --help``, a bad argument or a missing input file answer without loading TVM, torch or ONNX Runtime
    (seconds of CPU): each command imports the library when it runs. Nor numpy: a Ctrl-C while its extension
    initialises surfaces as an ImportError that does not say it was the interrupt, so it must load after the command
    has taken over Ctrl-C."""
    code = ("import sys, alcs_tvm.cli as cli; cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tvm', 'torch', 'onnx', 'onnxruntime', 'numpy'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(PACKAGE.parent)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _loads_torch(stderr: str) -> bool:
    """Whether a ``python -X importtime`` run loaded torch (its extension module), from the run's stderr."""
    return any(line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "torch._C"
               for line in stderr.splitlines())


def test_commands_and_rpc_processes_load_tvm_without_torch(tmp_path):
    """TVM imports torch at its own import (about 2 of its 3 s of CPU) although no command but prune and flow hands
    it a torch tensor: `alcs compile` and the tracker and server processes load TVM without it; a plain import loads
    it as before, and torch stays importable after TVM."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))

    def importtime(*args):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", *map(str, args)], capture_output=True,
                                text=True, timeout=300, env=env)
        return result, _loads_torch(result.stderr)

    result, torch_loaded = importtime("alcs_tvm.cli", "compile", model, "-o", tmp_path / "relu.so")
    assert result.returncode == 0 and (tmp_path / "relu.so").exists(), result.stderr[-2000:]
    assert not torch_loaded
    result, torch_loaded = importtime("alcs_tvm.startup", "tvm.exec.rpc_tracker", "--help")
    assert result.returncode == 0 and "--port" in result.stdout and not torch_loaded
    # the check sees torch where it is loaded: a plain `import tvm` (what `alcs prune` and `alcs flow` do)
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import tvm"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and _loads_torch(result.stderr)
    code = ("import sys; from alcs_tvm.startup import load_tvm_without_torch; load_tvm_without_torch(); "
            "import tvm, tvm.relax.frontend.onnx; loaded = 'torch' in sys.modules; import torch; "
            "print(loaded, float(torch.ones(3).sum()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.split() == ["False", "3.0"], result.stderr[-2000:]
