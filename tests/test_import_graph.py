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
