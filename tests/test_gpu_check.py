"""tools/gpu_check.sh in its no-GPU mode (how CI runs it): it stops before installing or running
anything, says why in one line, and exits 3."""

import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the check would run for real")
def test_gpu_check_without_a_gpu_fails_clearly(tmp_path):
    results = tmp_path / "gpu_results.md"
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(results)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3
    assert r.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was installed or run"]
    assert not results.exists()
