"""PyTorch's CUDA caching allocator, simulated: what torch.cuda.max_memory_allocated and
torch.cuda.max_memory_reserved would report for a sequence of allocations and frees.

The rules are those of the native allocator in c10/cuda/CUDACachingAllocator.cpp (torch 2.13,
read for this), on one stream:

- a request is rounded up to a multiple of 512 bytes (512 at least);
- requests of at most 1 MiB come from the small pool, the others from the large pool;
- a request takes the smallest free cached block of its pool that holds it (the lowest address
  among equal sizes);
- with none, a new segment is reserved (cudaMalloc): 2 MiB for a small request, 20 MiB for a
  request under 10 MiB, else the request rounded up to a multiple of 2 MiB;
- the block taken is split when the rest is worth keeping: at least 512 bytes in the small
  pool, more than 1 MiB in the large pool; otherwise the whole block is handed out, and
  "allocated" counts all of it;
- a freed block merges with its free neighbours in its segment; segments are not returned to
  the device (not before an out-of-memory retry or torch.cuda.empty_cache()).

With `expandable_segments:True` each pool keeps one segment that grows by pages (2 MiB small,
20 MiB large) and splits any rest of 512 bytes or more. Other allocator options
(max_split_size_mb, roundup_power2_divisions, garbage_collection_threshold, a memory fraction)
are not modelled: `AllocatorConfig.from_env` names the option and the prediction is skipped.

Not modelled either: several streams (a block freed on one stream waits for the others),
CUDA graphs' private pools, and memory allocated outside the caching allocator (the CUDA
context, NCCL's buffers, cuBLAS workspaces when not given through the allocator).
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20            # largest request of the small pool
SMALL_BUFFER = 2 << 20          # a small pool's segment, and its page when expandable
MIN_LARGE_ALLOC = 10 << 20      # requests from here on get a segment of their own size
ROUND_LARGE = 2 << 20
LARGE_BUFFER = 20 << 20         # a large pool's segment for requests under MIN_LARGE_ALLOC, and its page

ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def round_size(nbytes: int) -> int:
    """The bytes a request of `nbytes` is given (a multiple of 512)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else MIN_BLOCK * -(-nbytes // MIN_BLOCK)


def segment_size(size: int) -> int:
    """The bytes reserved for a new segment serving a (rounded) request of `size`."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * -(-size // ROUND_LARGE)


@dataclass(frozen=True)
class AllocatorConfig:
    """The allocator options the simulation follows. `unmodelled`: options set that it does
    not follow (then no prediction is made)."""

    expandable_segments: bool = False
    unmodelled: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ=None) -> "AllocatorConfig":
        """The options of PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF), as torch reads them:
        comma-separated `key:value` pairs."""
        environ = os.environ if environ is None else environ
        text = next((environ[v] for v in ENV_VARS if environ.get(v)), "")
        expandable, other = False, []
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if key == "expandable_segments":
                expandable = value.lower() == "true"
            elif key == "backend" and value == "native":
                continue
            else:
                other.append(item)
        return cls(expandable_segments=expandable, unmodelled=tuple(other))


class _Block:
    __slots__ = ("addr", "size", "small", "prev", "next", "allocated")

    def __init__(self, addr: int, size: int, small: bool):
        self.addr, self.size, self.small = addr, size, small
        self.prev = self.next = None
        self.allocated = False


class CachingAllocator:
    """The allocator's state and its statistics: `allocated` and `reserved` now, and their
    peaks since the start."""

    def __init__(self, config: AllocatorConfig | None = None):
        self.config = config or AllocatorConfig()
        if self.config.unmodelled:
            raise ValueError(f"allocator option(s) {', '.join(self.config.unmodelled)} are not modelled")
        self._free = {True: [], False: []}       # pool (small?) -> sorted [(size, addr, block)]
        self._tail = {True: None, False: None}    # expandable: the last block of each pool's segment
        self._next_addr = 1 << 40
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0

    # -- the free lists
    def _insert(self, b: _Block) -> None:
        bisect.insort(self._free[b.small], (b.size, b.addr, id(b), b))

    def _remove(self, b: _Block) -> None:
        pool = self._free[b.small]
        i = bisect.bisect_left(pool, (b.size, b.addr, id(b)))
        assert pool[i][3] is b
        del pool[i]

    def _best_fit(self, size: int, small: bool) -> _Block | None:
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size,))
        if i == len(pool):
            return None
        b = pool[i][3]
        del pool[i]
        return b

    # -- new memory
    def _new_segment(self, size: int, small: bool) -> _Block:
        seg = segment_size(size)
        b = _Block(self._next_addr, seg, small)
        self._next_addr += seg + SMALL_BUFFER       # segments never adjoin
        self._reserve(seg)
        return b

    def _grow(self, size: int, small: bool) -> _Block:
        """Expandable segments: map pages at the end of the pool's one segment until its free
        end holds `size`; returns that free end (out of the free list)."""
        page = SMALL_BUFFER if small else LARGE_BUFFER
        tail = self._tail[small]
        if tail is None or tail.allocated:
            start = self._next_addr if tail is None else tail.addr + tail.size
            if tail is None:
                self._next_addr += 1 << 44
            pages = -(-size // page)
            b = _Block(start, pages * page, small)
            b.prev = tail
            if tail is not None:
                tail.next = b
        else:
            self._remove(tail)
            pages = -(-(size - tail.size) // page)
            tail.size += pages * page
            b = tail
        self._tail[small] = b
        self._reserve(pages * page)
        return b

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # -- the allocator's two calls
    def malloc(self, nbytes: int) -> _Block | None:
        """Allocate `nbytes`; returns the block (give it to free), None for 0 bytes."""
        if nbytes <= 0:
            return None
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        expandable = self.config.expandable_segments
        b = self._best_fit(size, small)
        if b is None:
            b = self._grow(size, small) if expandable else self._new_segment(size, small)
        rest = b.size - size
        if (rest >= MIN_BLOCK) if (small or expandable) else (rest > SMALL_SIZE):
            r = _Block(b.addr + size, rest, small)
            r.prev, r.next = b, b.next
            if b.next is not None:
                b.next.prev = r
            b.next = r
            b.size = size
            if self._tail[small] is b:
                self._tail[small] = r
            self._insert(r)
        b.allocated = True
        self.allocated += b.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return b

    def free(self, b: _Block | None) -> None:
        if b is None:
            return
        assert b.allocated, "freed twice"
        b.allocated = False
        self.allocated -= b.size
        for n in (b.prev, b.next):
            if n is not None and not n.allocated:
                self._remove(n)
                if n is b.prev:
                    b.addr, b.prev = n.addr, n.prev
                    if n.prev is not None:
                        n.prev.next = b
                else:
                    b.next = n.next
                    if n.next is not None:
                        n.next.prev = b
                    if self._tail[b.small] is n:
                        self._tail[b.small] = b
                b.size += n.size
        self._insert(b)


def replay_steps(events, start_events: int, config: AllocatorConfig, steps: int = 3) -> tuple[int, int]:
    """(allocated peak, reserved peak) of `steps` training steps in a fresh process, each the
    simulated step's `events` ([(+1 alloc / -1 free, store, phase)], stores with .nbytes):
    what exists before the step (events[:start_events]: parameters, buffers, inputs, optimizer
    state) is allocated once, in order; what the step leaves allocated (its gradients) is freed
    before the next step, as zero_grad(set_to_none=True) frees it. The peaks are over all the
    steps (the reserved one grows as segments are cached)."""
    alloc = CachingAllocator(config)
    blocks: dict[int, _Block | None] = {}

    def run(evs):
        for sign, s, _ in evs:
            if sign > 0:
                blocks[id(s)] = alloc.malloc(s.nbytes)
            else:
                alloc.free(blocks.pop(id(s), None))

    run(events[:start_events])
    before = set(blocks)
    for _ in range(steps):
        run(events[start_events:])
        for k in [k for k in blocks if k not in before]:
            alloc.free(blocks.pop(k))
    return alloc.peak_allocated, alloc.peak_reserved


STEPS = 3


def predict(events, start_events: int, environ=None) -> tuple[dict | None, str]:
    """The CUDA allocator's peaks for a simulated step (replay_steps over STEPS steps, the
    options of the environment), and a plan note saying what was simulated. None, with the
    reason, when an option set is not modelled."""
    cfg = AllocatorConfig.from_env(environ)
    if cfg.unmodelled:
        return None, (f"CUDA caching allocator: option(s) {', '.join(cfg.unmodelled)} not modelled, so "
                      "max_memory_reserved is not predicted (memfit.cost_models.cuda_allocator)")
    allocated, reserved = replay_steps(events, start_events, cfg, STEPS)
    how = "expandable segments" if cfg.expandable_segments else "its default segments"
    return ({"allocated": allocated, "reserved": reserved, "expandable_segments": cfg.expandable_segments},
            f"CUDA caching allocator simulated over {STEPS} steps in a fresh process ({how}): "
            f"max_memory_allocated {allocated} B (block rounding), max_memory_reserved {reserved} B")


def bounded_peak(peak_bytes: int, allocator: dict | None, budget_of: str = "allocated") -> int:
    """The peak a budget bounds: with the allocator's simulated peaks (CUDA, `predict`), its
    max_memory_allocated (block rounding included) or, budget_of="reserved", max_memory_reserved;
    else the step's own peak."""
    return max(peak_bytes, allocator[budget_of]) if allocator else peak_bytes
