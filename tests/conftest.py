import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Kernel-scratch probes are cached on disk; the suite keeps its own cache so it never
# writes the user's home and always probes this machine afresh. Set at import, before any
# test plans a model.
_PROBE_CACHE = tempfile.TemporaryDirectory(prefix="memfit-test-cache-")
os.environ["MEMFIT_CACHE_DIR"] = _PROBE_CACHE.name

# Two CPU cores are shared by the whole suite; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
