#!/usr/bin/env bash
# Run the test suite as other CPUs would: ATen's kernels for each instruction set,
# oneDNN limited to older ones, MKL's reproducible mode, and 2 threads. Each
# must pass: fixtures come from one machine, tolerances must hold on all.
#   bash tests/cpu_matrix.sh [pytest args...]      (from the repository root)
set -u
cd "$(dirname "$0")/.."
status=0
for env in "ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" "ATEN_CPU_CAPABILITY=avx512" \
           "ONEDNN_MAX_CPU_ISA=AVX2" "ONEDNN_MAX_CPU_ISA=SSE41" "MKL_CBWR=COMPATIBLE" \
           "ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=COMPATIBLE" "TULU_TEST_THREADS=2"; do
    line=$(env $env python -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tail -n 1)
    echo "$env: $line"
    case "$line" in *failed*|*error*|"") status=1 ;; esac
done
exit $status
