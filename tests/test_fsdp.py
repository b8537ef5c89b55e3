"""memfit under FSDP2, what one process can check (tests/test_distributed.py runs 2 gloo ranks):
FSDP units found in the model, recomputed regions kept inside one unit, the graph split at the
units computing exactly what it computed before, the per-rank cost model (sharded parameters,
gradients, optimizer state; FSDP2's gather and reduction buffers), and the refusals."""

import copy

import pytest
import torch

import memfit
from memfit.ir.fsdp import default_units, node_units, split_units
from tests.models import Block


def _blocks(d=32, n=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(d, heads=2) for _ in range(n)], torch.nn.Linear(d, 8))


def _gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=48, n_head=2, vocab_size=101, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def test_default_units_are_the_repeated_blocks():
    assert default_units(_blocks()) == ("0", "1", "2")           # not the lone Linear, not the MLPs inside
    assert default_units(_gpt2()) == ("transformer.h.0", "transformer.h.1", "transformer.h.2")
    # layers of one class in a list are units too (each Linear), a lone module is not
    assert default_units(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))) == ("0", "2")
    assert default_units(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == ()


def _loss(y):
    return lambda out: torch.nn.functional.mse_loss(out, y)


def test_recomputed_regions_stay_inside_one_unit():
    from memfit.planning.checkpoint import discover_runs, price_units
    from memfit.ir.fx_utils import call_nodes

    x, y = torch.randn(8, 16, 32), torch.randn(8, 16, 8)
    cap = memfit.capture(_blocks(), (x,), dynamic=False)
    from memfit.cost_models.memory import analyze_step
    analyze_step(cap, loss_fn=_loss(y), symbolic=False)
    units = price_units(cap.gm, discover_runs(cap.gm, call_nodes(cap.gm)))
    fsdp = ("0", "1", "2")
    from memfit.planning.checkpoint import apply_spans

    everything = ((0, len(units)),)
    whole, _ = apply_spans(cap.gm, units, everything)
    cut, made = apply_spans(cap.gm, units, everything, fsdp_units=fsdp)
    assert [node_units(whole, n, fsdp) for n in _regions(whole)] == [{"0", "1", "2"}]
    assert [node_units(cut, n, fsdp) for n in made] == [{"0"}, {"1"}, {"2"}]
    # a plan made for FSDP2 recomputes inside units; the planner's own spans are cut the same way
    om = memfit.optimize(_blocks(), "85%", example_inputs=(x,), optimizer="adamw", loss_fn=_loss(y),
                         techniques="checkpoint", data_parallel="fsdp", world_size=2, time_model="roofline")
    spans = [node_units(om.graph_module, n, fsdp) for n in _regions(om.graph_module)]
    assert spans and all(len(s) == 1 for s in spans), spans


def _regions(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "gm")]


@pytest.mark.parametrize("family", ["blocks", "gpt2"])
def test_split_graph_computes_what_it_did(family):
    """The split at the units (what memfit.fully_shard does before sharding), run without
    FSDP: the same loss and gradients bit for bit as the optimized module it came from."""
    if family == "blocks":
        model, x, y = _blocks(), torch.randn(8, 16, 32), torch.randn(8, 16, 8)
        kwargs, loss = {}, _loss(y)
        call = lambda m: loss(m(x))  # noqa: E731
    else:
        model, x = _gpt2(), torch.randint(0, 101, (2, 16))
        kwargs, loss = {"labels": x}, None
        call = lambda m: m(x, labels=x).loss  # noqa: E731
    om = memfit.optimize(model, "90%", example_inputs=(x,), example_kwargs=kwargs, optimizer="adamw", loss_fn=loss,
                         techniques="checkpoint,sdpa", data_parallel="fsdp", world_size=2)
    ref = copy.deepcopy(om)
    calls = split_units(om, om._memfit_captured.fsdp_units)
    assert [c.path for c in calls] == list(om._memfit_captured.fsdp_units)
    # export graphs read parameters with get_attr: the unit call reads them itself, after FSDP2
    # gathers them; symbolic_trace graphs call leaf modules, which read their own
    assert (sum(len(c.slots) for c in calls) > 0) == (family == "gpt2")
    out = []
    for m in (om, ref):
        torch.manual_seed(1)
        lo = call(m)
        lo.backward()
        out.append((lo.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    # the graph module keeps no parameter of its own: FSDP2 replaces them on the model's modules
    own = {id(p) for p in om.graph_module.parameters()}
    assert family == "blocks" or not own & {id(p) for p in model.transformer.h.parameters()}


def test_per_rank_prediction_shards_the_fixed_bytes():
    x, y = torch.randn(2, 8, 96), torch.randn(2, 8, 8)
    model = _blocks(96)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    plain = memfit.plan(model, example_inputs=(x,), optimizer="adamw", loss_fn=_loss(y), symbolic=False)
    peaks = {}
    for world in (1, 2, 4):
        p = memfit.plan(model, example_inputs=(x,), optimizer="adamw", loss_fn=_loss(y), symbolic=False,
                        data_parallel="fsdp", world_size=world)
        peaks[world] = p.peak_bytes
        assert any(f"FSDP2 over {world} ranks" in n for n in p.notes), p.notes
        # AdamW's two states, one shard of each parameter
        assert abs(p.categories["optimizer_state"] - 2 * n_bytes / world) <= 0.02 * n_bytes
    # parameters, gradients and optimizer state are most of this step: sharding them lowers it
    assert peaks[4] < peaks[2] < peaks[1]
    # one rank alone still gathers each unit beside its shard, and reduces its gradients through
    # a buffer: FSDP2 on one rank holds more than the model itself
    assert peaks[1] > plain.peak_bytes


def test_techniques_fsdp2_cannot_run_are_refused():
    x, y = torch.randn(4, 8, 32), torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="cannot run under FSDP2"):
        memfit.optimize(_blocks(), "80%", example_inputs=(x,), loss_fn=_loss(y), techniques="checkpoint,quantize",
                        data_parallel="fsdp", world_size=2)
    # a module planned without data_parallel='fsdp' that uses one of them
    om = memfit.optimize(_blocks(), None, example_inputs=(x,), loss_fn=_loss(y),
                         passes="quantize-activations{min_bytes=1}")
    with pytest.raises(memfit.MemfitError, match="quantized or offloaded saved activations"):
        memfit.fully_shard(om)
    with pytest.raises(memfit.MemfitError, match="takes the module memfit.optimize returned"):
        memfit.fully_shard(_blocks())
    # FSDP2 options that make the step differ from its plan
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    om = memfit.optimize(_blocks(), None, example_inputs=(x,), loss_fn=_loss(y), data_parallel="fsdp", world_size=2)
    with pytest.raises(memfit.MemfitError, match="param_dtype=torch.bfloat16"):
        memfit.fully_shard(om, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.raises(memfit.MemfitError, match="CPUOffloadPolicy keeps the shards on the host"):
        memfit.fully_shard(om, offload_policy=CPUOffloadPolicy())
    with pytest.raises(memfit.MemfitError, match="reshard_after_forward other than True"):
        memfit.fully_shard(om, reshard_after_forward=False)
