"""Helpers for memfit's FileCheck tests (tests/lit/) and for pass authors' own tests.

    # RUN: %python %s | filecheck %s
    from memfit.testing import run, opt_text

    @run
    def test_relu_rewrite():
        print(opt_text(MyModel(), (torch.randn(2, 8),), "my-pass"))

    # CHECK-LABEL: TEST: test_relu_rewrite
    # CHECK: %relu = ...

`run` prints the `TEST: <name>` anchor a CHECK-LABEL line matches, then runs the case at
once (the torch-mlir convention), so one file holds many cases and a failure points at one.
`expect_error` prints the message of an expected error for negative tests.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


def run(fn):
    """Print `TEST: <name>`, run `fn()`, print an empty line; return `fn` unchanged.

    An unexpected exception propagates: the file exits non-zero and lit reports it.
    Negative tests use `expect_error`.
    """
    print(f"TEST: {fn.__name__}")
    sys.stdout.flush()
    fn()
    print()
    sys.stdout.flush()
    return fn


@contextmanager
def expect_error(exc_type=Exception):
    """Print `ERROR: <Type>: <message>` for the exception the block raises (for CHECK lines),
    or `ERROR: none raised`; exceptions not of `exc_type` propagate."""
    try:
        yield
    except exc_type as e:
        print(f"ERROR: {type(e).__name__}: {e}")
    else:
        print("ERROR: none raised")
    sys.stdout.flush()


def opt_text(model, example_inputs, passes="", *, method: str = "auto", analysis: bool = False,
             verify: bool = False, name: str | None = None) -> str:
    """Capture `model` (static shapes), run `passes` (text or objects), return the printed graph
    followed by `// stats:` and one `// <diagnostic>` line each (the `memfit opt` layout)."""
    import torch

    from memfit.passes.infra.pipeline import run_pipeline
    from memfit.passes.infra.printer import format_graph

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    cap, res = run_pipeline(model, tuple(example_inputs), None, passes, method=method, verify=verify)
    if analysis:
        from memfit.cost_models.memory import analyze_step
        analyze_step(cap, symbolic=False)
    lines = [format_graph(res.gm, name=name or type(model).__name__, saved=analysis)]
    stats = ", ".join(f"{k}={v}" for k, v in sorted(res.stats.items()))
    lines.append(f"// stats: {stats or '(none)'}")
    lines += [f"// {d}" for d in res.diagnostics]
    return "\n".join(lines)


def show_calls(model, example_inputs, passes="", method: str = "auto") -> None:
    """Capture `model` (static shapes), run `passes`, and print one line per call node,
    `  %name = op target(args)`, then `// stats:` (non-zero counts) and one `// <diagnostic>`
    line each: a compact listing for CHECK lines about which calls a pass put in."""
    import torch

    from memfit.passes.infra.pipeline import run_pipeline

    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    _, res = run_pipeline(model, example_inputs, None, passes, method=method)

    def fmt(a):
        return f"%{a.name}" if isinstance(a, torch.fx.Node) else repr(a)

    for n in res.gm.graph.nodes:
        if n.op not in ("call_function", "call_module", "call_method"):
            continue
        if isinstance(n.target, str):
            target = n.target
        elif isinstance(n.target, torch._ops.OpOverload):
            target = str(n.target)
        else:
            target = getattr(n.target, "__module__", "") + "." + getattr(n.target, "__name__", str(n.target))
        args = ", ".join([fmt(a) for a in n.args] + [f"{k}={fmt(v)}" for k, v in n.kwargs.items()])
        print(f"  %{n.name} = {n.op} {target}({args})")
    print("// stats: " + " ".join(f"{k}={v}" for k, v in sorted(res.stats.items()) if v))
    for d in res.diagnostics:
        print(f"// {d}")
    sys.stdout.flush()
