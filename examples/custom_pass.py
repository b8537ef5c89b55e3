"""A custom memfit pass in under 40 lines: checkpoint every module whose path matches a pattern.

    memfit opt examples/custom_pass.py:make --passes "checkpoint-blocks{pattern=blocks.*}" --verify
    python examples/custom_pass.py          # memfit.optimize(model, ..., passes=[...])

See docs/custom-passes.md for a walk through it.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from memfit.passes import Diagnostic, Pass, PassResult, register_pass
from memfit.passes.infra.regions import module_regions, outline_region


class Checkpointed(torch.nn.Module):
    """Runs `region` under non-reentrant checkpointing: its activations are recomputed in
    backward instead of saved (same RNG state, so dropout replays the same mask)."""

    def __init__(self, region: torch.nn.Module):
        super().__init__()
        self.region = region  # an outlined GraphModule: it owns no parameters

    def forward(self, *args):
        return checkpoint(self.region, *args, use_reentrant=False)


@register_pass
@dataclass(frozen=True)
class CheckpointBlocks(Pass):
    """Recompute every module matching `pattern` in backward instead of saving its activations."""

    name: ClassVar[str] = "checkpoint-blocks"
    pattern: str = "blocks.*"

    def run(self, gm, ctx):
        regions = module_regions(gm, self.pattern)
        for path, nodes in regions.items():
            call = outline_region(gm, nodes, path)        # one call node per block
            gm.add_module(call.target, Checkpointed(gm.get_submodule(call.target)))
        diags = [] if regions else [Diagnostic(self.name, f"no module matches {self.pattern!r}")]
        return PassResult(gm, modified=bool(regions), stats={"checkpointed": len(regions)},
                          diagnostics=diags)


# ---------------------------------------------------------------- a model to try it on

class Block(torch.nn.Module):
    """Pre-LN MLP block: (B, T, D) -> (B, T, D)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Tower(torch.nn.Module):
    def __init__(self, d: int = 32, depth: int = 4, dropout: float = 0.1):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(d, dropout) for _ in range(depth)])
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):  # (B, T, D) -> (B, T, 10)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make(batch_size: int = 4, seq: int = 16, d: int = 32, depth: int = 4):
    """Factory for `memfit opt` / `memfit plan`: (model, example_inputs)."""
    torch.manual_seed(0)
    return Tower(d, depth), (torch.randn(batch_size, seq, d),)


if __name__ == "__main__":
    import memfit

    model, inputs = make()
    opt_model = memfit.optimize(model, example_inputs=inputs, passes=["checkpoint-blocks{pattern=blocks.*}"],
                                verify=True)
    print(opt_model.memfit_plan.decisions)
    before = memfit.measure(model, example_inputs=inputs).saved_activations
    after = memfit.measure(opt_model, example_inputs=inputs).saved_activations
    print(f"saved activations, measured: {before} bytes -> {after} bytes")
