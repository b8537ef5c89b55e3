"""What the benchmarks in tools/bench share: the repository root on sys.path.

Import it before memfit, examples or tests: the scripts run as `python tools/bench/<name>.py`,
so this folder is sys.path[0] and the repository root is not, unless PYTHONPATH names it.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

