"""memfit.runtime.conv_bn: tune-mode numerics, saved bytes, no stale folds, deploy fold."""

import pytest
import torch
from torch import nn

from memfit.runtime.conv_bn import conv_bn_module_call, conv_bn_tune, fold_conv_bn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_pair(dim, cin, cout, k, groups, bias, **kw):
    conv = CONV[dim](cin, cout, k, groups=groups, bias=bias, **kw)
    bn = BN[dim](cout)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return conv, bn.eval()


def saved_bytes(fn):
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if not isinstance(t, nn.Parameter):
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


CASES = [
    # dim, cin, cout, kernel, groups, bias, extra conv kwargs, spatial size
    (2, 3, 5, 3, 1, False, dict(padding=1), (7, 9)),
    (2, 6, 9, (3, 2), 3, True, dict(stride=2, padding=(1, 0)), (11, 6)),
    (2, 4, 4, 3, 4, False, dict(dilation=2, padding="same"), (9, 9)),   # depthwise
    (1, 3, 7, 5, 1, True, dict(stride=3), (23,)),
    (1, 4, 6, 3, 2, False, dict(padding=2), (10,)),
    (3, 2, 3, 3, 1, True, dict(padding=1), (5, 4, 3)),
    (3, 4, 6, (1, 3, 3), 2, False, dict(stride=(1, 2, 2)), (3, 7, 7)),
]


@pytest.mark.parametrize("dim,cin,cout,k,groups,bias,kw,spatial", CASES)
def test_tune_matches_conv_then_eval_bn(dim, cin, cout, k, groups, bias, kw, spatial):
    conv, bn = make_pair(dim, cin, cout, k, groups, bias, **kw)
    x = torch.randn(3, cin, *spatial, requires_grad=True)
    params = [p for p in list(conv.parameters()) + list(bn.parameters())]

    ref = bn(conv(x))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x] + params, g)

    out = conv_bn_tune(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                       bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups)
    grads = torch.autograd.grad(out, [x] + params, g)
    assert rel(out, ref) < 1e-5
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-5

    out2 = conv_bn_module_call(x, conv, bn)
    assert rel(out2, ref) < 1e-5


def test_tune_mode_does_not_save_conv_output_or_folded_weight():
    conv, bn = make_pair(2, 8, 16, 3, 1, False, padding=1)
    x = torch.randn(4, 8, 32, 32, requires_grad=True)
    conv_out_bytes = 4 * 16 * 32 * 32 * 4
    _, plain = saved_bytes(lambda: bn(conv(x)))
    _, tune = saved_bytes(lambda: conv_bn_module_call(x, conv, bn))
    x_key = x.untyped_storage().data_ptr()
    # plain keeps x and the conv output (for BN's backward)
    assert x_key in plain and conv_out_bytes in plain.values()
    # tune keeps x (the parameter W itself, not counted) and (C_out,) vectors only: the folded
    # weight W * s is rebuilt in backward
    assert x_key in tune
    assert all(v <= 16 * 4 for k, v in tune.items() if k != x_key)
    assert sum(plain.values()) - sum(tune.values()) >= conv_out_bytes - 4 * 16 * 4


@pytest.mark.parametrize("frozen", ["conv", "bn", "input", "none"])
def test_partly_frozen_parameters(frozen):
    conv, bn = make_pair(2, 4, 6, 3, 2, True, padding=1)
    x = torch.randn(2, 4, 7, 5, requires_grad=frozen != "input")
    for p in {"conv": conv.parameters(), "bn": bn.parameters()}.get(frozen, []):
        p.requires_grad_(False)
    leaves = [t for t in [x, *conv.parameters(), *bn.parameters()] if t.requires_grad]
    ref = bn(conv(x))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    out = conv_bn_module_call(x, conv, bn)
    for a, b in zip(torch.autograd.grad(out, leaves, g), ref_grads):
        assert rel(a, b) < 1e-5


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kw", [dict(padding="same", kernel_size=4), dict(padding=1, kernel_size=3, padding_mode="reflect"),
                                dict(padding="valid", kernel_size=3)])
def test_padding_forms(kw):
    conv = nn.Conv2d(3, 5, **kw)
    bn = make_pair(2, 3, 5, 1, 1, False)[1]
    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    params = [x, *conv.parameters(), *bn.parameters()]
    ref = bn(conv(x))
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, params, g)
    out = conv_bn_module_call(x, conv, bn)
    assert rel(out, ref) < 1e-5
    for a, b in zip(torch.autograd.grad(out, params, g), ref_grads):
        assert rel(a, b) < 1e-5


def test_no_stale_fold_after_updates_and_mode_switch():
    conv, bn = make_pair(2, 3, 4, 3, 1, True, padding=1)
    x = torch.randn(2, 3, 6, 6)
    first = conv_bn_module_call(x, conv, bn)
    with torch.no_grad():  # an optimizer step and a statistics change
        conv.weight.add_(0.5)
        bn.weight.mul_(2.0)
        bn.running_mean.add_(1.0)
    second = conv_bn_module_call(x, conv, bn)
    assert rel(second, bn(conv(x))) < 1e-5
    assert rel(second, first) > 1e-2

    # train-mode BN: plain path, batch statistics, running statistics updated like the original
    bn.train()
    bn_ref = BN[2](4)
    bn_ref.load_state_dict(bn.state_dict())
    out = conv_bn_module_call(x, conv, bn)
    ref = bn_ref(conv(x))
    assert rel(out, ref) < 1e-6
    assert torch.allclose(bn.running_mean, bn_ref.running_mean)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)


def test_functional_form_reads_state_each_call():
    conv, bn = make_pair(1, 2, 3, 3, 1, False)
    x = torch.randn(2, 2, 8)
    args = (conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    a = conv_bn_tune(x, *args)
    with torch.no_grad():
        bn.running_var.mul_(4.0)
    b = conv_bn_tune(x, *args)
    assert rel(b, bn(conv(x))) < 1e-5
    assert rel(a, b) > 1e-2


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_deploy_fold_matches_and_leaves_inputs_alone(dim):
    conv, bn = make_pair(dim, 4, 6, 3, 2, dim == 2, padding=1)
    def state():
        return [("conv." + k, v) for k, v in conv.state_dict().items()] + \
            [("bn." + k, v) for k, v in bn.state_dict().items()]

    before = {k: v.clone() for k, v in state()}
    fused = fold_conv_bn(conv, bn)
    x = torch.randn(2, 4, *([5] * dim))
    with torch.no_grad():
        assert rel(fused(x), bn(conv(x))) < 1e-5
    assert all(torch.equal(before[k], v) for k, v in state())
    assert fused.weight is not conv.weight and fused.bias is not None


def test_bad_input_errors():
    with pytest.raises(ValueError, match="3-D, 4-D or 5-D"):
        w = torch.randn(4, 3)
        conv_bn_tune(torch.randn(2, 3), w, None, None, None, torch.zeros(4), torch.ones(4), 1e-5)
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        fold_conv_bn(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_bn(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
