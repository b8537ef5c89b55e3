"""The optimizer and the loss of a simulated (or measured) step: optimizers by name, a mirror
of a user's optimizer instance over other tensors, and the default loss."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


def make_optimizer(spec, params: list[torch.Tensor], original_params: list[torch.Tensor] | None = None):
    """An optimizer over `params` matching `spec` (None, a name, or an instance).

    An instance is mirrored: same class, hyperparameters and parameter groups, with each of
    its parameters replaced by the tensor at the same position in `params` (which lines up
    with `original_params`). Parameters the instance does not hold get no state.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.lower().replace("_", "-")
        if key not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {spec!r}; choose one of {', '.join(sorted(OPTIMIZERS))} "
                             "or pass a torch.optim.Optimizer instance")
        return OPTIMIZERS[key](params)
    if isinstance(spec, torch.optim.Optimizer):
        if original_params is None:
            raise ValueError("mirroring an optimizer instance needs the original parameters")
        index = {id(p): i for i, p in enumerate(original_params)}
        groups = []
        for g in spec.param_groups:
            mapped = [params[index[id(p)]] for p in g["params"] if id(p) in index]
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": mapped})
        return type(spec)(groups, **spec.defaults)
    raise TypeError(f"optimizer must be None, a name or a torch.optim.Optimizer, got {type(spec).__name__}")


def default_loss(output) -> torch.Tensor:
    """Scalar loss for models whose output is not one: the mean of every float output."""
    leaves = [t for t in pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("the model returned no floating-point tensor; pass loss_fn=")
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return leaves[0]
    # For ModelOutput-like results only the first field (logits / last_hidden_state) is
    # used, which is what a task loss would read.
    return leaves[0].float().mean()
