"""Convolution followed by eval-mode BatchNorm, computed with the BatchNorm folded on the fly.

"Tune mode" of Efficient ConvBN Blocks (Xiong et al., "Efficient ConvBN Blocks for Transfer
Learning and Beyond", ICLR 2024): with frozen BatchNorm statistics, BN(conv(x, W) + b) equals

    conv(x, W * s) + (b - mean) * s + beta,      s = gamma / sqrt(running_var + eps)   (C_out,)

The plain pair keeps `x` for the convolution *and* the convolution's output for BatchNorm's
backward (it needs x_hat for the gradient of gamma). Here an autograd Function keeps `x`, the
parameter W itself and the (C_out,) scale s, and rebuilds the folded weight W * s in backward
(parameter-sized elementwise work), so no activation of the conv output's size and no copy of
the weights is kept per block. Gradients reach W, b, gamma and beta through the fold (the same
function, different float rounding): dW = dW_hat * s, ds = sum(dW_hat * W) over the
non-output dims, and s, the folded bias and their gradients follow autograd.

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
    s = fold_scale(bn_weight, running_var, eps)
    shift = -running_mean if conv_bias is None else conv_bias - running_mean
    b = shift * s if bn_bias is None else shift * s + bn_bias
    pad = _explicit_padding(padding, conv_weight, dilation)
    if pad is None:  # "same" with an even effective kernel: asymmetric padding, plain autograd
        return conv(x, conv_weight * s.reshape((-1,) + (1,) * (conv_weight.dim() - 1)), b, stride, padding,
                    dilation, groups)
    return _ConvScaledWeight.apply(x, conv_weight, s, b, stride, pad, dilation, groups)


def _ntuple(v, n) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(i) for i in v]


def _explicit_padding(padding, weight, dilation):
    """Padding as a list of ints, or None for "same" that would need asymmetric padding."""
    n = weight.dim() - 2
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * n
        if padding != "same":
            raise ValueError(f"conv_bn_tune: unknown padding {padding!r}")
        total = [d * (k - 1) for d, k in zip(_ntuple(dilation, n), weight.shape[2:])]
        if any(t % 2 for t in total):
            return None
        return [t // 2 for t in total]
    return _ntuple(padding, n)


class _ConvScaledWeight(torch.autograd.Function):
    """conv(x, W * s[:, None, ...], b) keeping x, W and s for backward (not W * s).

    x: (N, C_in, *spatial); W: (C_out, C_in / groups, *kernel); s, b: (C_out,).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias, stride, padding, dilation, groups):
        w_hat = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        ctx.save_for_backward(x, weight, scale)
        ctx.conf = (_ntuple(stride, weight.dim() - 2), padding, _ntuple(dilation, weight.dim() - 2), groups)
        return _CONV[weight.dim()](x, w_hat, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        shape = (-1,) + (1,) * (weight.dim() - 1)
        w_hat = weight * scale.reshape(shape)
        need_x, need_w, need_s, need_b = ctx.needs_input_grad[:4]
        gx, gw_hat, gb = torch.ops.aten.convolution_backward(
            grad_out, x, w_hat, [weight.shape[0]], stride, padding, dilation, False,
            [0] * (weight.dim() - 2), groups, [need_x, need_w or need_s, need_b])
        gw = gw_hat * scale.reshape(shape) if need_w else None
        gs = (gw_hat * weight).sum(dim=tuple(range(1, weight.dim()))) if need_s else None
        return gx, gw, gs, gb, None, None, None, None


def conv_bn_module_call(x: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """bn(conv(x)) for module pairs, in tune mode whenever BN uses its running statistics.

    Reads the modules at every call: if `bn` is in training mode (or tracks no running
    statistics) this is the plain bn(conv(x)), updating running statistics as usual.
    `conv._conv_forward` handles padding modes other than zeros.
    """
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return bn(conv(x))
    if conv.padding_mode != "zeros":
        w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                    bn.running_var, bn.eps)
        return conv._conv_forward(x, w, b)  # noqa: SLF001 - the module's own padding-mode logic
    return conv_bn_tune(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups)


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
