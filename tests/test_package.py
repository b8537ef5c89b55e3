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
