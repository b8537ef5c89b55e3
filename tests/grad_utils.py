"""Gradient helpers shared by tests that compare a model's parameter gradients."""

import torch


def param_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict:
    """Backpropagate `loss` and return {parameter name: gradient copy}; grads are reset."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    g = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def rel_error(a: dict, b: dict) -> float:
    """Whole-model relative error ||a - b|| / ||b|| over the parameters of `b`."""
    num = sum((a[k] - b[k]).pow(2).sum() for k in b).sqrt()
    den = sum(v.pow(2).sum() for v in b.values()).sqrt()
    return (num / den).item()
