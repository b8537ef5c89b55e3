"""The package's public names stay the functions even after their submodules are imported."""

import importlib
import subprocess
import sys


def test_functions_are_not_shadowed_by_submodules():
    import memfit
    importlib.import_module("memfit.cost_models.measure")
    importlib.import_module("memfit.ir.capture")
    assert callable(memfit.measure) and memfit.measure.__name__ == "measure"
    assert callable(memfit.capture) and memfit.capture.__name__ == "capture"
    assert callable(memfit.plan) and callable(memfit.optimize)


def test_import_memfit_does_not_pull_triton_or_transformers():
    code = "import sys, memfit; print('triton' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- the layout (docs/architecture.md) ----------------------------------------------------

import ast  # noqa: E402
import os  # noqa: E402

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memfit")


def _modules() -> dict[str, str]:
    """memfit's module names -> file paths."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _imports(path: str, modules) -> set[str]:
    """memfit modules `path` imports anywhere (module level and inside functions)."""
    tree = ast.parse(open(path).read())
    got = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            got.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            for a in node.names:   # `from memfit.x import y` names a submodule or an attribute of x
                sub = f"{node.module}.{a.name}"
                got.add(sub if sub in modules else node.module)
    return got


def test_no_import_cycle():
    import networkx as nx

    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for dep in _imports(path, modules):
            if dep != name:
                g.add_edge(name, dep)
    cycles = [c for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles among memfit's modules: {cycles}"


def test_no_module_over_500_lines_and_a_small_package_top():
    long = {name: n for name, path in _modules().items() if (n := len(open(path).read().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
    top = sorted(f for f in os.listdir(PKG) if f.endswith(".py"))
    assert len(top) <= 8, f"{len(top)} .py files directly under memfit/: {top}"
