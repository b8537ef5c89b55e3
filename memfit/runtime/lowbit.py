"""Adam and AdamW with their two moment states in 8 or 4 bits: torchao's low-bit optimizers
(`torchao.optim.AdamW8bit` and friends; Dettmers et al. 2022 "8-bit Optimizers via Block-wise
Quantization" for 8 bits, Li et al. 2023 "Memory Efficient Optimizers with 4-bit States" for 4),
installed with `pip install memfit[optim]`.

`to_low_bit(optimizer, bits)` builds one from a user's torch.optim.Adam/AdamW instance: the same
parameter groups and hyper-parameters, its existing moments quantized into the new states. The
update is approximate (the moments are stored block-wise quantized; the arithmetic is fp32):
torchao's tests and the papers above report training curves matching 32-bit Adam. memfit
chooses it only where exact techniques cannot meet a budget, and says so in the plan.

What torchao does, and memfit prices (memfit.cost_models.lowbit): a parameter of at least 4096
elements whose count divides the block size gets quantized states (codes, one scale per block,
the code book); smaller ones keep fp32 states. Its step is `torch.compile`d once per parameter
shape, so the first step of a model with k distinct shapes compiles k times. The learning rate
becomes a tensor in each group: LR schedulers update it in place; assigning a float to
`group["lr"]` afterwards is refused by torchao's step.

Large parameters are stepped in row chunks (`CHUNK_ELEMENTS`, `row_chunks`): torchao's step
dequantizes a parameter's two moments to fp32 for its update, which outside a fused GPU kernel
(torch.compile's CPU code) is 8 bytes of scratch per element of the largest parameter (a
GPT-2 embedding: 295 MiB). The classes `to_low_bit` makes are torchao's with that one change
(`chunked_class`): the same compiled update on row slices whose boundaries fall on
quantization blocks (torchao's states support exactly such slices), so every block is
quantized as a whole and the update is torchao's, while the scratch is that of one chunk.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch

from memfit import quiet_import_noise

BITS = (8, 4)
# torchao's class for (bits, decoupled weight decay)
_CLASSES = {(8, False): "Adam8bit", (8, True): "AdamW8bit", (4, False): "Adam4bit", (4, True): "AdamW4bit"}


def torchao_optim():
    """`torchao.optim`, imported without its import-time noise; ImportError says how to get it."""
    quiet_import_noise()
    try:
        import torchao.optim as ao
    except ImportError as e:
        raise ImportError("low-bit optimizer states need torchao: pip install 'memfit[optim]' "
                          f"(or pip install torchao); {e}") from e
    # torch warns once per compile that torchao's state tensors lack a stable hash for its
    # compile cache: a performance note about the library, not something the user can act on.
    warnings.filterwarnings("ignore", message=r"OptimState\w+ does not implement _stable_hash_for_caching")
    return ao


def available() -> str | None:
    """None when torchao's low-bit optimizers can be used here, else why not."""
    try:
        torchao_optim()
    except ImportError as e:
        return str(e)
    return None


def is_low_bit(optimizer) -> bool:
    """Whether `optimizer` is one of torchao's Adam-family low-bit optimizers."""
    return any(c.__module__.startswith("torchao.optim") and c.__name__ == "_AdamBase"
               for c in type(optimizer).__mro__)


def bits_of(optimizer) -> int | None:
    """8 or 4 for torchao's 8- and 4-bit optimizers, None for anything else."""
    if not is_low_bit(optimizer):
        return None
    name = type(optimizer).__name__
    return 8 if "8bit" in name else 4 if "4bit" in name else None


def why_not(optimizer) -> str | None:
    """Why `optimizer` cannot be given low-bit states, or None when it can."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return "no optimizer instance was given (pass optimizer=torch.optim.AdamW(...) to let memfit choose its states)"
    if is_low_bit(optimizer):
        return f"{type(optimizer).__name__} already keeps low-bit states"
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(optimizer).__name__} is not torch.optim.Adam or AdamW (torchao quantizes Adam's moments)"
    for g in optimizer.param_groups:
        if g.get("maximize"):
            return "a group has maximize=True, which torchao's Adam does not implement"
        if g.get("differentiable"):
            return "a group is differentiable"
        if g.get("amsgrad"):
            return "a group uses amsgrad (memfit does not convert its third state)"
        for p in g["params"]:
            if p.is_complex():
                return "complex parameters"
    return None


def decoupled(optimizer) -> bool:
    """AdamW's decoupled weight decay (torch.optim.Adam takes it as a flag too)."""
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.defaults.get("decoupled_weight_decay"))


def low_bit_class(optimizer, bits: int):
    """torchao's class for `optimizer`'s update at `bits`."""
    if bits not in BITS:
        raise ValueError(f"optimizer state bits must be one of {BITS}, got {bits}")
    return getattr(torchao_optim(), _CLASSES[(bits, decoupled(optimizer))])


# Rows of a large parameter stepped at once: about this many elements (a design choice, not a
# measurement: 1M elements keep the 8-bit step's scratch near 8 MiB on a CPU and cost a few
# more kernel launches per large parameter on a GPU).
CHUNK_ELEMENTS = 1 << 20
# torchao's per-parameter update, whose arguments the chunked step passes on
_STEP_ARGS = ("p", "grad", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "lr", "beta1", "beta2",
              "weight_decay", "eps", "IS_ADAMW", "BF16_STOCHASTIC_ROUND")


def row_chunks(shape, block_size: int, quantized: bool, target: int = CHUNK_ELEMENTS):
    """[(start, end), ...] rows of a parameter of `shape` stepped at once, or None for the
    whole. With quantized states each boundary falls on a block (start * row % block == 0)."""
    if len(shape) == 0:
        return None
    rows = shape[0]
    row = math.prod(shape[1:])
    if rows * row <= target or rows < 2:
        return None
    step = max(1, target // max(row, 1))
    if quantized:
        unit = block_size // math.gcd(row, block_size)
        step = max(unit, step // unit * unit)
    if step >= rows:
        return None
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


@functools.lru_cache(maxsize=None)
def _update_fn():
    """torchao's single_param_adam when its arguments are the ones the chunked step passes,
    else None (then torchao's own step runs, unchunked)."""
    import torchao.optim.adam as adam

    fn = getattr(adam, "single_param_adam", None)
    if fn is None or tuple(inspect.signature(fn).parameters) != _STEP_ARGS:
        return None
    return fn


class _ChunkedStep:
    """torchao's `_AdamBase.step` with large parameters updated a chunk of rows at a time
    (module doc). `memfit_chunk_elements` tells the cost model how it steps."""

    memfit_chunk_elements = CHUNK_ELEMENTS

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update = torch.compile(_update_fn(), fullgraph=True, dynamic=False)
        with torch._dynamo.utils.disable_cache_limit():     # noqa: SLF001 - as torchao's own step
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    raise RuntimeError("lr was changed to a non-Tensor object; update it in place "
                                       "(optimizer.param_groups[0]['lr'].fill_(new_lr))")
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("Sparse gradient is not supported")
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    quantized = type(state["exp_avg"]) is not torch.Tensor
                    parts = (p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"])
                    for span in row_chunks(tuple(p.shape), self.block_size, quantized) or [None]:
                        w, g, m, v = parts if span is None else (t[span[0]:span[1]] for t in parts)
                        update(w, g, state["step"], m, v, None, group["lr"], group["betas"][0],
                               group["betas"][1], group["weight_decay"], group["eps"], self.is_adamw,
                               self.bf16_stochastic_round and p.dtype is torch.bfloat16)
        return loss


@functools.lru_cache(maxsize=None)
def chunked_class(cls):
    """`cls` (torchao's) stepping large parameters in chunks; `cls` itself when torchao's
    update function is not the one this was written against."""
    if _update_fn() is None:
        return cls
    return type(cls.__name__, (_ChunkedStep, cls), {"__module__": __name__, "__qualname__": cls.__name__})


def to_low_bit(optimizer: torch.optim.Optimizer, bits: int) -> torch.optim.Optimizer:
    """torchao's Adam/AdamW with `bits`-bit states over `optimizer`'s groups (every
    hyper-parameter kept), its existing moments and step counts carried over (quantized).
    The given optimizer is left as it was."""
    why = why_not(optimizer)
    if why is not None:
        raise ValueError(f"cannot give the optimizer low-bit states: {why}")
    cls = chunked_class(low_bit_class(optimizer, bits))
    groups = []
    for g in optimizer.param_groups:
        lr = g["lr"]
        groups.append({"params": list(g["params"]), "betas": tuple(float(b) for b in g["betas"]),
                       "eps": float(g["eps"]), "weight_decay": float(g["weight_decay"]), "amsgrad": False,
                       "lr": lr.detach().clone().float() if isinstance(lr, torch.Tensor) else float(lr),
                       **{k: v for k, v in g.items() if k in ("initial_lr",)}})
    d = optimizer.defaults
    new = cls(groups, lr=float(d.get("lr", 1e-3)) if not isinstance(d.get("lr"), torch.Tensor) else float(d["lr"]),
              betas=tuple(float(b) for b in d.get("betas", (0.9, 0.999))), eps=float(d.get("eps", 1e-8)),
              weight_decay=float(d.get("weight_decay", 0.0)))
    for p, st in optimizer.state.items():
        if not st:
            continue
        with torch.no_grad():
            ns = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                  "exp_avg": new._new_buffer(p, True), "exp_avg_sq": new._new_buffer(p, False)}
            ns["exp_avg"].copy_(st["exp_avg"].float())
            ns["exp_avg_sq"].copy_(st["exp_avg_sq"].float())
        new.state[p] = ns
    return new


def settings(optimizer) -> dict:
    """The attributes of torchao's optimizers that are not constructor defaults (a copy of one
    over other parameters needs them)."""
    return {k: getattr(optimizer, k) for k in ("block_size", "bf16_stochastic_round", "is_adamw")
            if hasattr(optimizer, k)}

