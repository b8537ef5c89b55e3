# lit configuration of memfit's FileCheck tests: `lit -q tests/lit` (tools/run_tests.sh).
# Each test is a Python file with one `# RUN: %python %s | filecheck %s` line.
import os
import sys

import lit.formats

config.name = "memfit"  # noqa: F821 - `config` is provided by lit
config.test_format = lit.formats.ShTest(execute_external=False)  # noqa: F821
config.suffixes = [".py"]  # noqa: F821
config.excludes = ["lit.cfg.py", "lit_helpers.py", "__init__.py", "__pycache__", "Output"]  # noqa: F821
config.test_source_root = os.path.dirname(os.path.abspath(__file__))  # noqa: F821
config.test_exec_root = config.test_source_root  # noqa: F821

root = os.path.dirname(os.path.dirname(config.test_source_root))  # noqa: F821
config.substitutions.append(("%python", sys.executable))  # noqa: F821
paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
config.environment["PYTHONPATH"] = os.pathsep.join(paths)  # noqa: F821
# Kernels run on Triton's CPU interpreter here; two cores are shared by the whole suite.
config.environment["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "1")  # noqa: F821
config.environment["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")  # noqa: F821
# Kernel-scratch probes cache on disk: keep the tests' cache out of the user's home.
config.environment["MEMFIT_CACHE_DIR"] = os.environ.get(  # noqa: F821
    "MEMFIT_CACHE_DIR", os.path.join(config.test_exec_root, "Output", "probe-cache"))  # noqa: F821
for var in ("HOME", "TMPDIR", "PATH"):
    if var in os.environ:
        config.environment[var] = os.environ[var]  # noqa: F821
