"""regions.py on a transformers 5 model captured by torch.export: GPT-2's blocks are found by
module path, outlined and checkpointed (the example pass) with bitwise-equal gradients."""

import copy
import importlib.util
import os

import pytest
import torch

from memfit.ir.capture import capture
from memfit.cost_models.measure import measure
from memfit.passes import PassContext, PassManager
from memfit.passes.infra.regions import module_regions

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpt2_blocks_checkpointed():
    spec = importlib.util.spec_from_file_location("memfit_example_custom_pass", os.path.join(ROOT, "examples", "custom_pass.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).train()  # dropout 0.1 on
    ids = torch.randint(0, 64, (2, 8))
    ref = copy.deepcopy(model)
    cap = capture(model, (ids,), dynamic=False)
    regions = module_regions(cap.gm, "transformer.h.*")
    assert list(regions) == ["transformer.h.0", "transformer.h.1"]
    res = PassManager("checkpoint-blocks{pattern=transformer.h.*}", verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats == {"checkpoint-blocks.checkpointed": 2}
    assert set(res.gm.state_dict()) == set(model.state_dict())
    torch.manual_seed(1)
    ref(ids).logits.square().mean().backward()
    torch.manual_seed(1)
    res.gm(ids)[0].square().mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 1e-5
    assert measure(res.gm, example_inputs=(ids,)).saved_activations < \
        measure(ref, example_inputs=(ids,)).saved_activations / 3
