"""Whole-step budgets at real widths: memfit.optimize against the alternatives, side by side.

    python tools/bench/whole_step.py                            # GPT-2-small, BERT-base, ViT-B dims, 4 layers
    python tools/bench/whole_step.py --models gpt2 --layers 12 --budgets 50,30 --steps 2

Models (Hugging Face transformers, built from configs, random weights, no downloads), each with
a real `torch.optim.AdamW` instance and a loss over real labels:
- gpt2: GPT2LMHeadModel at GPT-2-small widths (d=768, 12 heads, vocab 50257), B=4, T=512; the
  user's loss `F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())`, brought into the
  graph with memfit.with_loss;
- bert: BertForMaskedLM at BERT-base widths, B=4, T=128, `labels=` (the model's own loss);
- vit: ViTForImageClassification at ViT-B/16 widths, 224 px, B=4, `labels=`.

Variants: eager (the unmodified step), per-block checkpointing (the model's own
gradient_checkpointing_enable, non-reentrant), chunked cross-entropy alone (passes="chunked-ce"),
torchao's AdamW8bit alone (when torchao is installed), torch.compile (inductor) with functorch's
activation_memory_budget at each of `--compile-budgets` (a fraction of the activations its
partitioner may save; compile time is excluded: each is compiled and run once before timing),
memfit.optimize at fractions of the eager step's predicted peak, with the default techniques and
with the optimizer step in backward allowed too. Per variant: the measured peak
of one whole step (memfit.measure: parameters, gradients, AdamW state, activations, the
optimizer step), the step-time ratio to eager (forward, backward and the optimizer step,
medians of alternated repeats) and the loss after `--steps` AdamW steps from the same weights, relative to eager's.
A budget no plan meets is reported with memfit's refusal (its floor).
"""

from __future__ import annotations

import argparse
import copy
import functools
import time

import common  # noqa: F401 - puts the repository root on sys.path
import torch
import torch.nn.functional as F

import memfit
import memfit.runtime.lowbit as memfit_lowbit
from memfit.budget import format_bytes
from memfit.planning.techniques import DEFAULT_TECHNIQUES

MiB = 2**20


def gpt2(layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                                       use_cache=False))
    x = torch.randint(0, 50257, (4, 512))
    y = x.roll(-1, dims=1)

    def ce(out, y):
        return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return model, memfit.with_loss(model, ce), (x, y), {}


def bert(layers: int):
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12,
                                       intermediate_size=3072))
    ids = torch.randint(0, 30522, (4, 128))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)
    return model, model, (), {"input_ids": ids, "labels": labels}


def vit(layers: int):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12,
                                                intermediate_size=3072, image_size=224, patch_size=16,
                                                num_labels=1000))
    return model, model, (), {"pixel_values": torch.randn(4, 3, 224, 224), "labels": torch.randint(0, 1000, (4,))}


MODELS = {"gpt2": gpt2, "bert": bert, "vit": vit}


def loss_of(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def own(o) -> bool:
    """Whether a variant steps with the optimizer memfit (or the variant) gave it: fused into
    backward or with low-bit states. The others get a fresh AdamW."""
    from memfit.runtime.lowbit import is_low_bit
    from memfit.runtime.optim import StepInBackward

    return isinstance(o, StepInBackward) or is_low_bit(o)


def reset(o):
    """`o` with its state dropped (its groups and hyper-parameters kept): a fresh start."""
    o.load_state_dict({"state": {}, "param_groups": o.state_dict()["param_groups"]})
    return o


def train(fn, model, args, kwargs, steps: int, state, given=None) -> float:
    """The loss after `steps` AdamW steps of `fn` from the weights in `state`, with a fresh AdamW
    (or the variant's own optimizer, `own`, from a fresh state)."""
    model.load_state_dict(state[0])
    opt = reset(given) if own(given) else torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    torch.manual_seed(0)
    loss = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(fn(*args, **kwargs))
        loss.backward()
        opt.step()
    with torch.no_grad():
        torch.manual_seed(0)
        final = float(loss_of(fn(*args, **kwargs)))
    model.load_state_dict(state[0])
    return final


class Compiled(torch.nn.Module):
    """`step` under torch.compile (inductor), its forward and backward partitioned with functorch's
    activation_memory_budget `budget` (torch's own recompute knob: 1 saves what the default
    partitioner saves, 0 the least it can). Each instance compiles its own frame, so the budgets
    do not share dynamo's cache."""

    def __init__(self, step: torch.nn.Module, budget: float):
        super().__init__()
        self.budget = budget
        ns: dict = {}
        # a fresh code object per instance: dynamo caches compiled graphs per code object, and its
        # guards do not include functorch's config, so one shared frame would serve every budget
        exec("def call(*a, **k):\n    return step(*a, **k)\n", {"step": step}, ns)  # noqa: S102
        self.call = torch.compile(ns["call"])

    def forward(self, *a, **k):
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=self.budget):
            return self.call(*a, **k)


def timed(fn, args, kwargs, opt) -> float:
    """Seconds of one training step, optimizer step included (a fused step runs inside backward)."""
    opt.zero_grad(set_to_none=True)
    common.sync(args, kwargs)
    t0 = time.perf_counter()
    loss_of(fn(*args, **kwargs)).backward()
    opt.step()
    common.sync(args, kwargs)
    return time.perf_counter() - t0


def bench(name: str, layers: int, budgets, steps: int, repeats: int, device: str = "cpu", compile_budgets=()):
    torch.manual_seed(0)
    model, step, args, kwargs = MODELS[name](layers)
    model.to(device).train()
    args = tuple(t.to(device) for t in args)
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    state = (copy.deepcopy(model.state_dict()),)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    params = list(model.parameters())

    eager_plan = memfit.plan(step, example_inputs=args, example_kwargs=kwargs, optimizer=opt, loss_fn=loss_of,
                             symbolic=False)
    variants = {"eager": (step, None, "", opt)}

    class _Ckpt(torch.nn.Module):    # the model's own per-block checkpointing, on while it runs
        def __init__(self):
            super().__init__()
            self.inner = step

        def forward(self, *a, **k):
            before = list(getattr(model, "_require_grads_hooks", []))
            # transformers 5 renamed it (the old name warns on every call); 4.x has only the old
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                off = model.activation_checkpointing_disable
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                off = model.gradient_checkpointing_disable
            try:
                return self.inner(*a, **k)
            finally:
                off()
                # enabling adds an input-requires-grad hook to models fed input_ids, which
                # disabling leaves in place (transformers 5): removed, so that each call leaves
                # the model as it found it (compiled variants guard on its hooks)
                for h in getattr(model, "_require_grads_hooks", []):
                    if h not in before:
                        h.remove()
                if hasattr(model, "_require_grads_hooks"):
                    model._require_grads_hooks = before

    variants["per-block checkpoint"] = (_Ckpt(), None, "", opt)
    with torch.no_grad():       # sets the attributes its toggling leaves, before anything is compiled
        variants["per-block checkpoint"][0](*args, **kwargs)
    ce_only = memfit.optimize(step, None, example_inputs=args, example_kwargs=kwargs, loss_fn=loss_of,
                              passes="chunked-ce")
    variants["chunked-ce alone"] = (ce_only, None, "", opt)
    if memfit_lowbit.available() is None:
        ao = memfit_lowbit.torchao_optim()
        variants["torchao AdamW8bit alone"] = (step, None, "", ao.AdamW8bit(params, lr=1e-4, weight_decay=0.1))
    for b in compile_budgets:
        c = Compiled(step, b)
        t0 = time.perf_counter()
        loss_of(c(*args, **kwargs)).backward()          # compiled here, outside every measurement
        model.zero_grad(set_to_none=True)
        print(f"{name}: torch.compile with activation_memory_budget={b:g} compiled in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        variants[f"torch.compile, activation_memory_budget={b:g}"] = (c, None, "", opt)
    fused = DEFAULT_TECHNIQUES + ("step_in_backward",)
    for b in budgets:
        for label, techniques in ((f"memfit {b}%", None), (f"memfit {b}% + step in backward", fused)):
            try:
                om, new_opt = memfit.optimize(step, f"{b}%", example_inputs=args, example_kwargs=kwargs,
                                              loss_fn=loss_of, optimizer=opt, techniques=techniques)
                p = om.memfit_plan
                what = ", ".join(sorted({d.action.split("{")[0] for d in p.decisions if d.action != "kept"}))
                variants[label] = (om, p, what, new_opt)
            except memfit.BudgetError as e:
                variants[label] = (None, None, f"refused: {str(e).split('. What')[0]}", None)
    rows, base = [], None

    def stepper(o):
        return o if own(o) else torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

    runs = {k: functools.partial(timed, fn, args, kwargs, stepper(o)) for k, (fn, _, _, o) in variants.items()
            if fn is not None}
    t = common.alternated(runs, repeats, baseline="eager", warmup=1)
    model.load_state_dict(state[0])             # the timed steps moved the weights
    for _, _, _, o in variants.values():
        if own(o):
            reset(o)
    eager_loss = train(step, model, args, kwargs, steps, state)
    for k, (fn, p, what, o) in variants.items():
        if fn is None:
            rows.append([k, "-", "-", "-", "-", "-", what])
            continue
        m = memfit.measure(fn, example_inputs=args, example_kwargs=kwargs, optimizer=o, loss_fn=loss_of)
        base = base or m.peak_bytes
        loss = eager_loss if k == "eager" else train(fn, model, args, kwargs, steps, state, o)
        pred = f"{p.peak_bytes / MiB:.0f} (budget {p.budget_bytes / MiB:.0f})" if p is not None else "-"
        rows.append([k, f"{m.peak_bytes / MiB:.0f} ({m.peak_bytes / base:.0%})", pred, f"{t.ratio[k]:.2f}x",
                     f"{loss:.4f}", f"{(loss - eager_loss) / abs(eager_loss):+.2e}", what])
    bd = {c: v / MiB for c, v in eager_plan.peak_breakdown.items() if v}
    print(f"\n### {name}, {layers} layers: eager step predicted {format_bytes(eager_plan.peak_bytes)} "
          f"({', '.join(f'{c} {v:.0f} MiB' for c, v in bd.items())})\n")
    print(common.table(["variant", "measured peak MiB (of eager)", "predicted MiB", "step time",
                        f"loss after {steps} steps", "vs eager", "decisions"], rows), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,bert,vit")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budgets", default="50,30,20", help="percentages of the eager step's predicted peak")
    ap.add_argument("--steps", type=int, default=3, help="AdamW steps for the loss comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-budgets", default="1,0.5,0",
                    help="torch.compile variants: functorch activation_memory_budget values ('' for none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(common.machine(a.device))
    for name in a.models.split(","):
        bench(name, a.layers, [int(b) for b in a.budgets.split(",") if b], a.steps, a.repeats, a.device,
              [float(b) for b in a.compile_budgets.split(",") if b])


if __name__ == "__main__":
    main()
