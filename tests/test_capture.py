import pytest
import torch
from torch import nn

from memfit.ir.capture import capture, node_module_path
from memfit.errors import CaptureError
from tests.models import MLP, Block


def _all_tensor_nodes_have_val(gm):
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_module", "call_method", "placeholder"):
            if n.op == "placeholder" or n.users:
                assert "val" in n.meta, n.format_node()


def test_plain_module_takes_symbolic_trace_fast_path():
    m = MLP()
    cap = capture(m, (torch.randn(4, 64),))
    assert cap.method == "symbolic_trace"
    _all_tensor_nodes_have_val(cap.gm)
    out = cap.unflatten_output(cap.gm(*cap.flat_inputs()))
    torch.testing.assert_close(out, m(torch.randn(4, 64)) * 0 + out)  # structure: a tensor
    assert isinstance(out, torch.Tensor) and out.shape == (4, 10)


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[-1] == 8:  # branch on a shape: symbolic_trace cannot, export can
            return self.lin(x)
        return -self.lin(x)


def test_control_flow_falls_back_to_export_and_shares_parameters():
    m = ShapeBranch()
    x = torch.randn(2, 8).abs()
    cap = capture(m, (x,))
    assert cap.method == "export"
    _all_tensor_nodes_have_val(cap.gm)
    # same tensor objects: state_dicts are interchangeable and nothing was copied
    assert cap.gm.lin.weight is m.lin.weight
    assert set(cap.gm.state_dict()) == set(m.state_dict())
    torch.testing.assert_close(cap.unflatten_output(cap.gm(x)), m(x))


def test_export_keeps_module_paths():
    cap = capture(Block(), (torch.randn(2, 16, 64),), method="export")
    paths = {node_module_path(n) for n in cap.gm.graph.nodes if n.op == "call_function"}
    assert {"ln1", "qkv", "mlp.0"} <= paths


class Untraceable(nn.Module):
    def forward(self, x):
        return torch.ones(int(x.sum().item()) % 5 + 1) * x.numel()  # output shape depends on data


def test_untraceable_model_raises_capture_error_naming_module_and_advice():
    with pytest.raises(CaptureError) as e:
        capture(Untraceable(), (torch.randn(3),))
    msg = str(e.value)
    assert "Untraceable" in msg and "What to try" in msg


def test_bad_arguments():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))
    with pytest.raises(CaptureError, match="unknown capture method"):
        capture(MLP(), (torch.randn(2, 64),), method="jit")


def test_capture_does_not_touch_model_state():
    from tests.models import ConvBN
    m = ConvBN().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for method in ("symbolic_trace", "export"):
        capture(m, (torch.randn(2, 3, 16, 16),), method=method)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "resnet", "convnext"])
def test_transformers_models_capture_through_export(name):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=64, n_head=4, use_cache=False, vocab_size=500, bos_token_id=0, eos_token_id=0))
        x = (torch.randint(0, 500, (2, 16)),)
    elif name == "bert":
        m = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=64,
                                                           num_attention_heads=4, intermediate_size=128, vocab_size=500))
        x = (torch.randint(0, 500, (2, 16)),)
    elif name == "vit":
        m = transformers.ViTModel(transformers.ViTConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                                         intermediate_size=128, image_size=32, patch_size=8))
        x = (torch.randn(2, 3, 32, 32),)
    elif name == "resnet":
        m = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                               depths=[1, 1]))
        x = (torch.randn(2, 3, 32, 32),)
    else:
        m = transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                                   num_stages=2))
        x = (torch.randn(2, 3, 32, 32),)
    cap = capture(m, x)
    assert cap.method == "export"
    _all_tensor_nodes_have_val(cap.gm)
    torch.manual_seed(1)
    out = cap.unflatten_output(cap.gm(*cap.flat_inputs()))
    torch.manual_seed(1)  # same dropout masks
    ref = m(*x)
    first = out[0] if not isinstance(out, torch.Tensor) else out
    torch.testing.assert_close(first, ref[0])


def test_export_with_keyword_inputs_keeps_dynamic_dims():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(cfg).train()
    ids = torch.randint(0, 100, (2, 16))
    cap = capture(model, (ids,), {"attention_mask": torch.ones(2, 16, dtype=torch.long)})
    assert cap.method == "export"
    out = cap.unflatten_output(cap.gm(*cap.flat_inputs((ids,), {"attention_mask": torch.ones(2, 16, dtype=torch.long)})))
    assert out.last_hidden_state.shape == (2, 16, 32)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_int64_batch_into_a_linear_is_refused_as_eager_refuses_it(method):
    """FakeTensor's matmul kernels accept mixed dtypes where eager raises; plan and optimize
    used to plan (and return a module for) a step that cannot run."""
    import memfit
    from memfit.errors import CaptureError

    m = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x = torch.randint(0, 5, (2, 8))
    with pytest.raises(RuntimeError, match="same dtype"):
        m(x)
    for f in (memfit.plan, memfit.optimize):
        with pytest.raises(CaptureError, match=r"aten::addmm in module '0' .*float32 and int64.*x\.float\(\)") as ei:
            f(m, None, example_inputs=(x,), capture_method=method) if f is memfit.plan else f(m, "50%", example_inputs=(x,))
        assert "While executing" not in str(ei.value)
    memfit.plan(m, None, example_inputs=(x.float(),), capture_method=method)   # the same model, given floats
