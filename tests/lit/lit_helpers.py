"""What the lit tests of the saved-tensor passes print (quantize-activations, offload-activations)."""
import torch

from memfit.ir.capture import capture
from memfit.passes import PassContext, PassManager


def show_wrapped(model, x, pipeline, attr, method="auto"):
    """Run `pipeline` on `model` captured at `x`; print each node wrapped under `gm.<attr>`,
    the stats and the diagnostics."""
    cap = capture(model, (x,), method=method, dynamic=False)
    res = PassManager(pipeline).run(cap.gm, PassContext(captured=cap))
    for n in res.gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(attr):
            args = ", ".join(f"%{a.name}" if isinstance(a, torch.fx.Node) else repr(a) for a in n.args)
            sub = res.gm.get_submodule(n.target)
            print(f"  %{n.name} = {n.target}({args})  # {sub.extra_repr()}")
    print("// stats: " + " ".join(f"{k}={v}" for k, v in sorted(res.stats.items())))
    for d in res.diagnostics:
        print(f"// {d}")
