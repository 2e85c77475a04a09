// 8-bit attention for Hopper (sm_90a): O = softmax(scale * Q K^T) V per (batch, head), non-causal,
// on the codes of the pre-pass (docs/format.md, "8-bit attention"): q8/k8 int8 with per-query and
// per-128-key-block scales (rows Hadamard-rotated), V^T as fp8 e4m3 with per-channel scales and the
// keys of each 32-key group permuted (p(k) below). Softmax and accumulation in fp32, base 2.
//
// One CTA per (128-query tile, bh): blockIdx.x = bh * q_tiles + tile, so the CTAs of one head run
// side by side and share its K/V blocks in L2. (A persistent schedule is a later optimisation.)
// 384 threads, three warpgroups:
//   - warpgroup 0 (producer, setmaxnreg 24): two threads issue TMA into rings of kStages slots, each
//     slot with its own full (TMA transaction) and empty (8 consumer warps) mbarrier: one the Q tile
//     once and then the K tile of each key block j, the other the V^T tile of each block (the
//     consumers release K_j right after S_j and V_j a block later, so the two rings run apart).
//   - warpgroups 1, 2 (consumers, setmaxnreg 240; 24 * 128 + 240 * 256 = 64512 of 65536 registers):
//     64 query rows each (rows 64 * wg .. 64 * wg + 63 of the tile).
//     Per key block: S = Q K^T by wgmma m64n128k32 .s32.s8.s8 (both operands from shared memory,
//     D / 32 k-steps); the online softmax of SoftmaxRows (base 2, row max over the quad's four
//     threads) writes P = e4m3(448 p) from the S registers straight into wgmma's A fragment;
//     O += P V by wgmma m64n{D}k32 .f32.e4m3.e4m3 with A from registers and B the V^T tile, 4
//     k-steps of 32 keys. FA3's two overlaps: within a warpgroup, S_j and P_{j-1} V_{j-1} are issued
//     together and the softmax of S_j runs while P_{j-1} V_{j-1} does (two P buffers); between the
//     two warpgroups, TurnOrder alternates their issue, so one's softmax meets the other's products.
//   Epilogue: O * sv[c] / l (l sums 448 p) rounded to bf16 / fp16, plain stores, rows < q_tokens only.
//
// Shared memory (dynamic, base aligned to 1024 bytes as the 128-byte swizzle needs):
//   [kQ]  Q tile   [128 rows][D bytes]        TMA box {D, 128} of q8 viewed as [BH * Nq_pad, D]
//   [kK]  K slots  kStages x [128 keys][D bytes]   box {D, 128} of k8 as [BH * Nkv_pad, D]
//   [kV]  V slots  kStages x [D channels][128 key bytes]  box {128, D} of vt8 as [BH * D, Nkv_pad]
//   [kBar] mbarriers: q_full, k_full[S], k_empty[S], v_full[S], v_empty[S]
// Q and K rows are D bytes: D = 128 in the 128-byte swizzle (rows 128 bytes, 8-row groups 1024 bytes
// apart, 16-byte chunk c of row r at chunk c ^ (r % 8)), D = 64 in the 64-byte swizzle (rows 64
// bytes, 8-row groups 512 apart, chunk c at c ^ ((r / 2) % 4)). V^T rows are 128 key bytes, always
// the 128-byte swizzle. TMA writes those swizzles (CU_TENSOR_MAP_SWIZZLE_128B / _64B) and the wgmma
// descriptors (sm90_ptx.cuh smem_desc_k128 / _k64: SBO = 8-row group stride, layout type) read them.
// A k-step of 32 bytes advances the descriptor's start address by 32 bytes inside the swizzled row
// (the hardware applies the XOR to the computed address; the persistent GEMM does the same). Every
// tile's base is a multiple of 1024 bytes, and a consumer warpgroup's 64-row half of Q starts at
// 64 * D bytes (8192 or 4096: whole 8-row groups), so the swizzle phase matches.
//
// Fragments (PTX ISA wgmma figures; warp w of a warpgroup, lane = 4 g + t): an m64nN fp32/s32
// accumulator holds d[4 j + {0, 1}] = row 16 w + g, columns 8 j + 2 t + {0, 1}, and d[4 j + {2, 3}] =
// row 16 w + g + 8, the same columns. The 8-bit A fragment of m64nNk32: reg0 = row g, k = 4 t .. 4 t + 3
// (byte 0 the lowest k), reg1 = row g + 8 same k, reg2 = row g, k = 16 + 4 t .., reg3 = row g + 8 same.
// The pre-pass stores key p(k) = 16 (k / 16) + 8 ((k % 4) / 2) + 2 ((k % 16) / 4) + k % 2 at position k
// of each 32-key group of V^T. Position k = 4 t + i (i = 0..3) holds key 8 (i / 2) + 2 t + i % 2, i.e.
// keys 2t, 2t+1, 8+2t, 9+2t: S columns j = 4 s, 4 s + 1 of k32 slice s. So for slice s
//   reg0 = e4m3x4(d[16s+0], d[16s+1], d[16s+4], d[16s+5])    reg1 = (d[16s+2], d[16s+3], d[16s+6], d[16s+7])
//   reg2 = e4m3x4(d[16s+8], d[16s+9], d[16s+12], d[16s+13])  reg3 = (d[16s+10], d[16s+11], d[16s+14], d[16s+15])
// (positions 16 + 4 t + i hold keys 16 + 8 (i / 2) + 2 t + i % 2: columns j = 4 s + 2, 4 s + 3).
#include "attention_sm90.h"

#include <cuda.h>

#include <stdexcept>
#include <string>

#include "common.cuh"
#include "tensor_map.h"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "sm90_ptx.cuh"
#include "wgmma_fp8_ops.cuh"
#include "wgmma_ops.cuh"
#endif

namespace convrot::cuda {
namespace {

constexpr int kBlockQ = 128;        // query rows per CTA (two consumer warpgroups of 64)
constexpr int kBlockKV = 128;       // keys per K/V block (= the pre-pass's sk block)
[[maybe_unused]] constexpr int kStages = 3;  // K/V ring slots
constexpr int kThreads = 384;       // producer warpgroup + two consumer warpgroups
[[maybe_unused]] constexpr int kConsumerWarps = 8;  // arrivals on each empty barrier (lane 0 of each consumer warp)
[[maybe_unused]] constexpr int kRowsPerWarpgroup = 64;  // query rows per consumer warpgroup
[[maybe_unused]] constexpr int kSliceKeys = 32;  // keys per P.V k-step

template <int D>
struct Layout {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static constexpr int kQBytes = kBlockQ * D;
  static constexpr int kKBytes = kBlockKV * D;
  static constexpr int kVBytes = D * kBlockKV;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + kQBytes;
  static constexpr int kV = kK + kStages * kKBytes;
  static constexpr int kBar = kV + kStages * kVBytes;
  static constexpr int kBarriers = 1 + 4 * kStages;
  static constexpr int kSmem = kBar + 8 * kBarriers + 1024;  // + slack to align the base to 1024
  static_assert(127 * 127 * D < (1 << 22), "exact_float's range");
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0 && kVBytes % 1024 == 0, "1024-byte aligned tiles");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using namespace sm90_ptx;
using sm90::e4m3x4;
using sm90::exp2_approx;
using sm90::wgmma_rs_e4m3;
using sm90::wgmma_ss_n128;
using sm90::wgmma_ss_n128_overwrite;

// float(x) for |x| < 2^22, exactly, by two full-rate instructions instead of an I2F (a quarter-rate
// conversion, as slow as the ex2 that follows): the bits of 1.5 * 2^23 plus x are the float
// 1.5 * 2^23 + x (the binade [2^23, 2^24) has unit spacing), and the subtraction is exact.
// |q . k| <= 127 * 127 * 128 = 2064512 < 2^22.
__device__ __forceinline__ float exact_float(int x) {
  return __int_as_float(x + 0x4B400000) - 12582912.0f;
}

// FA3's ping-pong of the two consumer warpgroups: each issues its wgmmas only in its turn, and
// passes the turn on once they are issued, so that one warpgroup's softmax runs while the other's
// products occupy the tensor cores (the softmax's SFU and FP32 work is about as long as a block's
// two products). Named barrier kTurnBarrier + w is warpgroup w's turn: its 128 threads wait on it
// (bar.sync) and the other warpgroup's 128 arrive (bar.arrive). Warpgroup 1 hands warpgroup 0 the
// first turn; both take the same number of turns (one per issue point), and warpgroup 1 does not
// pass on its last one, so every arrival is matched by a wait.
struct TurnOrder {
  static constexpr int kTurnBarrier = 1;   // ids 1, 2 (0 is __syncthreads)
  static constexpr int kTurnThreads = 256; // both consumer warpgroups
  int wg;
  __device__ __forceinline__ void start() const {
    if (wg == 1) named_barrier_arrive(kTurnBarrier, kTurnThreads);
  }
  __device__ __forceinline__ void wait() const { named_barrier_sync(kTurnBarrier + wg, kTurnThreads); }
  __device__ __forceinline__ void pass(bool last) const {
    if (!(last && wg == 1)) named_barrier_arrive(kTurnBarrier + (wg ^ 1), kTurnThreads);
  }
};

// The online softmax of one thread's two query rows (base 2), block by block. acc holds the int32
// scores of the thread's share of a 64 x 128 S tile (the fragment note at the top: element i is
// row (i >> 1) & 1, block key 8 (i >> 2) + 2 t + (i & 1)); rs[r] = sq * scale * log2(e) * sk of
// the block, so s = float(acc) * rs. Per block it updates the running max m and the partial row sum
// l (this thread's 32 columns, reduced over the quad at the end), returns alpha = 2^(m_old - m) for
// the rescale of O, and writes P = e4m3(448 p) straight into the A fragments of the four k32 slices.
// The work per score is what bounds this kernel beside the tensor cores, so it is kept to one
// integer max, one integer add, one FFMA, one ex2, one add to l and half a conversion:
//   - rs > 0 (or NaN), so max_j(float(acc_j) * rs) = float(max_j acc_j) * rs: the max runs on the
//     integers (exact_float of the max alone).
//   - 448 p = 2^(s - m + log2 448): P's fixed scale is folded into the exponent, and l sums 448 p.
//   - float(acc) * rs - bias = (bits(acc + 0x4B400000) as float) * rs - (1.5 * 2^23 * rs + bias):
//     the float 1.5 * 2^23 + acc times rs, exact inside the FFMA, less one rounded per-row bias
//     (relative error 2^-24 of 1.5 * 2^23 * rs, at most ~6x the largest score the block could
//     reach; the same shift for every key of the row's block).
// Keys >= N_kv of a partial last block get no share of the max and p = 0 (every block holds at least
// one real key, so m stays finite; before the first block m = -inf gives alpha = 0).
struct SoftmaxRows {
  static constexpr float kLog2PScale = 8.807354922057604f;  // log2(448)
  static constexpr float kMagic = 12582912.0f;               // 1.5 * 2^23, bits 0x4B400000
  static constexpr int kSlices = kBlockKV / kSliceKeys;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};

  template <bool kMasked>
  __device__ __forceinline__ void block(const int (&acc)[64], const float (&rs)[2], int keys_left, int t,
                                        float (&alpha)[2], uint32_t (&pa)[kSlices][4]) {
    const auto masked = [&](int i) { return kMasked && 8 * (i >> 2) + 2 * t + (i & 1) >= keys_left; };
    int mx[2] = {INT_MIN, INT_MIN};
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      if (!masked(i)) mx[(i >> 1) & 1] = max(mx[(i >> 1) & 1], acc[i]);
    }
    float bias[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], exact_float(mx[r]) * rs[r]);
      alpha[r] = exp2_approx(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
      bias[r] = fmaf(kMagic, rs[r], m_new - kLog2PScale);
    }
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      float q[16];  // 448 p of slice s's 16 scores
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const int i = 16 * s + e, r = (i >> 1) & 1;
        q[e] = exp2_approx(fmaf(__int_as_float(acc[i] + 0x4B400000), rs[r], -bias[r]));
        if (masked(i)) q[e] = 0.0f;
        l[r] += q[e];
      }
      pa[s][0] = e4m3x4(q[0], q[1], q[4], q[5]);
      pa[s][1] = e4m3x4(q[2], q[3], q[6], q[7]);
      pa[s][2] = e4m3x4(q[8], q[9], q[12], q[13]);
      pa[s][3] = e4m3x4(q[10], q[11], q[14], q[15]);
    }
  }
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
#endif

struct Params {
  const float* sq;
  const float* sk;
  const float* sv;
  void* out;
  int64_t out_batch, out_token, out_head;
  int heads, q_tokens, kv_tokens, q_pad, kv_pad, q_tiles;
  float scale_log2;
  bool pairs;  // out's rows and strides allow 4-byte stores of element pairs
};

template <int D, typename OutT>
__global__ void __launch_bounds__(kThreads, 1)
    attention_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                     const __grid_constant__ CUtensorMap map_v, const Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Layout<D>;
  constexpr int kSteps = D / 32;                    // k-steps of S = Q K^T
  constexpr int kSlices = kBlockKV / kSliceKeys;    // k-steps of O += P V (4)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* k_full = q_full + 1;
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;

  const int tile = int(blockIdx.x % unsigned(p.q_tiles));
  const int bh = int(blockIdx.x / unsigned(p.q_tiles));
  const int num_blocks = p.kv_pad / kBlockKV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;

  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], kConsumerWarps);
      mbar_init(&v_empty[s], kConsumerWarps);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp < 4) {  // producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (warp == 0 && lane == 0) {
      // Q tile: rows bh * Nq_pad + 128 * tile .. + 127 of the [BH * Nq_pad, D] view, all D bytes.
      mbar_arrive_expect_tx(q_full, L::kQBytes);
      tma_load_2d(smem + L::kQ, &map_q, 0, bh * p.q_pad + tile * kBlockQ, q_full);
      Ring<kStages> ring;
      for (int j = 0; j < num_blocks; ++j) {
        // K block j: rows bh * Nkv_pad + 128 j .. of the [BH * Nkv_pad, D] view.
        mbar_wait(&k_empty[ring.slot], ring.phase ^ 1);
        mbar_arrive_expect_tx(&k_full[ring.slot], L::kKBytes);
        tma_load_2d(smem + L::kK + ring.slot * L::kKBytes, &map_k, 0, bh * p.kv_pad + j * kBlockKV,
                    &k_full[ring.slot]);
        ring.advance();
      }
    } else if (warp == 1 && lane == 0) {
      // V^T block j: rows (channels) bh * D .. bh * D + D - 1, byte columns 128 j .. 128 j + 127 of
      // the [BH * D, Nkv_pad] view. Its own thread: the consumers release V_j a block later than K_j.
      Ring<kStages> ring;
      for (int j = 0; j < num_blocks; ++j) {
        mbar_wait(&v_empty[ring.slot], ring.phase ^ 1);
        mbar_arrive_expect_tx(&v_full[ring.slot], L::kVBytes);
        tma_load_2d(smem + L::kV + ring.slot * L::kVBytes, &map_v, j * kBlockKV, bh * D, &v_full[ring.slot]);
        ring.advance();
      }
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int cw = warp - 4;              // consumer warp 0..7
  const int wg = cw >> 2;               // consumer warpgroup 0, 1
  const int g = lane >> 2, t = lane & 3;
  const int row0 = tile * kBlockQ + wg * kRowsPerWarpgroup + (cw & 3) * 16 + g;  // rows row0, row0 + 8 of the head
  // sq * scale_log2 of this thread's two rows (padding rows exist in sq, with sq = 0).
  float sqc[2];
  sqc[0] = p.sq[int64_t(bh) * p.q_pad + row0] * p.scale_log2;
  sqc[1] = p.sq[int64_t(bh) * p.q_pad + row0 + 8] * p.scale_log2;
  const float* sk = p.sk + int64_t(bh) * num_blocks;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  SoftmaxRows sm;
  const uint64_t desc_q = smem_desc_k<D>(smem + L::kQ + wg * kRowsPerWarpgroup * D);
  mbar_wait(q_full, 0);

  // S_j = Q K_j^T into acc (the first k-step overwrites it), committed as one wgmma group.
  int acc[64];
  const auto issue_scores = [&](int slot) {
    const uint8_t* k_tile = smem + L::kK + slot * L::kKBytes;
    wgmma_ss_n128_overwrite(acc, desc_q, smem_desc_k<D>(k_tile));
#pragma unroll
    for (int s = 1; s < kSteps; ++s) {
      // k-step s: bytes 32 s .. 32 s + 31 of every Q and K row.
      wgmma_ss_n128(acc, desc_q + ((32 * s) >> 4), smem_desc_k<D>(k_tile + 32 * s));
    }
    wgmma_commit();
  };
  // O += P V_j (P in the A fragments pa), committed as one wgmma group.
  const auto issue_pv = [&](const uint32_t (&pa)[kSlices][4], int slot) {
    const uint64_t desc_v = smem_desc_k128(smem + L::kV + slot * L::kVBytes);
#pragma unroll
    for (int s = 0; s < kSlices; ++s) {
      // k-step s: stored key positions 32 s .. 32 s + 31 (bytes of every V^T row).
      wgmma_rs_e4m3<D>(o, pa[s], desc_v + ((32 * s) >> 4));
    }
    wgmma_commit();
  };
  const auto softmax = [&](int j, uint32_t (&pa)[kSlices][4], float (&alpha)[2]) {
    const float skb = sk[j];
    const float rs[2] = {sqc[0] * skb, sqc[1] * skb};
    const int keys_left = p.kv_tokens - j * kBlockKV;
    if (keys_left < kBlockKV) sm.block<true>(acc, rs, keys_left, t, alpha, pa);
    else sm.block<false>(acc, rs, keys_left, t, alpha, pa);
  };

  // Block 0: S_0, its softmax (O is 0: no rescale).
  uint32_t pa[2][kSlices][4];  // P of the block in flight in P V and of the next one
  float alpha[2];
  const TurnOrder turn{wg};
  turn.start();
  mbar_wait(&k_full[0], 0);
  turn.wait();
  wgmma_fence();
  issue_scores(0);
  turn.pass(false);
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 64; ++i) pin_register(acc[i]);
  if (lane == 0) mbar_arrive(&k_empty[0]);
  softmax(0, pa[0], alpha);

  // Block j >= 1, FA3's intra-warpgroup overlap: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued
  // back to back; the softmax of S_j (the SFU and the FP32 pipes) runs while the tensor cores work
  // on P_{j-1} V_{j-1}; O is rescaled by the new alpha once that product is done. The two P buffers
  // alternate, so the fragments an in-flight P V reads are never rewritten (no register copy).
  Ring<kStages> k_ring, v_ring;  // K_j's slot; V_{j-1}'s slot
  k_ring.advance();
  const auto step = [&](int j, const uint32_t (&pa_prev)[kSlices][4], uint32_t (&pa_next)[kSlices][4]) {
    mbar_wait(&k_full[k_ring.slot], k_ring.phase);
    mbar_wait(&v_full[v_ring.slot], v_ring.phase);
    turn.wait();
    wgmma_fence();  // orders the previous rescale of O and the writes of pa_prev before the wgmmas
    issue_scores(k_ring.slot);
    issue_pv(pa_prev, v_ring.slot);
    turn.pass(false);
    wgmma_wait<1>();  // S_j done (groups complete in order), P_{j-1} V_{j-1} may still run
#pragma unroll
    for (int i = 0; i < 64; ++i) pin_register(acc[i]);
    if (lane == 0) mbar_arrive(&k_empty[k_ring.slot]);
    softmax(j, pa_next, alpha);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < D / 2; ++i) sm90::pin_register(o[i]);
    if (lane == 0) mbar_arrive(&v_empty[v_ring.slot]);
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
    k_ring.advance();
    v_ring.advance();
  };
  int j = 1;
  for (; j + 1 < num_blocks; j += 2) {
    step(j, pa[0], pa[1]);
    step(j + 1, pa[1], pa[0]);
  }
  // The last block's P V (an even block count leaves one more step, which ends in pa[1]).
  const auto last_pv = [&](const uint32_t (&pa_last)[kSlices][4]) {
    mbar_wait(&v_full[v_ring.slot], v_ring.phase);
    turn.wait();
    wgmma_fence();
    issue_pv(pa_last, v_ring.slot);
    turn.pass(true);
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < D / 2; ++i) sm90::pin_register(o[i]);
    if (lane == 0) mbar_arrive(&v_empty[v_ring.slot]);
  };
  if (j < num_blocks) {
    step(j, pa[0], pa[1]);
    last_pv(pa[1]);
  } else {
    last_pv(pa[0]);
  }

  // ---- epilogue: out = O * sv[c] / l (l sums 448 p) ----
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = sm.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.0f / l;
  }
  const int b = bh / p.heads, h = bh % p.heads;
  OutT* out = static_cast<OutT*>(p.out) + int64_t(b) * p.out_batch + int64_t(h) * p.out_head;
  const float* sv = p.sv + int64_t(bh) * D;
  // All of this thread's sv are loaded before the first store: the compiler may not move a load
  // past a store to `out`, which it cannot prove is not `sv`, so loads between stores wait in turn.
  float2 sv_pair[D / 8];
#pragma unroll
  for (int jj = 0; jj < D / 8; ++jj) sv_pair[jj] = *reinterpret_cast<const float2*>(sv + 8 * jj + 2 * t);
#pragma unroll
  for (int jj = 0; jj < D / 8; ++jj) {
    const int c = 8 * jj + 2 * t;
    const float sv0 = sv_pair[jj].x, sv1 = sv_pair[jj].y;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0 + 8 * r;
      if (row >= p.q_tokens) continue;
      const float y0 = o[4 * jj + 2 * r] * sv0 * inv[r];
      const float y1 = o[4 * jj + 2 * r + 1] * sv1 * inv[r];
      OutT* dst = out + int64_t(row) * p.out_token + c;
      if (p.pairs) {
        *reinterpret_cast<uint32_t*>(dst) = pack2<OutT>(y0, y1);
      } else {
        dst[0] = from_float<OutT>(y0);
        dst[1] = from_float<OutT>(y1);
      }
    }
  }
#endif
}

template <int D, typename OutT>
void launch(const Attention8bit& a, cudaStream_t stream) {
  using L = Layout<D>;
  const AttentionInputs& n = a.shape;
  const AttentionCodes& c = a.codes;
  const int64_t batch_heads = n.batch * n.heads;
  const int64_t q_pad = ceil_div<int64_t>(n.q_tokens, kBlockQ) * kBlockQ;
  const int64_t kv_pad = ceil_div<int64_t>(n.kv_tokens, kBlockKV) * kBlockKV;
  const CUtensorMapSwizzle qk_swizzle = D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  // 2-D uint8 views: rows x byte columns, boxes {rows, columns}.
  const CUtensorMap map_q = tensor_map(c.q8, 1, batch_heads * q_pad, D, kBlockQ, D, qk_swizzle);
  const CUtensorMap map_k = tensor_map(c.k8, 1, batch_heads * kv_pad, D, kBlockKV, D, qk_swizzle);
  const CUtensorMap map_v = tensor_map(c.vt8, 1, batch_heads * D, kv_pad, D, kBlockKV, CU_TENSOR_MAP_SWIZZLE_128B);
  // The kernel's indices are 32-bit (checked by check_attention_8bit_sm90).
  const Params p{c.sq, c.sk, c.sv, a.out, a.os.batch, a.os.token, a.os.head, int(n.heads), int(n.q_tokens),
                 int(n.kv_tokens), int(q_pad), int(kv_pad), int(q_pad / kBlockQ), a.scale_log2,
                 (reinterpret_cast<uintptr_t>(a.out) & 3) == 0 && a.os.batch % 2 == 0 && a.os.token % 2 == 0 &&
                     a.os.head % 2 == 0};
  const int64_t grid = batch_heads * p.q_tiles;
  auto kernel = attention_kernel<D, OutT>;
  allow_dynamic_smem(kernel, L::kSmem);
  kernel<<<unsigned(grid), kThreads, L::kSmem, stream>>>(map_q, map_k, map_v, p);
  check_launch("sm90 8-bit attention");
}

}  // namespace

void check_attention_8bit_sm90(const Attention8bit& a) {
  const auto fail = [](const std::string& why) {
    throw std::runtime_error("convrot_kernels attention_8bit (sm90): " + why);
  };
  const AttentionInputs& n = a.shape;
  if (n.dim != 64 && n.dim != 128) fail("head dim must be 64 or 128, got " + std::to_string(n.dim));
  if (n.batch < 1 || n.heads < 1) fail("batch and heads must be at least 1");
  if (n.q_tokens < 1 || n.kv_tokens < 1) fail("q_tokens and kv_tokens must be at least 1");
  if (!aligned16(a.codes.q8) || !aligned16(a.codes.k8) || !aligned16(a.codes.vt8)) {
    fail("q8, k8 and vt8 must be 16-byte aligned (TMA)");
  }
  // TMA coordinates and the kernel's row indices are 32-bit.
  const int64_t batch_heads = n.batch * n.heads;
  const int64_t q_pad = ceil_div<int64_t>(n.q_tokens, kBlockQ) * kBlockQ;
  const int64_t kv_pad = ceil_div<int64_t>(n.kv_tokens, kBlockKV) * kBlockKV;
  constexpr int64_t kMax = int64_t(1) << 31;
  if (batch_heads * q_pad >= kMax || batch_heads * kv_pad >= kMax || batch_heads * n.dim >= kMax)
    fail("too many rows for 32-bit TMA coordinates");
}

void attention_8bit_sm90(const Attention8bit& a, void* stream) {
  const cudaStream_t s = as_stream(stream);
  if (a.shape.dim == 128) {
    if (a.out_bf16) launch<128, __nv_bfloat16>(a, s);
    else launch<128, __half>(a, s);
  } else {
    if (a.out_bf16) launch<64, __nv_bfloat16>(a, s);
    else launch<64, __half>(a, s);
  }
}

}  // namespace convrot::cuda
