# RUN: %python %s | filecheck %s
# fuse-conv-bn on both capture roads: tune mode, deploy folding, train-mode BN diagnostics.
import torch
from torch import nn

from memfit.testing import run, show_calls as show
from tests.models import ConvBN

torch.manual_seed(0)


def frozen(model):
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


@run
def test_export_tune_mode():
    show(frozen(ConvBN()), torch.randn(2, 3, 8, 8), "fuse-conv-bn", "export")
# CHECK-LABEL: TEST: test_export_tune_mode
# CHECK: %conv_bn_tune = call_function memfit.runtime.conv_bn.conv_bn_tune(%x, %stem_0_weight, None, %stem_1_weight, %stem_1_bias, %stem_1_running_mean, %stem_1_running_var, 1e-05, [1, 1], [1, 1], 1, 1)
# CHECK-NEXT: %relu = call_function aten.relu.default(%conv_bn_tune)
# CHECK: %conv_bn_tune_1 = call_function memfit.runtime.conv_bn.conv_bn_tune(%relu, %body_0_weight,
# CHECK: %conv_bn_tune_2 = call_function memfit.runtime.conv_bn.conv_bn_tune(
# CHECK-NOT: batch_norm
# CHECK-NOT: aten.conv2d
# CHECK: // stats: fuse-conv-bn.tune=3
# CHECK-EMPTY:


@run
def test_symbolic_trace_module_form():
    show(frozen(ConvBN()), torch.randn(2, 3, 8, 8), "fuse-conv-bn", "symbolic_trace")
# CHECK-LABEL: TEST: test_symbolic_trace_module_form
# CHECK: %conv_bn_module_call = call_function memfit.runtime.conv_bn.conv_bn_module_call(%x, %stem_{{[0-9]+}}, %stem_{{[0-9]+}})
# CHECK-NOT: call_module stem.1
# CHECK-NOT: call_module body.1
# CHECK: // stats: fuse-conv-bn.tune=3


@run
def test_deploy_folds_into_plain_convs():
    show(frozen(ConvBN()).eval(), torch.randn(2, 3, 8, 8), "fuse-conv-bn{deploy=true}", "export")
# CHECK-LABEL: TEST: test_deploy_folds_into_plain_convs
# CHECK: %_conv = call_function memfit.passes.fuse_conv_bn._conv(%x, %_memfit_folded_conv2d_weight, %_memfit_folded_conv2d_bias, [1, 1], [1, 1], 1, 1)
# CHECK-NOT: batch_norm
# CHECK: // stats: fuse-conv-bn.folded=3
# CHECK-EMPTY:


@run
def test_train_mode_bn_is_left_alone():
    show(ConvBN().train(), torch.randn(2, 3, 8, 8), "fuse-conv-bn", "export")
# CHECK-LABEL: TEST: test_train_mode_bn_is_left_alone
# CHECK: %conv2d = call_function aten.conv2d.default(%x, %stem_0_weight, None, [1, 1], [1, 1])
# CHECK: %batch_norm = call_function aten.batch_norm.default(%conv2d, {{.*}}, True, 0.1, 1e-05, False)
# CHECK-NOT: conv_bn_tune
# CHECK: // stats: fuse-conv-bn.train_mode_bn=3
# CHECK-NEXT: // info: [fuse-conv-bn] at batch_norm: BatchNorm in training mode (batch statistics) left alone
