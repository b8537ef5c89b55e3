# RUN: %python %s | filecheck %s
"""FileCheck test of the graph memfit.fully_shard runs: one call per FSDP unit in model order,
the unit's parameters read inside its call (after FSDP2 gathers them), recomputed regions inside
the units, the root's parameters read live where they are used."""
import re

import torch

import memfit
from memfit.ir.fsdp import split_units
from memfit.testing import run

torch.set_num_threads(1)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def calls(code):
    for line in code.splitlines():
        m = re.search(r"(memfit_\w+)\(", line)
        if m and ("fsdp" in m.group(1) or "live" in m.group(1) or "checkpoint" in m.group(1)):
            print(m.group(1))


@run
def gpt2_units():
    ids = torch.randint(0, 64, (2, 16))
    om = memfit.optimize(gpt2(), "90%", example_inputs=(ids,), example_kwargs={"labels": ids}, optimizer="adamw",
                         techniques="checkpoint", data_parallel="fsdp", world_size=2, time_model="roofline")
    made = split_units(om, om._memfit_captured.fsdp_units)
    print("top")
    calls(om.graph_module.code)
    print("attr", sum(1 for n in om.graph_module.graph.nodes if n.op == "get_attr"
                      and str(n.target).startswith("transformer.h.")))
    for c in made:
        print("unit", c.path, "slots", len(c.slots))
        calls(c.child.code)
# CHECK-LABEL: TEST: gpt2_units
# CHECK: top
# CHECK-NEXT: memfit_runtime_fsdp_memfit_live_transformer_wte_weight
# CHECK-NEXT: memfit_runtime_fsdp_memfit_live_transformer_wpe_weight
# CHECK-NEXT: memfit_runtime_fsdp_memfit_live_transformer_ln_f_weight
# CHECK-NEXT: memfit_runtime_fsdp_memfit_live_transformer_ln_f_bias
# CHECK-NEXT: memfit_runtime_fsdp_memfit_live_lm_head_weight
# CHECK-NEXT: memfit_runtime_fsdp_memfit_fsdp_unit_transformer_h_0
# CHECK-NEXT: memfit_runtime_fsdp_memfit_fsdp_unit_transformer_h_1
# CHECK-NEXT: memfit_runtime_checkpoint_memfit_checkpoint_memfit_ckpt_2
# CHECK-NEXT: attr 0
# CHECK-NEXT: unit transformer.h.0 slots 12
# CHECK-NEXT: memfit_runtime_checkpoint_memfit_checkpoint_memfit_ckpt_0
# CHECK-NEXT: unit transformer.h.1 slots 12
# CHECK-NEXT: memfit_runtime_checkpoint_memfit_checkpoint_memfit_ckpt_1
