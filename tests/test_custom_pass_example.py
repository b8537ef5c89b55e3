"""examples/custom_pass.py: the "checkpoint every matching block" pass from docs/custom-passes.md
works from Python (PassManager) and from `memfit opt`; gradients equal the unmodified model's and
measured saved activations fall."""

import copy
import importlib.util
import os

import pytest
import torch

from memfit.ir.capture import capture
from memfit.cli import main
from memfit.cost_models.measure import measure
from memfit.passes import PassContext, PassManager, get_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "custom_pass.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("memfit_example_custom_pass", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pass_part_is_under_40_lines():
    text = open(EXAMPLE).read()
    pass_part = text[text.index("class Checkpointed"):text.index("# ------")]
    assert len([line for line in pass_part.splitlines() if line.strip()]) < 40


def _flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_gradients_equal_and_saved_bytes_fall(example, method):
    model, inputs = example.make(batch_size=4, seq=16, d=32, depth=3)
    assert get_pass("checkpoint-blocks") is example.CheckpointBlocks
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, inputs, method=method)
    res = PassManager("checkpoint-blocks{pattern=blocks.*}", verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats == {"checkpoint-blocks.checkpointed": 3}
    gm = res.gm
    assert [type(gm.get_submodule(f"blocks_{i}")).__name__ for i in range(3)] == ["Checkpointed"] * 3
    assert set(gm.state_dict()) == set(model.state_dict())            # checkpoints load both ways
    for k, v in model.state_dict().items():                           # the user's model untouched
        assert torch.equal(v, state[k])

    # Training-mode dropout (p=0.1) is on: same seed, so the same masks in both runs and in
    # the recomputation.
    torch.manual_seed(1)
    reference(*inputs).square().mean().backward()
    torch.manual_seed(1)
    gm(*inputs)[0].square().mean().backward()
    ref, got = _flat_grads(reference), _flat_grads(model)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5

    before = measure(reference, example_inputs=inputs).saved_activations
    after = measure(gm, example_inputs=inputs).saved_activations
    # Only each block's input is kept (4 x 16 x 32 fp32 = 8 KiB per block) plus the head's input.
    assert after < before / 4, (before, after)


def test_no_match_is_a_diagnostic(example):
    model, inputs = example.make(depth=1)
    cap = capture(model, inputs)
    res = PassManager([example.CheckpointBlocks(pattern="layers.*")]).run(cap.gm, PassContext(captured=cap))
    assert not res.modified and res.stats == {"checkpoint-blocks.checkpointed": 0}
    assert [str(d) for d in res.diagnostics] == ["info: [checkpoint-blocks]: no module matches 'layers.*'"]


def test_memfit_opt_runs_the_example(capsys):
    argv = ["opt", f"{EXAMPLE}:make", "-D", "depth=2", "--passes", "checkpoint-blocks{pattern=blocks.*}",
            "--verify", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "%blocks_0 = @blocks_0<Checkpointed>(%x) : f32[4, 16, 32]" in out
    assert "graph @blocks_1.region {" in out
    assert "// stats: checkpoint-blocks.checkpointed=2" in out
    line = next(x for x in out.splitlines() if x.startswith("// predicted saved activations:"))
    before, after = line.split(":")[1].split(" before, ")
    assert float(after.split()[0]) < float(before.split()[0]) / 4  # both in KiB here
    assert "// verified: 1 pass(es)" in out


def test_docs_show_the_example_code():
    doc = open(os.path.join(ROOT, "docs", "custom-passes.md")).read()
    code = open(EXAMPLE).read()
    start, end = "@register_pass\n@dataclass(frozen=True)\nclass CheckpointBlocks", "diagnostics=diags)\n"
    block = code[code.index(start):code.index(end) + len(end)]
    assert block in doc


def test_memfit_optimize_with_explicit_pipeline(example):
    import memfit

    model, inputs = example.make(depth=3)
    reference = copy.deepcopy(model)
    om = memfit.optimize(model, example_inputs=inputs, passes=["checkpoint-blocks{pattern=blocks.*}"])
    assert set(om.state_dict()) == set(model.state_dict())
    torch.manual_seed(1)
    reference(*inputs).square().mean().backward()
    torch.manual_seed(1)
    om(*inputs).square().mean().backward()
    ref, got = _flat_grads(reference), _flat_grads(model)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert measure(om, example_inputs=inputs).saved_activations < \
        measure(reference, example_inputs=inputs).saved_activations / 4
