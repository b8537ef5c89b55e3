#!/usr/bin/env bash
# The GPU check: one command for a lent H100/H200, under 8 minutes, every figure in one file.
#
#     bash tools/gpu_check.sh [RESULTS_FILE]        # default: $OUT/gpu_results.md, else ./gpu_results.md
#
# Without a CUDA device it stops before installing or running anything, says so and exits 3
# (CI runs it that way: tests/test_gpu_check.py). With one it installs memfit from this working
# tree (test extras), then runs, each under its own time limit, and appends to RESULTS_FILE:
#   1. the device, torch, triton and CUDA versions;
#   2. the kernel tests on CUDA (quantize/dequantize/pack, Triton against the reference) and the
#      probe tests (kernel scratch measured with torch.cuda.max_memory_allocated); the offload
#      tests (bitwise gradients under a slowed compute stream, measured against predicted peak);
#   3. quantize/dequantize bandwidth against a device-to-device copy of the same bytes
#      (tools/bench/quantize.py; goal: 85% of copy bandwidth);
#   4. predicted against measured memory (max_memory_allocated) on the example models
#      (tools/bench/predict_vs_measure.py);
#   5. step time and peak at 50% and 25% against per-block checkpointing and torch.compile's
#      activation_memory_budget (tools/bench/optimize.py --device cuda);
#   6. predicted against measured step-time ratios, measured and roofline time models
#      (tools/bench/time_model.py);
#   7. the whole-step benchmark on GPT-2-small dimensions (tools/bench/whole_step.py);
#   8. the caching allocator: simulated max_memory_allocated / max_memory_reserved against the
#      device's, each model in a fresh process, default and expandable segments
#      (tools/bench/allocator.py).
# The time limits add up to 465 s, so the whole check stays under 8 minutes with the install.
# A step that fails or runs out of time is recorded as such; the script goes on with the next.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-.}/gpu_results.md}"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was installed or run" >&2
    exit 3
fi

pip install -q -c constraints.txt -e ".[test]" >/dev/null 2>&1 || pip install -q -e ".[test]"
export TRITON_INTERPRET=0
start=$(date +%s)

section() {   # section TITLE LIMIT_SECONDS COMMAND...
    local title=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    {
        echo
        echo "## $title"
        echo
        echo '```'
        echo "\$ $*"
    } >>"$RESULTS"
    timeout "$limit" "$@" >>"$RESULTS" 2>&1
    local rc=$?
    {
        echo '```'
        echo "exit $rc after $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (time limit)')"
    } >>"$RESULTS"
}

{
    echo "# memfit GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    python - <<'EOF'
import torch, platform
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"unavailable ({e})"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, triton {tv}, python {platform.python_version()}")
EOF
} >>"$RESULTS"

section "kernel and probe tests on CUDA" 90 python -m pytest -q tests/test_kernels_quant.py tests/test_probes.py tests/test_chunked_ce.py
section "activation offload on CUDA (bitwise gradients, device peak, stream reuse)" 45 python -m pytest -q -s tests/test_offload.py
section "quantize kernels against a device copy" 60 python tools/bench/quantize.py --repeats 5
section "predicted against measured (CUDA)" 60 python tools/bench/predict_vs_measure.py
section "budgets against per-block checkpointing and torch.compile" 75 python tools/bench/optimize.py --device cuda --repeats 3 --fractions 0.5,0.25 --models gpt2_like,vit_like
section "predicted against measured step time (time models)" 40 python tools/bench/time_model.py --models gpt2_like --repeats 5
section "whole step, GPT-2-small dimensions" 45 python tools/bench/whole_step.py --models gpt2 --budgets 50,30 --steps 2 --repeats 3 --compile-budgets 1,0
section "caching allocator: predicted against measured allocated and reserved" 25 python tools/bench/allocator.py --only tests/models,examples/
section "caching allocator, expandable segments" 25 python tools/bench/allocator.py --only tests/models,examples/ --expandable

echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $RESULTS"
