"""`memfit demo`: optimize a real model under a budget, then measure one real training step
of the unmodified and the optimized model and print prediction against measurement."""

from __future__ import annotations


def add_subcommand(sub) -> None:
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


def cmd_demo(args) -> int:
    """Optimize a real model under a budget; print the plan and, for the unmodified and the
    optimized model, predicted against measured memory of one real training step."""
    import os

    import torch

    from memfit.api import optimize, plan_captured
    from memfit.budget import format_bytes
    from memfit.ir.capture import capture
    from memfit.cli.util import Progress, UsageError, factory_loss_fn, load_factory, optimizer_arg, parse_kv
    from memfit.cost_models.measure import measure

    spec = args.model
    if spec.split(":")[0].endswith(".py") and not os.path.isfile(spec.split(":")[0]):
        raise UsageError(f"{spec.split(':')[0]} not found: run the demo from the repository root, "
                         "or name a model file: memfit demo FILE.py:FACTORY")
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {spec}"):
        model, inputs, kwargs = load_factory(spec, None, parse_kv(args.factory_args))
        loss_fn = factory_loss_fn(spec)
    opt = optimizer_arg(args.optimizer)
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
