"""What the benchmarks in tools/bench share: the repository root on sys.path, the line that
names the machine, step timing with variants alternated in one process, markdown tables, and
per-block checkpointing as a baseline.

Import it before memfit, examples or tests: the scripts run as `python tools/bench/<name>.py`,
so this folder is sys.path[0] and the repository root is not, unless PYTHONPATH names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from memfit.cost_models.probe_store import cpu_name  # noqa: E402 - after the root is on sys.path


def machine(device: str | torch.device = "cpu") -> str:
    """One line naming where the figures come from: the processor (or CUDA device), cores
    visible, torch threads, torch version and today's date. Call it after set_num_threads."""
    if torch.device(device).type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = " ".join(s for s in ("CPU", platform.machine(), cpu_name()) if s)
    return (f"{where}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, {datetime.date.today()}")


def sync(*trees) -> None:
    """Wait for the CUDA device of the first CUDA tensor among `trees` (inputs, kwargs): CUDA
    kernels run asynchronously, and without a sync the clock stops before the step ends."""
    import torch.utils._pytree as pytree

    for t in pytree.tree_leaves(trees):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            torch.cuda.synchronize(t.device)
            return


def step_time(fn, inputs: Sequence, loss_fn: Callable, params: Iterable[torch.Tensor] | None = None) -> float:
    """Seconds of one training step as the benchmarks time it: `loss_fn(fn(*inputs))` and
    backward (no optimizer step: none of their step times includes one).

    Gradients of `params` (default: `fn.parameters()`) are set to None before and after, outside
    the clock: every timed backward writes fresh gradients instead of adding to old ones, and
    a memfit.measure that follows starts from the same state as one that came first.
    """
    params = list(fn.parameters() if params is None else params)
    for p in params:
        p.grad = None
    sync(inputs)
    t0 = time.perf_counter()
    loss_fn(fn(*inputs)).backward()
    sync(inputs)
    dt = time.perf_counter() - t0
    for p in params:
        p.grad = None
    return dt


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds of each run per variant (`times`), their medians, and the medians' ratios to the
    baseline's (`ratio[baseline]` is 1)."""

    times: dict[str, list[float]]
    median: dict[str, float]
    ratio: dict[str, float]


def alternated(runs: Mapping[str, Callable[[], float]], repeats: int, baseline: str | None = None,
               warmup: int = 0) -> Timings:
    """Run every variant once per round, `repeats` rounds, after `warmup` untimed rounds.

    Each run returns its own seconds (`functools.partial(step_time, ...)`, or a run that keeps
    set-up off the clock). Rounds alternate the variants because the machines these figures
    come from are shared: a change of load then hits every variant alike, so the ratios hold
    where absolute times do not. `baseline` defaults to the first variant.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            times[k].append(run())
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median[next(iter(runs)) if baseline is None else baseline]
    return Timings(times, median, {k: v / base for k, v in median.items()})


def row(cells: Iterable) -> str:
    """One markdown table row; cells are formatted with str()."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: Sequence[str], rows: Iterable[Iterable] = ()) -> str:
    """A markdown table. With no rows: the header and rule alone, for scripts that print
    each row through row() as soon as it is measured."""
    return "\n".join([row(header), "|" + "---|" * len(header)] + [row(r) for r in rows])


class PerBlock:
    """torch.utils.checkpoint (non-reentrant) on the forward of each block, while active():
    the usual hand-written alternative that memfit's plans are compared against.
    `context_fn`: passed to checkpoint (torch's selective checkpointing per block)."""

    def __init__(self, blocks, context_fn=None):
        self.blocks = blocks
        self.kw = {"context_fn": context_fn} if context_fn is not None else {}

    @contextlib.contextmanager
    def active(self):
        import torch.utils.checkpoint as tuc
        olds = []
        for b in self.blocks:
            old = b.forward
            olds.append(old)

            def fwd(*a, _old=old, **k):
                return tuc.checkpoint(_old, *a, use_reentrant=False, **self.kw, **k)
            b.forward = fwd
        try:
            yield
        finally:
            for b, old in zip(self.blocks, olds):
                b.forward = old
