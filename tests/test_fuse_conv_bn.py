"""fuse-conv-bn: rewrite counts per model, numerics vs the unmodified model, saved bytes."""

import dataclasses

import pytest
import torch
from torch import nn

from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.passes import PassContext, PassManager, get_pass, parse_pipeline
from tests.models import ConvBN


def freeze_bn(model):
    """The transfer-learning setting: model in training mode, BatchNorm frozen (eval)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1, 0.2)
                    m.bias.normal_(0, 0.2)
    return model


def run_pass(cap, text="fuse-conv-bn"):
    return PassManager(text).run(cap.gm, PassContext(captured=cap))


def grads_of(fn, params, inputs):
    for p in params:
        p.grad = None
    out = fn(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out = getattr(out, "last_hidden_state", out)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    gs = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return out.detach(), gs


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_exact(model, cap, gm, inputs):
    params = [p for p in model.parameters() if p.requires_grad]
    ref_out, ref_g = grads_of(model, params, inputs)
    out, g = grads_of(gm, params, inputs)
    assert rel(out, ref_out) < 1e-5
    assert g.numel() == ref_g.numel()
    assert rel(g, ref_g) < 1e-5


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2, bias=True), nn.BatchNorm1d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv1d(8, 8, 3, groups=4, stride=2, bias=False), nn.BatchNorm1d(8))

    def forward(self, x):
        return self.b(self.a(x)).mean(-1)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), groups=2)
        self.bn = nn.BatchNorm3d(4)
        self.conv2 = nn.Conv3d(4, 4, 3, padding="same", bias=False)
        self.bn2 = nn.BatchNorm3d(4, affine=False)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn(self.conv(x))))).sum((2, 3, 4))


class SharedConvOut(nn.Module):
    """The conv output is used twice: fusing cannot free it, so the pass skips it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_convbn_frozen_bn(method):
    model = freeze_bn(ConvBN())
    x = torch.randn(2, 3, 9, 7)
    cap = capture(model, (x,), method=method)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    res = run_pass(cap)
    assert res.stats["fuse-conv-bn.tune"] == 3 == n_bn
    assert res.stats["fuse-conv-bn.skipped"] == 0 and not res.diagnostics
    code = res.gm.code
    assert "batch_norm" not in code and "conv_bn" in code
    check_exact(model, cap, res.gm, (x,))


@pytest.mark.parametrize("model_cls,shape,count", [(Conv1dNet, (3, 3, 17), 2), (Conv3dNet, (2, 2, 3, 5, 6), 2)])
@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_conv1d_conv3d_grouped(model_cls, shape, count, method):
    model = freeze_bn(model_cls())
    x = torch.randn(*shape)
    cap = capture(model, (x,), method=method, dynamic=False)
    res = run_pass(cap)
    assert res.stats["fuse-conv-bn.tune"] == count
    check_exact(model, cap, res.gm, (x,))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_train_mode_bn_left_alone(method):
    model = ConvBN().train()
    x = torch.randn(2, 3, 8, 8)
    cap = capture(model, (x,), method=method, dynamic=False)
    res = run_pass(cap)
    assert res.stats["fuse-conv-bn.tune"] == 0
    assert res.stats["fuse-conv-bn.train_mode_bn"] == 3
    assert not res.modified
    assert len(res.diagnostics) == 3 and all("training mode" in d.message for d in res.diagnostics)


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_shared_conv_output_skipped(method):
    model = freeze_bn(SharedConvOut())
    cap = capture(model, (torch.randn(2, 3, 5, 5),), method=method, dynamic=False)
    res = run_pass(cap)
    assert res.stats["fuse-conv-bn.tune"] == 0 and res.stats["fuse-conv-bn.skipped"] == 1
    assert "other users" in res.diagnostics[0].message


def test_saved_activations_fall_by_the_conv_outputs():
    model = freeze_bn(ConvBN(c=16))
    B, H, W = 4, 16, 16
    x = torch.randn(B, 3, H, W)
    cap = capture(model, (x,), method="export", dynamic=False)
    before = analyze_step(cap, symbolic=False).totals["saved_activations"]
    res = run_pass(cap)
    after = analyze_step(dataclasses.replace(cap, gm=res.gm), symbolic=False).totals["saved_activations"]
    conv_out = B * 16 * H * W * 4
    # three conv outputs no longer saved; the fold keeps (C_out,) vectors only (not W * s)
    assert before - after >= 3 * conv_out - 3 * 4 * 16 * 4
    assert after < before


def test_no_stale_fold_and_model_untouched():
    model = freeze_bn(ConvBN())
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, (x,), method="export", dynamic=False)
    res = run_pass(cap)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # an optimizer step and new statistics, done on the user's model
        model.stem[0].weight.mul_(1.5)
        model.stem[1].running_var.mul_(3.0)
        model.body[1].weight.add_(0.3)
    assert rel(res.gm(x)[0], model(x)) < 1e-5


def test_symbolic_graph_honours_later_train_switch():
    model = freeze_bn(ConvBN())
    x = torch.randn(4, 3, 8, 8)
    cap = capture(model, (x,), method="symbolic_trace", dynamic=False)
    res = run_pass(cap)
    assert res.stats["fuse-conv-bn.tune"] == 3
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    ref_model = ConvBN()
    ref_model.load_state_dict(model.state_dict())
    ref_model.train()
    assert rel(res.gm(x)[0], ref_model(x)) < 1e-5
    assert torch.allclose(model.stem[1].running_mean, ref_model.stem[1].running_mean)


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_deploy_folds_once(method):
    model = freeze_bn(ConvBN()).eval()
    x = torch.randn(2, 3, 8, 8)
    cap = capture(model, (x,), method=method, dynamic=False)
    res = run_pass(cap, "fuse-conv-bn{deploy=true}")
    assert res.stats["fuse-conv-bn.folded"] == 3 and res.stats["fuse-conv-bn.tune"] == 0
    with torch.no_grad():
        expected = model(x)
        assert rel(res.gm(x)[0], expected) < 1e-5
        model.stem[1].running_var.mul_(3.0)  # deploy folded once: later changes do not reach it
        assert rel(res.gm(x)[0], expected) < 1e-5


def test_text_form_and_registry():
    (p,) = parse_pipeline("fuse-conv-bn{deploy=true}")
    assert p.deploy is True and p.to_text() == "fuse-conv-bn{deploy=true}"
    assert get_pass("fuse-conv-bn") is type(p)


def test_hf_resnet_eval_bn():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="bottleneck")
    model = freeze_bn(transformers.ResNetModel(cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = capture(model, (x,), dynamic=False)
    res = run_pass(cap)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # embedder 1 + stage 1 (3 convs, identity shortcut: 8 -> 8 channels, stride 1)
    # + stage 2 (3 convs + projection shortcut)
    assert res.stats["fuse-conv-bn.tune"] == 8 == n_bn
    check_exact(model, cap, res.gm, (x,))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_examples_resnet_like_frozen_bn(method):
    from examples import resnet_like
    model, (x,) = resnet_like.make(batch_size=2, image_size=32, width=8, freeze_bn=True)
    freeze_bn(model)
    res = run_pass(capture(model, (x,), method=method, dynamic=False))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # stem 1 + 8 basic blocks x 2 + 3 downsampling shortcuts
    assert res.stats["fuse-conv-bn.tune"] == 20 == n_bn
    check_exact(model, None, res.gm, (x,))


def test_decomposed_export_graph():
    """Core-aten graphs: aten.convolution + _native_batch_norm_legit_no_training (+ getitem)."""
    model = freeze_bn(ConvBN())
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(model, (x,)).run_decompositions().module()
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten._native_batch_norm_legit_no_training.default in targets
    assert torch.ops.aten.convolution.default in targets
    res = PassManager("fuse-conv-bn").run(gm, PassContext())
    assert res.stats["fuse-conv-bn.tune"] == 3
    assert "batch_norm" not in res.gm.code
    check_exact(model, None, res.gm, (x,))


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test_passes_the_pass_managers_verify_mode(method):
    """verify=True: new nodes carry meta['val'], outputs and gradients keep the promise."""
    model = freeze_bn(ConvBN())
    cap = capture(model, (torch.randn(2, 3, 8, 8),), method=method, dynamic=False)
    res = PassManager("fuse-conv-bn", verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats["fuse-conv-bn.tune"] == 3
