"""memfit under torch.distributed, on 2 gloo ranks spawned on this machine (a file store, no
network): DDP around an optimized module trains as plain DDP does; a plan made with
data_parallel="ddp" holds DDP's gradient buckets and is measured through DDP; the step in
backward is refused under DDP; FSDP2 is refused in both orders with one clear error instead of
training nothing (docs/distributed.md)."""

import copy
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
DEADLINE_S = 240


def _model():
    from tests.models import Block

    torch.manual_seed(0)
    return torch.nn.Sequential(Block(32, heads=2), Block(32, heads=2), torch.nn.Linear(32, 8))


def _param_bytes() -> int:
    return sum(p.numel() * p.element_size() for p in _model().parameters())


def _ranks(rank, store_path, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    res = {}
    try:
        import memfit
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP: the optimized module (recompute, planned for a budget) against the model itself
        model = _model()
        ref = copy.deepcopy(model)
        x = torch.randn(16, 32, 32, generator=torch.Generator().manual_seed(10 + rank))
        y = torch.randn(16, 32, 8, generator=torch.Generator().manual_seed(20 + rank))

        def loss_fn(out):
            return torch.nn.functional.mse_loss(out, y)

        # recompute alone is bitwise (the same kernels run again); sdpa-attention is exact to
        # rounding, which Adam's m / sqrt(v) turns into lr-sized steps where a gradient is ~0
        om = memfit.optimize(model, "80%", example_inputs=(x,), optimizer="adamw", loss_fn=loss_fn,
                             techniques="checkpoint")
        res["decisions"] = [d.action for d in om.memfit_plan.decisions]
        runs = {}
        for name, net in (("memfit", om), ("plain", ref)):
            ddp = DDP(net)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                loss_fn(ddp(x)).backward()
                opt.step()
            runs[name] = [p.detach().clone() for p in net.parameters()]
        res["max_rel"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(runs["memfit"], runs["plain"]))
        res["moved"] = all(not torch.equal(a, b) for a, b in zip(runs["memfit"], [p.detach() for p in _model().parameters()]))

        # DDP's gradient buckets in the per-rank plan: planned for a budget that needs
        # recompute, then measured through DDP (constructed inside the measured window)
        om = memfit.optimize(_model(), "85%", example_inputs=(x,), optimizer="adamw", loss_fn=loss_fn,
                             techniques="checkpoint", data_parallel="ddp")
        plan = om.memfit_plan
        through_ddp = memfit.measure(om, example_inputs=(x,), optimizer="adamw", loss_fn=loss_fn, data_parallel="ddp")
        alone = memfit.measure(om, example_inputs=(x,), optimizer="adamw", loss_fn=loss_fn)
        res["ddp_plan"] = [plan.peak_bytes, plan.budget_bytes, through_ddp.peak_bytes, alone.peak_bytes,
                           [d.action for d in plan.decisions]]
        # the step in backward would use each rank's own gradients: refused
        try:
            memfit.optimize(_model(), "90%", example_inputs=(x,), loss_fn=loss_fn,
                            optimizer=torch.optim.AdamW(_model().parameters()),
                            techniques=["checkpoint", "step_in_backward"], data_parallel="ddp")
            res["fused_ddp"] = "no error"
        except ValueError as e:
            res["fused_ddp"] = str(e)
        m = _model()
        fused, _opt = memfit.optimize(m, "95%", example_inputs=(x,), loss_fn=loss_fn,
                                      optimizer=torch.optim.AdamW(m.parameters()),
                                      techniques=["checkpoint", "step_in_backward"])
        try:
            fused(x)
            res["fused_run"] = "no error"
        except RuntimeError as e:
            res["fused_run"] = str(e)

        # FSDP2, both orders
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        om = memfit.optimize(_model(), None, example_inputs=(x,))
        for block in list(om.children())[:2]:
            fully_shard(block, mesh=mesh)
        fully_shard(om, mesh=mesh)
        try:
            om(x)
            res["after"] = "no error"
        except memfit.MemfitError as e:
            res["after"] = str(e)
        sharded = _model()
        for block in list(sharded.children())[:2]:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        try:
            memfit.optimize(sharded, "70%", example_inputs=(x,))
            res["before"] = "no error"
        except memfit.MemfitError as e:
            res["before"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - reported to the parent
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_ddp_composes_and_fsdp2_is_refused_in_both_orders(tmp_path):
    ctx = mp.start_processes(_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {DEADLINE_S} s")
    for rank in range(WORLD):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in res, res["error"]
        assert "recompute" in res["decisions"]
        assert res["max_rel"] == 0.0 and res["moved"], res
        assert "sharded now" in res["after"] and "training would update nothing" in res["after"], res["after"]
        pred, budget, meas, alone, actions = res["ddp_plan"]
        assert "recompute" in actions and meas <= budget, res["ddp_plan"]
        # predicted to within 0.1% through DDP, where the plan without its buckets would be
        # a whole gradient copy low (alone)
        assert abs(pred - meas) <= 1e-3 * meas and meas - alone >= 0.9 * _param_bytes(), res["ddp_plan"]
        assert "cannot train under data_parallel='ddp'" in res["fused_ddp"], res["fused_ddp"]
        assert "before DDP or FSDP reduces it over the 2 ranks" in res["fused_run"], res["fused_run"]
        assert res["before"].startswith("CaptureError") and "wrapped by fully_shard" in res["before"], res["before"]
