"""What the benchmarks in tools/bench share: the repository root on sys.path and the line that
names the machine.

Import it before memfit, examples or tests: the scripts run as `python tools/bench/<name>.py`,
so this folder is sys.path[0] and the repository root is not, unless PYTHONPATH names it.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _cpu_model() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the part.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine(device: str | torch.device = "cpu") -> str:
    """One line naming where the figures come from: the processor (or CUDA device), cores
    visible, torch threads, torch version and today's date. Call it after set_num_threads."""
    if torch.device(device).type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = " ".join(s for s in ("CPU", platform.machine(), _cpu_model()) if s)
    return (f"{where}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, {datetime.date.today()}")
