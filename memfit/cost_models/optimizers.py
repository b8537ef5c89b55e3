"""The optimizer and the loss of a simulated (or measured) step: optimizers by name, a mirror
of a user's optimizer instance over other tensors, and the default loss."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from memfit.runtime.lowbit import is_low_bit, settings
from memfit.runtime.optim import construct


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


def make_optimizer(spec, params: list[torch.Tensor], original_params: list[torch.Tensor] | None = None,
                   convert=None):
    """An optimizer over `params` matching `spec` (None, a name, or an instance).

    An instance of any torch.optim class is mirrored: same class, parameter groups with every
    hyper-parameter of each group, each of its parameters replaced by the tensor at the same
    position in `params` (which lines up with `original_params`), and its existing state
    (`convert(tensor)` of each state tensor: FakeTensors in the cost model). Parameters the
    instance does not hold get no state. With `convert` given, a torchao low-bit optimizer
    becomes its stand-in (memfit.cost_models.lowbit), which allocates what it would.
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
        if convert is not None and is_low_bit(spec):
            # simulated: torchao's states and compiled step do not run on FakeTensors
            from memfit.cost_models.lowbit import LowBitStandIn
            return LowBitStandIn(groups, source=spec)
        new = construct(type(spec), groups, spec.defaults)
        for k, v in settings(spec).items():
            setattr(new, k, v)
        for p, st in spec.state.items():
            if id(p) in index:
                new.state[params[index[id(p)]]] = {
                    k: (convert(v) if convert is not None else v.detach().clone()) if isinstance(v, torch.Tensor) else v
                    for k, v in st.items()}
        return new
    raise TypeError(f"optimizer must be None, a name or a torch.optim.Optimizer, got {type(spec).__name__}")


def default_loss(output) -> torch.Tensor:
    """The loss when none is given: a model's own (`output.loss`, as Hugging Face models
    return when given `labels=`), a scalar output, else the mean of the first float output."""
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor) and own.dim() == 0:
        return own
    leaves = [t for t in pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("the model returned no floating-point tensor; pass loss_fn=")
    if len(leaves) == 1 and leaves[0].dim() == 0:
        return leaves[0]
    # For ModelOutput-like results only the first field (logits / last_hidden_state) is
    # used, which is what a task loss would read.
    return leaves[0].float().mean()


class LossWithTargets:
    """`loss_fn(output, *targets)` with the example targets bound, so the step's loss is one
    callable of the output everywhere (planner, measure). Called for real it runs on the real
    targets; the cost model (analyze_step) gives `fn` fakes sized like them that share the
    inputs' batch (and sequence) symbols, so the plan stays an expression in B and T."""

    def __init__(self, fn, targets):
        if not callable(fn):
            raise TypeError("example_targets needs loss_fn(output, *targets): pass loss_fn=")
        self.fn = fn
        self.targets = tuple(targets)

    def __call__(self, output):
        return self.fn(output, *self.targets)

    def fakes(self, fm, fake_inputs, symbols) -> list:
        """Fakes of the targets in fake mode `fm`: dim 0 equal to the batch size and dim 1 equal
        to the sequence length (of the first input) take the inputs' symbols, so labels scale
        with B and T."""
        sym: dict[int, object] = {}
        first = next((f for f in fake_inputs if isinstance(f, torch.Tensor) and f.dim() >= 1), None)
        if first is not None:
            for i, name in ((0, "B"), (1, "T")):
                if name in symbols and first.dim() > i and isinstance(first.shape[i], torch.SymInt):
                    sym[i] = (symbols[name], first.shape[i])
        out = []
        for t in self.targets:
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            sizes = [sym[i][1] if i in sym and int(s) == sym[i][0] else int(s) for i, s in enumerate(t.shape)]
            with fm:
                out.append(torch.empty(sizes, dtype=t.dtype, device=t.device))
        return out


def bind_targets(loss_fn, targets):
    """loss_fn as a callable of the output alone (LossWithTargets when there are targets)."""
    if targets is None or (isinstance(targets, (tuple, list)) and not targets):
        return loss_fn
    if isinstance(targets, torch.Tensor):
        targets = (targets,)
    return LossWithTargets(loss_fn, targets)
