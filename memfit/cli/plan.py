"""`memfit plan`: predict the memory of one training step; over budget, show what
`memfit.optimize` would decide."""

from __future__ import annotations

import sys


def add_subcommand(sub) -> None:
    from memfit.cli.util import add_model_args

    p = sub.add_parser("plan", help="predict the memory of one training step")
    add_model_args(p)
    p.add_argument("--budget", help="bytes, e.g. 6GiB, 800MB, or a percentage such as 50%%")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="write the memory timeline, stacked by category")
    p.add_argument("--depth", type=int, default=2, help="module depth of the table (default 2)")
    p.add_argument("--static", action="store_true",
                   help="static shapes: faster, but no batch-size expression or largest batch")
    p.add_argument("--techniques", default=None,
                   help="comma-separated techniques the planner may use when over budget "
                        "(checkpoint,quantize,offload,fuse_conv_bn,sdpa,chunked_ce,sparse_embedding_grad,step_in_backward,optimizer_8bit,"
                        "optimizer_4bit,reversible,token_merge)")
    p.add_argument("--data-parallel", choices=["ddp", "fsdp"], default=None,
                   help="plan one rank: 'ddp' (DistributedDataParallel, its gradient buckets included) or 'fsdp' "
                        "(FSDP2 through memfit.fully_shard, over --world-size ranks); give the per-rank batch")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --data-parallel fsdp: the ranks FSDP2 shards over (default 1)")
    p.add_argument("--budget-of", choices=["allocated", "reserved"], default="allocated",
                   help="on CUDA, what the budget bounds: torch.cuda.max_memory_allocated (default) or "
                        "max_memory_reserved, as the simulated caching allocator gives them")
    p.add_argument("--no-optimize", action="store_true",
                   help="over budget: only report, do not plan passes")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from memfit.api import optimize, plan_captured
    from memfit.budget import Budget
    from memfit.ir.capture import capture
    from memfit.cli.util import Progress, factory_loss_fn, load_factory, optimizer_arg, parse_kv

    budget = Budget.parse(args.budget) if args.budget is not None else None
    if args.plot:
        _require_matplotlib()
    progress = Progress(not args.quiet)
    with progress.stage(f"loading {args.model}"):
        model, inputs, kwargs = load_factory(args.model, args.input, parse_kv(args.factory_args),
                                             allow_module=args.module)
        loss_fn = factory_loss_fn(args.model)
    opt = optimizer_arg(args.optimizer)
    with progress.stage(f"capturing {type(model).__name__}"):
        cap = capture(model, inputs, kwargs, dynamic=not args.static)
        cap.data_parallel = args.data_parallel
        if args.data_parallel == "fsdp":
            from memfit.api import set_fsdp

            set_fsdp(cap, model, args.world_size or 1)
    with progress.stage("simulating one training step on fake tensors"):
        p = plan_captured(cap, budget, optimizer=opt, loss_fn=loss_fn, symbolic=not args.static,
                          budget_of=args.budget_of)
    if p.fits is False and not args.no_optimize:
        # Over budget: show what optimize() would do (the same planner and decisions).
        # an instance of the named optimizer, as a training loop holds one: the planner may then
        # choose its states (8-bit) or step it in backward, as optimize would for that loop
        from memfit.cost_models.optimizers import make_optimizer

        given = make_optimizer(opt, [t for t in model.parameters() if t.requires_grad]) if opt else None
        with progress.stage(f"planning passes to fit {args.budget} (techniques: {args.techniques or 'default'})"):
            out = optimize(model, args.budget, example_inputs=inputs, example_kwargs=kwargs, optimizer=given,
                           loss_fn=loss_fn, techniques=args.techniques, data_parallel=args.data_parallel,
                           world_size=(args.world_size or 1) if args.data_parallel == "fsdp" else None,
                           budget_of=args.budget_of)
            p = (out[0] if isinstance(out, tuple) else out).memfit_plan
    if args.json:
        print(p.to_json(indent=2))
    else:
        print(p.format_table(depth=args.depth))
    if args.plot:
        from memfit.cli.plotting import plot_timeline
        plot_timeline(p, args.plot)
        print(f"timeline written to {args.plot}", file=sys.stderr)
    return 0


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        from memfit.cli.util import UsageError
        raise UsageError("--plot needs matplotlib: pip install 'memfit[plot]'") from e
