#!/usr/bin/env bash
# Compare the decode fast path's values-per-lane choices (TURBOKV_DECODE_E) on the GPU machine.
for e in 16 8 4; do
  echo "== TURBOKV_DECODE_E=$e"
  TURBOKV_DECODE_E=$e python3 benchmarks/bench_attention.py --contexts 131072 --batches 1 | grep -E "f16|turbo3 |q4_0 "
  TURBOKV_DECODE_E=$e python3 benchmarks/bench_attention.py --contexts 4096 --batches 16 | grep -E "turbokv f16|turbo3 |turbokv q4_0"
done
