"""Scratch memory a process-group backend allocates through torch inside its collectives.

gloo allocates temporaries in torch's CPU allocator while it gathers or reduces (a copy the size
of the all-gather's output, of the reduce-scatter's input, partly on its worker threads); NCCL
works in its own buffers, outside torch's allocator. FSDP2's per-rank peak includes the former
(memfit.cost_models.data_parallel), so it is measured, not assumed: `python -m
memfit.cost_models.collective_probe` runs 2 gloo ranks on this machine (a file store, no
network) and prints, per collective, the peak bytes allocated during the call above what
was allocated before it, as a fraction of the large buffer's bytes. `collective_scratch`
runs it once per backend and torch version and caches the result with the kernel probes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

PROBE_BYTES = 1 << 20          # the large buffer of each collective
TIMEOUT_S = 120


def backend_for(device: torch.device) -> str:
    """The initialized process group's backend, else the one FSDP2 would use on `device` (a
    model on the meta device is taken to be planned for GPUs: NCCL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return "nccl" if device.type in ("cuda", "meta") else "gloo"


def collective_scratch(backend: str) -> tuple[dict, str]:
    """({"all_gather": fraction of the output, "reduce_scatter": fraction of the input}, note)."""
    from memfit.cost_models.probe_store import lookup
    from memfit.cost_models.probes import _store

    if backend != "gloo":
        return ({"all_gather": 0.0, "reduce_scatter": 0.0},
                f"{backend}: collectives taken to allocate nothing in torch's allocator (not probed)")
    key = f"collective_scratch|{backend}|all_gather_single,reduce_scatter_single|torch-{torch.__version__}"
    entry = lookup(key)
    if entry is None:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            r = subprocess.run([sys.executable, "-m", "memfit.cost_models.collective_probe", d],
                               capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        if r.returncode != 0:
            return ({"all_gather": 0.0, "reduce_scatter": 0.0},
                    f"{backend}: collective scratch not measured (the probe failed: "
                    f"{(r.stderr.strip().splitlines() or ['?'])[-1]}); taken as 0")
        fractions = json.loads(r.stdout.strip().splitlines()[-1])
        entry = {"kind": "collective_scratch", **fractions}
        _store(key, entry)
    return ({"all_gather": float(entry["all_gather"]), "reduce_scatter": float(entry["reduce_scatter"])},
            f"{backend}: collective scratch probed ({entry['all_gather']:.2f} of an all-gather's output, "
            f"{entry['reduce_scatter']:.2f} of a reduce-scatter's input)")


def _rank(rank: int, store: str, out: str) -> None:
    import warnings

    import torch.distributed as dist

    from memfit.cost_models.allocations import cpu_allocations, profiler_peak

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    n = PROBE_BYTES // 4
    res = {}
    try:
        big, small = torch.empty(n), torch.ones(n // 2)
        # the calls FSDP2 makes (torch 2.13's DefaultAllGather, DefaultReduceScatter)
        dist.all_gather_single(big, small)            # warm-up (connections, first-use buffers)
        with cpu_allocations() as prof:
            dist.all_gather_single(big, small)
        res["all_gather"] = profiler_peak(prof) / (big.numel() * 4)
        big.fill_(1.0)
        dist.reduce_scatter_single(small, big)
        with cpu_allocations() as prof:
            dist.reduce_scatter_single(small, big)
        res["reduce_scatter"] = profiler_peak(prof) / (big.numel() * 4)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)


def main(argv) -> int:
    import torch.multiprocessing as mp

    d = argv[1]
    out = os.path.join(d, "result.json")
    mp.spawn(_rank, args=(os.path.join(d, "store"), out), nprocs=2, join=True)
    with open(out) as f:
        print(json.dumps(json.load(f)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
