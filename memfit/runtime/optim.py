"""Optimizers at run time: building one of a class from parameter groups, and the step fused
into backward.

The optimizer step fused into backward: each parameter is updated, and its gradient freed, as
soon as its gradient is accumulated (the PyTorch tutorial "How to save memory by fusing the
optimizer step into the backward pass"). The step then never holds every gradient at once.

`StepInBackward(optimizer, params)` keeps one optimizer of the same class per parameter (that
parameter's group's hyper-parameters, its existing state) and a post-accumulate-grad hook on
each parameter. It is a torch.optim.Optimizer whose `param_groups` are the original groups, so
LR schedulers and code that edits `group["lr"]` keep working (each hook reads its group's
values before stepping); `step()` and `zero_grad()` have nothing left to do; `state_dict()` and
`load_state_dict()` speak the usual format.

The same update as the unfused step, for the same gradients: per-parameter optimizers
(elementwise updates: SGD, Adam, AdamW, ...), no closure. What it cannot honour, because the
update happens inside backward: gradient clipping by a global norm, gradient accumulation over
several backward passes, anything reading `.grad` after backward. A second backward before
`step()` is detected and raises, rather than apply an update twice.

Hooks step only while armed: the optimized module arms them when it runs a forward that builds
a graph, so a backward through the user's own (unoptimized) model accumulates as usual.
"""

from __future__ import annotations

import torch

def construct(cls, groups, defaults):
    """`cls(groups, ...)` passing only the defaults its constructor takes: the groups carry
    every hyper-parameter already, and some defaults are not constructor arguments (AdamW
    sets `decoupled_weight_decay` itself)."""
    import inspect

    try:
        accepted = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        accepted = {}
    kwargs = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    return cls(groups, **kwargs)


def like(optimizer, groups):
    """An optimizer of `optimizer`'s class and settings over `groups` (StepInBackward's
    per-parameter ones; the cost model's stand-ins build their own)."""
    from memfit.runtime.lowbit import settings

    own = getattr(optimizer, "memfit_like", None)
    if own is not None:
        return own(groups)
    new = construct(type(optimizer), groups, optimizer.defaults)
    for k, v in settings(optimizer).items():       # torchao's: block size and the like
        setattr(new, k, v)
    return new


# Optimizers whose step updates each parameter from its own gradient and state only.
PER_PARAMETER = ("SGD", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam", "RAdam", "RMSprop", "Adadelta", "ASGD")


def why_not(optimizer) -> str | None:
    """Why `optimizer` cannot step in backward, or None when it can."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return "the optimizer is not a torch.optim.Optimizer instance (give one to let memfit fuse its step)"
    from memfit.runtime.lowbit import is_low_bit

    names = {c.__name__ for c in type(optimizer).__mro__ if c.__module__.startswith("torch.optim")}
    per_parameter = is_low_bit(optimizer) or getattr(type(optimizer), "memfit_per_parameter", False)
    if not (names & set(PER_PARAMETER) or per_parameter):
        return f"{type(optimizer).__name__} is not known to update each parameter on its own"
    for g in optimizer.param_groups:
        if g.get("fused") or g.get("differentiable"):
            return "fused or differentiable optimizer groups"
    return None


class StepInBackward(torch.optim.Optimizer):
    """`optimizer`'s update, run per parameter inside backward (module doc). It takes over the
    given optimizer's state (the same tensors: step this one from now on, not that one). Hooks
    are registered by `install()` (or the first `arm()`), so planning with it changes nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        why = why_not(optimizer)
        if why is not None:
            raise ValueError(f"cannot step in backward: {why}")
        self.inner_class = type(optimizer)
        self._template = optimizer      # class and settings of the per-parameter optimizers
        super().__init__([dict(g) for g in optimizer.param_groups], dict(optimizer.defaults))
        self.per_param: dict[torch.Tensor, torch.optim.Optimizer] = {}
        # p -> index of its group: load_state_dict replaces the group dicts, an index survives it
        self.group_of: dict[torch.Tensor, int] = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                one = like(optimizer, [{**_hyper(g), "params": [p]}])
                if p in optimizer.state:
                    one.state[p] = dict(optimizer.state[p])
                    self.state[p] = one.state[p]
                self.per_param[p] = one
                self.group_of[p] = gi
        self.armed = False
        self._stepped: set[int] = set()
        self._handles: list = []

    def install(self) -> None:
        """Register the post-accumulate-grad hooks (once)."""
        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.per_param]

    # ------------------------------------------------------------------ the hook
    def _hook(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        if id(p) in self._stepped:
            self.armed = False
            raise RuntimeError("memfit: a second backward before optimizer.step(): the optimizer step runs "
                               "inside backward (technique 'step_in_backward'), which cannot accumulate gradients "
                               "over several backward passes; plan without it, or call optimizer.step() after each "
                               "backward")
        one = self.per_param[p]
        one.param_groups[0].update(_hyper(self.param_groups[self.group_of[p]]))   # a scheduler may change them
        one.step()
        self.state[p] = one.state[p]
        p.grad = None
        self._stepped.add(id(p))

    def arm(self, simulated: bool = False) -> None:
        """The next backward steps each parameter (the optimized module calls this; the cost
        model with `simulated`). Refused under a process group of several ranks: DDP and FSDP
        reduce gradients at the end of backward, after these steps would have used each rank's own."""
        import torch.distributed as dist

        if not simulated and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("memfit: the optimizer step in backward (technique 'step_in_backward') would step "
                               f"each parameter on this rank's own gradient, before DDP or FSDP reduces it over the "
                               f"{dist.get_world_size()} ranks; plan without it (memfit.optimize(..., "
                               "data_parallel='ddp') refuses it)")
        self.install()
        self.armed = True

    def warm_up(self) -> None:
        """Create every parameter's state as a first step would (on zero gradients), for a
        measurement of a steady-state step; parameters move as that step moves them."""
        for p, one in self.per_param.items():
            if p not in one.state or not one.state[p]:
                p.grad = torch.zeros_like(p)
                one.step()
                self.state[p] = one.state[p]
                p.grad = None

    # ------------------------------------------------------------------ the optimizer face
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError("memfit: step_in_backward cannot run a closure (its step ran inside backward)")
        self._stepped.clear()      # the updates already ran; the next forward arms the hooks again
        self.armed = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.per_param:
            p.grad = None

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for p, one in self.per_param.items():
            if p in self.state:
                one.state[p] = self.state[p]
            else:                       # no state in the dict: none here either (a fresh start)
                one.state.pop(p, None)

    def as_plain(self) -> torch.optim.Optimizer:
        """An optimizer of the inner class over the same groups and state, without hooks (what
        the cost model mirrors before simulating this one)."""
        plain = like(self._template, [dict(g) for g in self.param_groups])
        for p, one in self.per_param.items():
            if p in one.state:
                plain.state[p] = one.state[p]
        return plain

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}
