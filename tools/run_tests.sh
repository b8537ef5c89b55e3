#!/usr/bin/env bash
# The whole test suite: pytest (unit, model and CLI tests), then the lit/FileCheck tests.
# README.md and .ci/run both call this after installing memfit with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"   # Triton kernels run on the CPU interpreter
python -m pytest -q --durations=15 tests   # the slowest 15 listed: the suite aims at 15 min on 2 cores
if [ -f tests/lit/lit.cfg.py ]; then
  lit -q tests/lit
fi
