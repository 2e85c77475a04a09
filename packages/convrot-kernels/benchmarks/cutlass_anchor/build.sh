#!/usr/bin/env bash
# Builds the CUTLASS int8 anchor (int8_scaled_gemm.cu) into libint8_scaled_gemm.so beside this
# script: one object per configuration, compiled in parallel. Needs nvcc (CUDA 12.4+) and the
# CUTLASS headers that PyPI's nvidia-cutlass carries (pip install nvidia-cutlass). Hopper only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source=$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')
out="$here/build"
mkdir -p "$out"
rm -f "$out"/config*.o
configs=$(grep -c '^#\(el\)\?if ANCHOR_CONFIG == ' "$here/int8_scaled_gemm.cu")
for ((c = 0; c < configs; c++)); do
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC --expt-relaxed-constexpr \
    -DNDEBUG -DANCHOR_CONFIG="$c" -I"$source/include" -I"$source/tools/util/include" \
    -c "$here/int8_scaled_gemm.cu" -o "$out/config$c.o" &
  # two compilations at a time: each takes a few GB of memory
  if (( $(jobs -r | wc -l) >= ${ANCHOR_JOBS:-2} )); then wait -n; fi
done
wait
nvcc -shared -gencode=arch=compute_90a,code=sm_90a "$out"/config*.o -o "$here/libint8_scaled_gemm.so" -cudart static
echo "$here/libint8_scaled_gemm.so"
