"""The techniques the planner may use, by the names users give (`techniques=`), and the pass
or source rewrite behind each. One list for memfit.optimize, `memfit plan` and the
torch.compile backend."""

from __future__ import annotations

# technique name (DESIGN.md) -> registered pass (or source rewrite) name
TECHNIQUES = {
    "fuse_conv_bn": "fuse-conv-bn",
    "sdpa": "sdpa-attention",
    "chunked_ce": "chunked-ce",
    "sparse_embedding_grad": "sparse-embedding-grad",
    "checkpoint": "checkpoint",
    "step_in_backward": "step-in-backward",   # not a pass: planning/strategy.py and runtime/optim.py
    "quantize": "quantize-activations",
    "optimizer_8bit": "optimizer-8bit",       # not a pass: planning/strategy.py and runtime/lowbit.py
    "optimizer_4bit": "optimizer-4bit",
    "reversible": "reversible",
    "token_merge": "token-merge",
    "offload": "offload-activations",         # CUDA only (planning/strategy.py); opt-in
}
# used unless `techniques` says otherwise: every exact one, then the approximate ones (8-bit saved
# activations, 8- and 4-bit optimizer states with an optimizer instance and torchao installed)
# where exact ones cannot fit
DEFAULT_TECHNIQUES = ("fuse_conv_bn", "sdpa", "chunked_ce", "sparse_embedding_grad", "checkpoint", "quantize",
                      "optimizer_8bit", "optimizer_4bit")
# exact graph rewrites applied before planning (memfit.optimize and the backend's default passes)
EXACT_STRUCTURAL = ("fuse_conv_bn", "sdpa")
# applied before planning when named: they change the function
FUNCTION_CHANGING = ("reversible", "token_merge")
# they change the optimizer the user gets back: a module planned again for other inputs (the
# last batch) keeps the optimizer the user already holds, so its plan may not use them
OPTIMIZER_CHANGING = ("step_in_backward", "optimizer_8bit", "optimizer_4bit")


def parse_techniques(techniques) -> tuple[str, ...]:
    """`techniques` (None, "a,b" or a list) as a tuple of known names; ValueError names the known ones."""
    if techniques is None:
        return DEFAULT_TECHNIQUES
    if isinstance(techniques, str):
        techniques = [t.strip() for t in techniques.split(",") if t.strip()]
    out = []
    for t in techniques:
        if t not in TECHNIQUES:
            raise ValueError(f"unknown technique {t!r}; choose from {', '.join(TECHNIQUES)}")
        out.append(t)
    return tuple(out)
