"""Convolution followed by eval-mode BatchNorm, computed with the BatchNorm folded on the fly.

"Tune mode" of Efficient ConvBN Blocks (Xiong et al., "Efficient ConvBN Blocks for Transfer
Learning and Beyond", ICLR 2024): with frozen BatchNorm statistics, BN(conv(x, W) + b) equals

    conv(x, W * s) + (b - mean) * s + beta,      s = gamma / sqrt(running_var + eps)   (C_out,)

Autograd then keeps only `x` and the folded weight (parameter-sized) for backward. The plain
pair keeps `x` for the convolution *and* the convolution's output for BatchNorm's backward (it
needs x_hat for the gradient of gamma), so one activation of the size of the conv output is no
longer saved per block. Gradients reach W, b, gamma and beta through the fold (the same function,
different float rounding).

Everything here is read at call time (BatchNorm's weight, bias, running statistics, eps, its
training flag in the module form), so there are no stale folded weights after optimizer steps
or eval/train switches. `fold_conv_bn` is the deploy form: a new convolution with the fold
done once, for inference.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def fold_scale(bn_weight: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """s = gamma / sqrt(running_var + eps), shape (C_out,). gamma None means 1 (affine=False)."""
    inv_std = torch.rsqrt(running_var + eps)
    return inv_std if bn_weight is None else bn_weight * inv_std


def fold_conv_bn_weights(conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                         bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                         running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded (weight, bias) of conv -> eval BN; differentiable in every tensor argument.

    conv_weight: (C_out, C_in / groups, *kernel); returns weight of that shape and bias (C_out,).
    """
    s = fold_scale(bn_weight, running_var, eps)
    w = conv_weight * s.reshape((-1,) + (1,) * (conv_weight.dim() - 1))
    shift = -running_mean if conv_bias is None else conv_bias - running_mean
    b = shift * s
    if bn_bias is not None:
        b = b + bn_bias
    return w, b


def conv_bn_tune(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                 bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None,
                 running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                 stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """batch_norm(conv(x, W, b), training=False) with the BN folded into the conv at this call.

    x: (N, C_in, *spatial) with 1, 2 or 3 spatial dims (the dimension comes from the weight);
    `padding` may be an int, a sequence or "same"/"valid" as for F.conv{1,2,3}d.
    """
    conv = _CONV.get(conv_weight.dim())
    if conv is None:
        raise ValueError(f"conv_bn_tune: expected a 3-D, 4-D or 5-D conv weight, got {conv_weight.dim()}-D")
    w, b = fold_conv_bn_weights(conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return conv(x, w, b, stride, padding, dilation, groups)


def conv_bn_module_call(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)) for module pairs, in tune mode whenever BN uses its running statistics.

    Reads the modules at every call: if `bn` is in training mode (or tracks no running
    statistics) this is the plain bn(conv(x)), updating running statistics as usual.
    `conv._conv_forward` handles padding modes other than zeros.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return bn(conv(x))
    w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                bn.running_var, bn.eps)
    return conv._conv_forward(x, w, b)  # noqa: SLF001 - the module's own padding-mode logic


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """Deploy mode: a new convolution computing bn(conv(x)) with eval BN, folded once.

    The inputs are not modified; the result holds new parameters (detached copies), so later
    changes to `conv` or `bn` do not reach it. For inference.
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"fold_conv_bn: expected nn.Conv1d/2d/3d, got {type(conv).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_conv_bn: BatchNorm tracks no running statistics (track_running_stats=False)")
    with torch.no_grad():
        w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                    bn.running_var, bn.eps)
    fused = copy.deepcopy(conv)
    fused.weight = nn.Parameter(w.detach().clone(), requires_grad=conv.weight.requires_grad)
    fused.bias = nn.Parameter(b.detach().clone(), requires_grad=conv.weight.requires_grad)
    return fused
