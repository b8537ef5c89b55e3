"""The one way a pass runs chosen graph nodes under saved-tensor hooks (quantize-activations,
offload-activations): a runtime module `gm.<attr>`, called once per forward with the graph's
inputs, returns the step's scope; each chosen node becomes a call of a `HookedCall` under it
that takes the scope as its first argument (a data dependency, so the order holds and
dead-code elimination keeps the scope node) and runs the original call inside `hooks(scope)`.
The wrapper modules hold no parameters or buffers: state_dict keys are unchanged."""

from __future__ import annotations

import weakref

import torch
import torch.fx


class HookedRuntime(torch.nn.Module):
    """`gm.<attr>`: the state shared by the wrapped nodes; `scope(exclude)` makes a step's scope
    from the tensors never to touch (inputs, parameters, buffers)."""

    _is_impure = True  # keep the scope node under dead-code elimination

    def __init__(self, owner: torch.fx.GraphModule):
        super().__init__()
        object.__setattr__(self, "_owner", weakref.ref(owner))

    def scope(self, exclude: list):
        raise NotImplementedError

    def forward(self, *inputs):
        import torch.utils._pytree as pytree

        owner = self._owner()
        exclude = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        if owner is not None:
            exclude += list(owner.parameters()) + list(owner.buffers())
        return self.scope(exclude)


class HookedCall(torch.nn.Module):
    """One wrapped node: runs the original call inside `self.hooks(scope)`."""

    def __init__(self, runtime: HookedRuntime, kind: str, target, name: str):
        super().__init__()
        object.__setattr__(self, "_runtime", runtime)  # not a child: no duplicate registration
        self.kind = kind
        self.target = target
        self.node_name = name

    def hooks(self, scope):
        raise NotImplementedError

    def forward(self, scope, *args, **kwargs):
        with self.hooks(scope):
            if self.kind == "call_function":
                return self.target(*args, **kwargs)
            if self.kind == "call_method":
                return getattr(args[0], self.target)(*args[1:], **kwargs)
            return self._runtime._owner().get_submodule(self.target)(*args, **kwargs)

    def extra_repr(self) -> str:
        t = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", str(self.target))
        return f"{self.kind} {t}"


def wrap_nodes(gm: torch.fx.GraphModule, attr: str, runtime: HookedRuntime, chosen, make_call, meta) -> None:
    """Install `runtime` as `gm.<attr>` and turn each node of `chosen` into a call of
    `make_call(node)` (a HookedCall) taking the scope first; `meta(node)` goes to
    node.meta[attr]. Recompiles gm."""
    gm.add_submodule(attr, runtime)
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(g.nodes))
    with g.inserting_after(anchor):
        scope_node = g.call_module(attr, tuple(placeholders))
    scope_node.name = f"{attr}_scope"
    for n in chosen:
        sub = n.name.replace(".", "_")
        runtime.add_module(sub, make_call(n))
        n.meta[attr] = meta(n)
        n.op = "call_module"
        n.target = f"{attr}.{sub}"
        n.args = (scope_node, *n.args)
    gm.recompile()
