// A W8A8 GEMM built from CUTLASS's Hopper collectives, as an anchor for convrot_kernels.gemm:
// y[m, n] = bf16((acc[m, n] * sa[m]) * sw[n] + bias[n]), int8 codes [M, K] and [N, K], int32
// accumulation, the same multiply-accumulates and output bytes as gemm(bits=4 or 8). A 4-bit
// kernel of ours runs these multiply-accumulates on the same int8 tensor cores, so the fastest of
// these configurations shows what it can hope for on a shape. Built by build.sh (nvcc and the
// headers of PyPI's nvidia-cutlass), one object per configuration, loaded by the benchmarks
// through ctypes; it is no part of the package.
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct ScaledGemm {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using RowScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float>;  // sa[m]: one value per row
  using ColScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float>;  // sw[n], bias[n]
  using Scaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, RN>, Acc, RowScale>;
  using Output = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiply_add, cutlass::bfloat16_t, float, RN>, Scaled, ColScale,
      ColScale>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, cutlass::layout::RowMajor, 8,
      cutlass::bfloat16_t, cutlass::layout::RowMajor, 8, EpilogueSchedule, Output>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, 16, int8_t,
      cutlass::layout::ColumnMajor, 16, int32_t, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const int8_t* a, const int8_t* b, const float* sa, const float* sw,
                                            const float* bias, cutlass::bfloat16_t* out, int m, int n, int k) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    using StrideD = typename Kernel::StrideD;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {a, cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)), b,
         cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1))},
        {{}, nullptr, StrideC{}, out, cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))}};
    // Arguments of an EVT node: its children's, then its own.
    args.epilogue.thread = {{{}, {sa}, {}}, {sw}, {bias}, {}};
    return args;
  }
};

using Pingpong = std::pair<cutlass::gemm::KernelTmaWarpSpecializedPingpong, cutlass::epilogue::TmaWarpSpecialized>;
using Cooperative =
    std::pair<cutlass::gemm::KernelTmaWarpSpecializedCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative>;

// The configuration of this object file, from build.sh's list: tile (M, N), cluster (M, N), and
// whether the two consumer warpgroups take tiles of their own (ping-pong) or share one.
#if !defined(ANCHOR_INDEX) || !defined(ANCHOR_TILE_M) || !defined(ANCHOR_TILE_N) || !defined(ANCHOR_CLUSTER_M) || \
    !defined(ANCHOR_CLUSTER_N) || !defined(ANCHOR_PINGPONG)
#error "build.sh defines ANCHOR_INDEX, ANCHOR_TILE_M/N, ANCHOR_CLUSTER_M/N and ANCHOR_PINGPONG"
#endif
using Schedule = std::conditional_t<ANCHOR_PINGPONG, Pingpong, Cooperative>;
using Config = ScaledGemm<Shape<Int<ANCHOR_TILE_M>, Int<ANCHOR_TILE_N>, _128>,
                          Shape<Int<ANCHOR_CLUSTER_M>, Int<ANCHOR_CLUSTER_N>, _1>, Schedule::first_type,
                          Schedule::second_type>;
#define ANCHOR_STR2(x) #x
#define ANCHOR_STR(x) ANCHOR_STR2(x)
#define ANCHOR_SHAPE \
  ANCHOR_STR(ANCHOR_TILE_M) "x" ANCHOR_STR(ANCHOR_TILE_N) " cluster " ANCHOR_STR(ANCHOR_CLUSTER_M) "x" ANCHOR_STR(ANCHOR_CLUSTER_N)

#define ANCHOR_CAT2(a, b) a##b
#define ANCHOR_CAT(a, b) ANCHOR_CAT2(a, b)

}  // namespace

extern "C" {

const char* ANCHOR_CAT(convrot_anchor_name_, ANCHOR_INDEX)() {
  return ANCHOR_PINGPONG ? ANCHOR_SHAPE " pingpong" : ANCHOR_SHAPE " cooperative";
}

size_t ANCHOR_CAT(convrot_anchor_workspace_, ANCHOR_INDEX)(int m, int n, int k) {
  auto args = Config::arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k);
  return Config::Gemm::get_workspace_size(args);
}

// 0 on success; otherwise a cutlass::Status (can_implement, initialize or run), or 1000 + a CUDA error.
int ANCHOR_CAT(convrot_anchor_gemm_, ANCHOR_INDEX)(const int8_t* a, const int8_t* b, const float* sa, const float* sw,
                                                  const float* bias, void* out, int m, int n, int k, void* workspace,
                                                  cudaStream_t stream) {
  auto args = Config::arguments(a, b, sa, sw, bias, static_cast<cutlass::bfloat16_t*>(out), m, n, k);
  typename Config::Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) return int(status);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? 0 : 1000 + int(error);
}

}  // extern "C"
