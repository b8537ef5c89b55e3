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
    from memfit.api import optimize, plan_captured
    from memfit.budget import Budget
    from memfit.capture import capture
    from memfit.cli_util import Progress, factory_loss_fn, load_factory, parse_kv

    budget = Budget.parse(args.budget) if args.budget is not None else None
    if args.plot:
        _require_matplotlib()
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {args.model}"):
        model, inputs, kwargs = load_factory(args.model, args.input, parse_kv(args.factory_args))
        loss_fn = factory_loss_fn(args.model)
    opt = _optimizer(args.optimizer)
    with progress.stage(f"capturing {type(model).__name__}"):
        cap = capture(model, inputs, kwargs, dynamic=not args.static)
    with progress.stage("simulating one training step on fake tensors"):
        p = plan_captured(cap, budget, optimizer=opt, loss_fn=loss_fn, symbolic=not args.static)
    if p.fits is False and not args.no_optimize:
        # Over budget: show what optimize() would do (the same planner and decisions).
        with progress.stage(f"planning passes to fit {args.budget} (techniques: {args.techniques or 'default'})"):
            p = optimize(model, args.budget, example_inputs=inputs, example_kwargs=kwargs, optimizer=opt,
                         loss_fn=loss_fn, techniques=args.techniques).memfit_plan
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
    """Optimize a real model under a budget; print the plan and, for the unmodified and the
    optimized model, predicted against measured memory of one real training step."""
    import os

    import torch

    from memfit.api import optimize, plan_captured
    from memfit.budget import format_bytes
    from memfit.capture import capture
    from memfit.cli_util import Progress, UsageError, factory_loss_fn, load_factory, parse_kv
    from memfit.measure import measure

    spec = args.model
    if spec.split(":")[0].endswith(".py") and not os.path.isfile(spec.split(":")[0]):
        raise UsageError(f"{spec.split(':')[0]} not found: run the demo from the repository root, "
                         "or name a model file: memfit demo FILE.py:FACTORY")
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {spec}"):
        model, inputs, kwargs = load_factory(spec, None, parse_kv(args.factory_args))
        loss_fn = factory_loss_fn(spec)
    opt = _optimizer(args.optimizer)
    with progress.stage(f"capturing and planning {type(model).__name__} (fake tensors)"):
        p0 = plan_captured(capture(model, inputs, kwargs, dynamic=False), None, optimizer=opt,
                           loss_fn=loss_fn, symbolic=False)
    with progress.stage("measuring one real training step of the unmodified model"):
        m0 = measure(model, example_inputs=inputs, example_kwargs=kwargs, optimizer=opt, loss_fn=loss_fn)
    om = p1 = m1 = None
    if args.budget:
        with progress.stage(f"optimizing for a budget of {args.budget}"):
            om = optimize(model, args.budget, example_inputs=inputs, example_kwargs=kwargs, optimizer=opt,
                          loss_fn=loss_fn, techniques=args.techniques)
            p1 = om.memfit_plan
        with progress.stage("measuring one real training step of the optimized model"):
            m1 = measure(om, example_inputs=inputs, example_kwargs=kwargs, optimizer=opt, loss_fn=loss_fn)
    print((p1 or p0).format_table(depth=args.depth))
    print()
    print(f"predicted against measured ({m0.method}):")
    cols = [("unmodified", p0, m0)] + ([("optimized", p1, m1)] if p1 is not None else [])
    print(f"{'':<20}" + "".join(f"{name + ' pred':>16}{'measured':>12}{'error':>8}" for name, _, _ in cols))
    rows = [("saved_activations", lambda p: p.categories["saved_activations"], lambda m: m.saved_activations),
            ("peak", lambda p: p.peak_bytes, lambda m: m.peak_bytes)]
    for label, fp, fm in rows:
        line = f"{label:<20}"
        for _, p, m in cols:
            pred, meas = fp(p), fm(m)
            err = f"{(pred - meas) / meas:+.1%}" if meas else "-"
            line += f"{format_bytes(pred):>16}{format_bytes(meas):>12}{err:>8}"
        print(line)
    if p1 is not None:
        verdict = "within" if m1.peak_bytes <= p1.budget_bytes else "OVER"
        print(f"budget {args.budget} = {format_bytes(p1.budget_bytes)}: measured peak "
              f"{format_bytes(m1.peak_bytes)} is {verdict} it ({m1.peak_bytes / m0.peak_bytes:.0%} of the "
              f"unmodified step's measured peak)")
        # Same seed, same batch: gradients of the optimized model against the original's.
        grads = []
        for mdl in (om, model):
            torch.manual_seed(0)
            mdl.zero_grad(set_to_none=True)
            out = mdl(*inputs, **kwargs)
            (loss_fn(out) if loss_fn else _default_loss(out)).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            mdl.zero_grad(set_to_none=True)
        num = sum((a - b).double().pow(2).sum() for a, b in zip(*grads)) ** 0.5
        den = sum(b.double().pow(2).sum() for b in grads[1]) ** 0.5
        print(f"gradient relative error (whole model, fp32): {float(num / den):.2e}")
    return 0


def _default_loss(out):
    from memfit.cost_models.memory import default_loss
    return default_loss(out)


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
    p.add_argument("--techniques", default=None,
                   help="comma-separated techniques the planner may use when over budget "
                        "(checkpoint,quantize,fuse_conv_bn,sdpa,reversible,token_merge)")
    p.add_argument("--no-optimize", action="store_true",
                   help="over budget: only report, do not plan passes")
    p.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="plan a real model and compare with a measured step")
    d.add_argument("model", nargs="?", default="examples/gpt2_like.py:make")
    d.add_argument("-D", dest="factory_args", action="append", metavar="KEY=VALUE")
    d.add_argument("--optimizer", default="adamw")
    d.add_argument("--budget", default="70%",
                   help="budget for the optimized run (default 70%% of the unmodified peak; '' to skip)")
    d.add_argument("--techniques", default=None)
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
