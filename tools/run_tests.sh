#!/usr/bin/env bash
# The whole test suite: pytest (unit, model and CLI tests), then the lit/FileCheck tests.
# README.md and .ci/run both call this after installing memfit with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"   # Triton kernels run on the CPU interpreter
python -m pytest -q tests
if [ -f tests/lit/lit.cfg.py ]; then
  lit -q tests/lit
fi
