"""The `memfit` command: plan | opt | passes | demo.

Bad input (malformed budget, missing file or factory, untraceable model) is reported as one
line on stderr with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memfit.errors import MemfitError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="FILE.py:FACTORY (the factory returns model, example_inputs)")
    p.add_argument("--input", action="append", metavar="DTYPE[SHAPE]",
                   help="example input, e.g. float32[8,3,224,224]; repeat for several")
    p.add_argument("-D", dest="factory_args", action="append", metavar="KEY=VALUE",
                   help="keyword argument for the factory, e.g. -D batch_size=4")
    p.add_argument("--optimizer", default="adamw",
                   help="sgd, sgd-momentum, adam, adamw or none (default adamw)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _optimizer(name: str):
    return None if name.lower() == "none" else name


def cmd_plan(args) -> int:
    from memfit.api import plan_captured
    from memfit.budget import Budget
    from memfit.capture import capture
    from memfit.cli_util import Progress, load_factory, parse_kv

    budget = Budget.parse(args.budget) if args.budget is not None else None
    if args.plot:
        _require_matplotlib()
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {args.model}"):
        model, inputs, kwargs = load_factory(args.model, args.input, parse_kv(args.factory_args))
    with progress.stage(f"capturing {type(model).__name__}"):
        cap = capture(model, inputs, kwargs, dynamic=not args.static)
    with progress.stage("simulating one training step on fake tensors"):
        p = plan_captured(cap, budget, optimizer=_optimizer(args.optimizer), symbolic=not args.static)
    if args.json:
        print(p.to_json(indent=2))
    else:
        print(p.format_table(depth=args.depth))
    if args.plot:
        from memfit.plotting import plot_timeline
        plot_timeline(p, args.plot)
        print(f"timeline written to {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """Plan a real model, run the step for real, print prediction next to measurement."""
    import os

    from memfit.api import plan_captured
    from memfit.budget import Budget, format_bytes
    from memfit.capture import capture
    from memfit.cli_util import Progress, UsageError, load_factory, parse_kv
    from memfit.measure import measure

    spec = args.model
    if spec.split(":")[0].endswith(".py") and not os.path.isfile(spec.split(":")[0]):
        raise UsageError(f"{spec.split(':')[0]} not found: run the demo from the repository root, "
                         "or name a model file: memfit demo FILE.py:FACTORY")
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {spec}"):
        model, inputs, kwargs = load_factory(spec, None, parse_kv(args.factory_args))
    opt = _optimizer(args.optimizer)
    budget = Budget.parse(args.budget) if args.budget else None
    with progress.stage(f"capturing {type(model).__name__}"):
        cap = capture(model, inputs, kwargs)
    with progress.stage("simulating one training step on fake tensors"):
        p = plan_captured(cap, budget, optimizer=opt)
    with progress.stage("running one real training step to measure it"):
        m = measure(model, example_inputs=inputs, example_kwargs=kwargs, optimizer=opt)
    print(p.format_table(depth=args.depth))
    print()
    print(f"predicted against measured ({m.method}):")
    rows = [("parameters", p.categories["parameters"], m.parameters),
            ("gradients", p.categories["gradients"], m.gradients),
            ("optimizer_state", p.categories["optimizer_state"], m.optimizer_state),
            ("saved_activations", p.categories["saved_activations"], m.saved_activations),
            ("peak", p.peak_bytes, m.peak_bytes)]
    print(f"{'':<20}{'predicted':>14}{'measured':>14}{'error':>9}")
    for name, pred, meas in rows:
        err = f"{(pred - meas) / meas:+.1%}" if meas else "-"
        print(f"{name:<20}{format_bytes(pred):>14}{format_bytes(meas):>14}{err:>9}")
    return 0


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        from memfit.cli_util import UsageError
        raise UsageError("--plot needs matplotlib: pip install 'memfit[plot]'") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfit", description="Train PyTorch models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="predict the memory of one training step")
    _add_model_args(p)
    p.add_argument("--budget", help="bytes, e.g. 6GiB, 800MB, or a percentage such as 50%%")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the memory timeline, stacked by category")
    p.add_argument("--depth", type=int, default=2, help="module depth of the table (default 2)")
    p.add_argument("--static", action="store_true",
                   help="static shapes: faster, but no batch-size expression or largest batch")
    p.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="plan a real model and compare with a measured step")
    d.add_argument("model", nargs="?", default="examples/gpt2_like.py:make")
    d.add_argument("-D", dest="factory_args", action="append", metavar="KEY=VALUE")
    d.add_argument("--optimizer", default="adamw")
    d.add_argument("--budget", default=None)
    d.add_argument("--depth", type=int, default=1)
    d.add_argument("--debug", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    try:
        from memfit.passes.cli import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="memfit: %(message)s")
    try:
        return args.func(args)
    except (MemfitError, ValueError, TypeError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"memfit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
