"""`memfit opt` and `memfit passes`.

    memfit opt FILE.py:FACTORY --passes "a,b{x=1}" [--print-after-all] [--verify]
               [--input DTYPE[SHAPE]] [-D KEY=VALUE] [--load MODULE_OR_FILE]
    memfit passes [--load MODULE_OR_FILE]

`opt` captures the model, runs the pipeline and prints the rewritten graph in the text form
of memfit.passes.infra.printer, then `//` comment lines: the pipeline, the rewrite counts, the
diagnostics, and the predicted step peak and saved activations before and after.
`passes` lists every registered pass (built-in, entry points, `--load`ed) with its promise,
its one-line doc and its options.
"""

from __future__ import annotations

import dataclasses
import importlib
import os


def add_subcommands(sub) -> None:
    """Add `opt` and `passes` to the `memfit` argument subparsers."""
    from memfit.cli.util import add_model_args

    o = sub.add_parser("opt", help="run a pass pipeline on a model and print the rewritten graph")
    add_model_args(o)
    o.add_argument("--passes", default="", metavar="PIPELINE",
                   help='pass pipeline, e.g. "checkpoint-blocks{pattern=blocks.*},other"')
    o.add_argument("--print-after-all", action="store_true", help="print the graph after every pass")
    o.add_argument("--verify", action="store_true",
                   help="after each pass check shape metadata, outputs and gradients on the example inputs")
    o.add_argument("--load", action="append", metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers passes (repeatable)")
    o.add_argument("--dynamic", action="store_true",
                   help="capture with symbolic batch/sequence sizes (default: the example's sizes)")
    o.add_argument("--no-analysis", action="store_true",
                   help="skip the cost model: no saved bytes per node, no predicted peak")
    o.set_defaults(func=cmd_opt)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.add_argument("--load", action="append", metavar="MODULE_OR_FILE",
                   help="import a module or .py file that registers passes (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_passes)


def load_pass_modules(specs) -> None:
    """Import each module name or .py file (their import registers passes)."""
    from memfit.cli.util import UsageError, import_file

    for spec in specs or ():
        if spec.endswith(".py") or os.sep in spec:
            import_file(spec, what="--load: ")
        else:
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise UsageError(f"--load: cannot import {spec!r}: {e}") from e


def cmd_opt(args) -> int:
    from memfit.budget import format_bytes
    from memfit.ir.capture import capture
    from memfit.cli.util import Progress, load_factory, optimizer_arg, parse_kv
    from memfit.cost_models.memory import analyze_step
    from memfit.passes import format_pipeline, parse_pipeline
    from memfit.passes.infra.pipeline import run_pipeline
    from memfit.passes.infra.printer import format_graph

    load_pass_modules(args.load)
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {args.model}"):
        model, inputs, kwargs = load_factory(args.model, args.input, parse_kv(args.factory_args),
                                             allow_module=args.module)
    # Parse after loading: the model file may register the passes it uses.
    pipeline = parse_pipeline(args.passes)
    name = type(model).__name__
    opt = optimizer_arg(args.optimizer)

    def analyze(c):
        if args.no_analysis:
            return None
        return analyze_step(c, optimizer=opt, symbolic=args.dynamic)

    with progress.stage(f"capturing {name}"):
        cap = capture(model, inputs, kwargs, dynamic=args.dynamic)
    with progress.stage("simulating one training step on fake tensors"):
        before = analyze(cap)

    def after_pass(p, res):
        if args.print_after_all:
            analyze(dataclasses.replace(cap, gm=res.gm))
            print(f"// -----// IR after {p.to_text()} //----- //")
            print(format_graph(res.gm, name=name))

    with progress.stage(f"running {format_pipeline(pipeline) or 'no passes'}"
                        + (" with verification" if args.verify else "")):
        final, res = run_pipeline(model, inputs, kwargs, pipeline, dynamic=args.dynamic, optimizer=opt,
                                  verify=args.verify, after_pass=after_pass, captured=cap)
    with progress.stage("simulating the rewritten step"):
        after = analyze(final)
    if args.print_after_all:
        print("// -----// IR result //----- //")
    print(format_graph(res.gm, name=name))
    print(f"// pipeline: {format_pipeline(pipeline) or '(none)'}")
    stats = ", ".join(f"{k}={v}" for k, v in sorted(res.stats.items()))
    print(f"// stats: {stats or '(none)'}")
    for d in res.diagnostics:
        print(f"// {d}")
    if before is not None and after is not None:
        def change(a, b):
            return f"{(b - a) / a:+.1%}" if a else "-"
        sa, sb = before.totals.get("saved_activations", 0), after.totals.get("saved_activations", 0)
        print(f"// predicted peak: {format_bytes(before.peak_bytes)} before, {format_bytes(after.peak_bytes)} "
              f"after ({change(before.peak_bytes, after.peak_bytes)})")
        print(f"// predicted saved activations: {format_bytes(sa)} before, {format_bytes(sb)} after "
              f"({change(sa, sb)})")
    if args.verify:
        print(f"// verified: {len(pipeline)} pass(es) kept their promises on the example inputs")
    return 0


def format_pass_list() -> str:
    from memfit.passes import list_passes

    lines = []
    for cls in list_passes():
        doc = (cls.__doc__ or "").strip().splitlines()
        first = doc[0].strip() if doc and not doc[0].startswith(cls.__name__ + "(") else ""
        promise = cls.promise.kind
        lines.append(f"{cls.name}  [{promise}]" + (f"  {first}" if first else ""))
        for opt, tp, default in cls.option_docs():
            lines.append(f"    {opt}: {tp} = {default if default != '' else chr(34) * 2}")
    return "\n".join(lines) if lines else "(no passes registered)"


def cmd_passes(args) -> int:
    load_pass_modules(args.load)
    print(format_pass_list())
    return 0


__all__ = ["add_subcommands", "cmd_opt", "cmd_passes", "format_pass_list", "load_pass_modules"]
