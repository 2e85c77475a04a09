#!/usr/bin/env bash
# Builds the CUTLASS int8 anchor (int8_scaled_gemm.cu) into libint8_scaled_gemm.so beside this
# script: one object per configuration, compiled in parallel. Needs nvcc (CUDA 12.4+) and the
# CUTLASS headers that PyPI's nvidia-cutlass carries: `pip install --no-deps nvidia-cutlass==4.2.0.0`
# (the headers alone; its Python code and dependencies are not used). Hopper only.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# Located without importing the package, which would need its dependencies.
source=$(python3 -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("cutlass_library").submodule_search_locations[0], "source"))')
out="$here/build"
mkdir -p "$out"
rm -f "$out"/config*.o
# The configurations, one object each: tile M and N, cluster M and N, schedule (the consumer
# warpgroups on tiles of their own, "pingpong", or sharing one, "cooperative").
configs=(
  "128 128 2 1 pingpong"
  "128 128 1 1 pingpong"
  "128 256 1 1 cooperative"
  "256 128 1 1 cooperative"
  "128 256 2 1 cooperative"
  "256 128 1 2 cooperative"
)
for i in "${!configs[@]}"; do
  read -r tile_m tile_n cluster_m cluster_n schedule <<<"${configs[$i]}"
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xcompiler -fPIC --expt-relaxed-constexpr -DNDEBUG \
    -DANCHOR_INDEX="$i" -DANCHOR_TILE_M="$tile_m" -DANCHOR_TILE_N="$tile_n" -DANCHOR_CLUSTER_M="$cluster_m" \
    -DANCHOR_CLUSTER_N="$cluster_n" -DANCHOR_PINGPONG="$([[ $schedule == pingpong ]] && echo 1 || echo 0)" \
    -I"$source/include" -I"$source/tools/util/include" -c "$here/int8_scaled_gemm.cu" -o "$out/config$i.o" &
  # two compilations at a time: each takes a few GB of memory
  if (( $(jobs -r | wc -l) >= ${ANCHOR_JOBS:-2} )); then wait -n; fi
done
wait
nvcc -shared -gencode=arch=compute_90a,code=sm_90a "$out"/config*.o -o "$here/libint8_scaled_gemm.so" -cudart static
echo "$here/libint8_scaled_gemm.so"
