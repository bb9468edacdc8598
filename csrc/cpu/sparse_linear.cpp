// C++ CPU kernels of subkern::csr_linear, subkern::csr_matmul and subkern::bitmap_linear
// (schemas and the format contract: subkern/ops/sparse_linear.py).
//
//   csr_linear(x [B, in], row_ptr int64 [out+1], col_idx int16|int32 [nnz], values [nnz], in,
//              bias [out]?) -> y [B, out]:   y[b, o] = sum_j values[j] * x[b, col_idx[j]] + bias[o]
//   csr_matmul(row_ptr, col_idx, values, X [in, N], in) -> Y [out, N]:
//              Y[o, n] = sum_j values[j] * X[col_idx[j], n]
//   bitmap_linear(x [B, in], bitmap int64 [out, ceil(in/64)], row_ptr, values, in, bias?) -> y
//
// int16 column indices hold unsigned 16-bit patterns (columns 0 .. 65535). Values are float32,
// bfloat16 or float16 (converted in registers), x float32/bfloat16/float16 (converted once per
// call); every sum is accumulated in float32.
//
// Design
// ------
// * SpMV (csr_linear, batch <= kSpmvMaxBatch; memory bound): per row, 16 nonzeros at a time: the
//   16 column indices (zero-extended from 16 bits) drive an AVX-512 gather of x, one FMA with the
//   16 values (AVX2: 8 at a time). Up to 4 batch rows share each index/value load.
// * Lane-packed SpMM (csr_linear, batch kLanesMinBatch .. kLanesMaxBatch on AVX-512): x is
//   transposed to xT [in, 4 | 8]; one zmm holds the activations of 4 (or 2) nonzeros, whose
//   values one vpermps spreads over their lanes; one FMA.
// * SpMM (csr_linear with a larger batch, csr_matmul): x is transposed once per call into
//   column blocks (XView: 64 columns per block, [in, 64] contiguous, 64-byte aligned rows; a
//   user's X for csr_matmul is read in place or staged into blocks) so that the activations of
//   one input feature are contiguous; then for each nonzero (o, i, v):
//   y[o, b : b + 16 K] += v * xT[i, b : b + 16 K] with K <= 4 accumulator registers (one
//   broadcast, K loads + K FMAs per nonzero), block by block. When an X block (in x 64 floats)
//   fits L2 (up to kPanelTrigger), row blocks whose nonzeros fit L1 run against a group of
//   blocks that fit L2 together (the weight is read once per group). Otherwise the input features
//   are cut into column panels of P rows of xT (P x 64 x 4 B = kPanelBytes): for each panel every
//   row applies its nonzeros in that panel (split points from one scan per call: the columns are
//   sorted within a row) to partial sums kept in y, so the panel is reused from L2 instead of
//   every nonzero streaming its xT row from L3 (4096 x 11008 at 128 tokens: 2x faster). Rows of X
//   closer than the block (ldx < 64: the overlapping view of an implicit im2col) count as ldx
//   floats each. The AVX-512 kernel
//   fuses the epilogue y = relu?(y + bias) into its last store (csr_matmul's optional bias and
//   ReLU; csr_linear's bias); y is written, never zero-filled first.
// * bitmap_linear: per 16-bit chunk of a row's bitmap, _mm512_maskz_expandloadu_ps (vexpandps)
//   spreads the next popcount(chunk) values of the row into the set lanes, one FMA with 16 x
//   values (the x row is zero-padded to whole 64-bit words). bf16/fp16 values use the 16-bit
//   expand of AVX512-VBMI2 when the CPU has it. AVX2 and the portable level walk the set bits.
// * Threads: at::get_num_threads() workers (fewer for small calls) over contiguous row ranges of
//   equal cost (nonzeros + a per-row term), not equal row counts: STR's per-layer and per-row
//   budgets are non-uniform. Results do not depend on the thread count. The ranges run on torch's
//   own intra-op (OpenMP) threads (intraop_tasks, csrc/cpu/topk_select.h), the threads the
//   surrounding GEMMs and convolutions use: with run_tasks' separate pool the kernels competed
//   with OpenMP workers still spinning after a torch op, and the 90 %-sparse ResNet-50 at batch 1
//   took 43 ms on 2 threads (more than on 1); on torch's threads it takes 27 ms.
// * Validation: row_ptr is checked up front (starts at 0, non-decreasing, ends at nnz; bitmap:
//   each row's popcount equals its row_ptr span). Column indices are clamped to [0, in) in the
//   inner loops (so a corrupt index never reads outside x) and their maximum is tracked; a call
//   with an out-of-range index raises after the kernel instead of returning a wrong answer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/common.h"
#include "cpu/cpu_features.h"
#include "cpu/csr_checks.h"
#include "cpu/direct.h"
#include "cpu/topk_select.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SUBKERN_SPARSE_X86 1
#include <immintrin.h>
#else
#define SUBKERN_SPARSE_X86 0
#endif

namespace subkern::cpu {
namespace {

// Batch sizes up to this run the gather SpMV (its gathers scale with the batch) where the
// lane-packed SpMM does not take them (batch 1-2 on AVX-512; 1-3 on AVX2 and the portable level);
// larger ones the transposed SpMM (measured on AVX-512: SpMV won at batch 2 and 3, tied at 4).
constexpr int64_t kSpmvMaxBatch = 3;
// On AVX-512, batches in [kLanesMinBatch, kLanesMaxBatch] run the lane-packed SpMM instead
// (measured, 2 threads, 10 % dense: 3072x768 batch 4 70-75 us against 160-190 us for the
// 16-column SpMM; 4096x11008 batch 3-4 1.6-1.7x; batch 2 ties with the gather SpMV).
constexpr int64_t kLanesMinBatch = 3;
constexpr int64_t kLanesMaxBatch = 8;
// Calls with less work (nonzeros x batch) than this per thread use fewer threads (a fork-join of
// torch's intra-op threads costs about 2.5 us; 2^14 nonzeros take 5-7 us at batch 1).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 14;
// Per-row cost in nonzero-equivalents for the thread partition (loop and store overhead).
constexpr int64_t kRowCost = 8;
// SpMM: nonzeros per row block (indices + values stay in L1 across the batch blocks).
constexpr int64_t kBlockNnz = 2048;
constexpr int64_t kWordBits = 64;

enum class ValT { F32, BF16, F16 };
enum class IdxT { U16, I32 };

// ---------------------------------------------------------------------------------------------
// Scalar helpers
// ---------------------------------------------------------------------------------------------

inline float bf16_to_f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <ValT V>
inline float value_at(const void* values, int64_t j) {
  if constexpr (V == ValT::F32) {
    return static_cast<const float*>(values)[j];
  } else if constexpr (V == ValT::BF16) {
    return bf16_to_f(static_cast<const uint16_t*>(values)[j]);
  } else {
    return static_cast<float>(static_cast<const c10::Half*>(values)[j]);
  }
}

template <IdxT I>
inline uint32_t index_at(const void* idx, int64_t j) {
  if constexpr (I == IdxT::U16) {
    return static_cast<const uint16_t*>(idx)[j];
  } else {
    return static_cast<uint32_t>(static_cast<const int32_t*>(idx)[j]);
  }
}

// Largest column index in [s, e) (vectorised by the compiler inside each ISA's kernel).
template <IdxT I>
inline uint32_t max_index(const void* idx, int64_t s, int64_t e) {
  uint32_t m = 0;
  if constexpr (I == IdxT::U16) {
    const uint16_t* p = static_cast<const uint16_t*>(idx);
    uint16_t m16 = 0;
    for (int64_t j = s; j < e; ++j) m16 = p[j] > m16 ? p[j] : m16;
    m = m16;
  } else {
    const uint32_t* p = static_cast<const uint32_t*>(idx);
    for (int64_t j = s; j < e; ++j) m = p[j] > m ? p[j] : m;
  }
  return m;
}

// End of the row block starting at row o (rows up to r1): about kBlockNnz nonzeros, >= 1 row.
inline int64_t block_end(const int64_t* row_ptr, int64_t o, int64_t r1, int64_t block_nnz) {
  int64_t o1 = o + 1;
  while (o1 < r1 && row_ptr[o1 + 1] - row_ptr[o] <= block_nnz) ++o1;
  return o1;
}

// Column panels of the SpMM: the panel of X (P input features x the batch block) should stay in
// L2 while every row applies its nonzeros in it. Measured on a 2 MB L2 (4096 x 11008, 10 %
// dense, 128 tokens, 1 thread): 0.25 MB 32.5 ms, 0.5 MB 31.3, 1 MB 39.3, 1.5 MB 53.4, no panels
// 63 ms; L1-sized panels (32 - 64 KB, 16 - 64 columns) lose (73 - 116 ms: per-panel overhead).
constexpr int64_t kPanelBytes = int64_t(512) << 10;
// Blocks of X up to this size are not cut (4096 x 11008 at 16 tokens, 704 KB: panels measured
// no faster).
constexpr int64_t kPanelTrigger = int64_t(1) << 20;
constexpr int64_t kMinPanel = 256;
// X rows closer than the batch block (ldx < width, e.g. the overlapping rows of an implicit
// im2col) share cache lines: a panel of P rows then spans only about P x ldx floats.
inline int64_t panel_width(int64_t in, int64_t width, int64_t ldx) {
  width = std::min(width, std::max<int64_t>(ldx, 1));
  if (in * width * 4 <= kPanelTrigger) return in;   // the whole block stays in L2 anyway
  return std::max<int64_t>(kPanelBytes / (width * 4), kMinPanel);
}

// Columns of X per pass of the weight when no column panels are used: batch blocks of `width`
// columns whose X (in x width, rows ld apart) fits kPanelTrigger together, so that the row blocks
// reuse them from L2 (with all of a 1024-column X, 3 MB for 768 inputs, every row block streamed
// X from L3 and the SpMM ran at half speed); the weight is read once per group.
inline int64_t batch_group(int64_t in, int64_t width, int64_t ld) {
  const int64_t block_bytes =
      std::max<int64_t>(1, in * std::min(width, std::max<int64_t>(ld, 1)) * 4);
  return std::max<int64_t>(1, kPanelTrigger / block_bytes) * width;
}

// Fused SpMM epilogue: Y[o, :] = relu?(Y[o, :] + bias[o]) (bias float32 [out] or null).
struct Epilogue {
  const float* bias = nullptr;
  bool relu = false;
};

// Everything one kernel call needs.
struct Csr {
  const int64_t* row_ptr;
  const void* col;      // uint16 or int32 [nnz]
  const void* val;      // float / bf16 / fp16 [nnz]
  int64_t out;
  int64_t in;
};

// Column-range watchdog: kernels clamp indices to in - 1 and report the largest one seen.
struct ColGuard {
  std::atomic<uint32_t> max_seen{0};
  void report(uint32_t m) {
    uint32_t cur = max_seen.load(std::memory_order_relaxed);
    while (m > cur && !max_seen.compare_exchange_weak(cur, m)) {
    }
  }
};

// The SpMM's dense operand X [in, N]: either plain rows (X[c, n] at base[c * ldx + n]) or
// column-blocked: block b holds columns [64 b, 64 b + 64) as a contiguous [in, ld_b] matrix at
// base + b * in * 64, with ld_b = 64 except for the last block (its column count rounded up to 16;
// the padding is never read). Blocked rows are 64-byte aligned and the rows of one block lie
// next to each other, where plain rows of a wide X sit one large stride apart: with N = 1024 the
// 4 KB stride maps every row's segment to the same L1 and few L2 sets, and the SpMM ran at half
// speed (3072 x 768, 10 % dense, measured 1144 us per 64 columns against 532 us blocked); rows of
// fewer than 16 floats (batch 4 - 15) made most vector loads split cache lines (4096 x 11008 at
// batch 4: 8.7 ms plain, 5.1 ms padded to 16).
constexpr int64_t kXBlock = 64;
// csr_matmul stages a plainly strided X into blocks only when every row of X feeds at least this
// many nonzeros on average (the copy then costs a small share of the product).
constexpr int64_t kStageReuse = 32;

// Row stride of the column block that starts at column n0 of a blocked X with N columns: 64, or
// for the last block its column count rounded up to 16.
inline int64_t block_ld(int64_t N, int64_t n0) {
  return std::min(kXBlock, (N - n0 + 15) / 16 * 16);
}

struct XView {
  const float* base;
  int64_t ldx;      // row stride of plain rows (unused when blocked)
  int64_t in;
  int64_t N;
  bool blocked;

  // Row 0 of column n (rows are ld(n) floats apart).
  const float* at(int64_t n) const {
    return blocked ? base + (n / kXBlock) * in * kXBlock + n % kXBlock : base + n;
  }
  // Row stride around column n.
  int64_t ld(int64_t n) const {
    return blocked ? block_ld(N, n / kXBlock * kXBlock) : ldx;
  }
};

// Floats of a blocked X [in, N].
inline int64_t blocked_numel(int64_t in, int64_t N) {
  if (N == 0) return 0;
  const int64_t last = (N - 1) / kXBlock * kXBlock;   // first column of the last block
  return in * (last + block_ld(N, last));
}

// ---------------------------------------------------------------------------------------------
// Portable kernels
// ---------------------------------------------------------------------------------------------

// SpMV / small-batch: y[b, o] for rows [r0, r1), batch rows [0, B) of x [B, ldx].
template <ValT V, IdxT I>
void spmv_portable(const Csr& w, const float* x, int64_t ldx, int64_t B, float* y, int64_t ldy,
                   int64_t r0, int64_t r1, uint32_t& maxc) {
  const uint32_t last = static_cast<uint32_t>(w.in - 1);
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t s = w.row_ptr[o], e = w.row_ptr[o + 1];
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * ldx;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      int64_t j = s;
      for (; j + 4 <= e; j += 4) {
        uint32_t c0 = index_at<I>(w.col, j), c1 = index_at<I>(w.col, j + 1);
        uint32_t c2 = index_at<I>(w.col, j + 2), c3 = index_at<I>(w.col, j + 3);
        maxc = std::max({maxc, c0, c1, c2, c3});
        a0 += value_at<V>(w.val, j) * xb[std::min(c0, last)];
        a1 += value_at<V>(w.val, j + 1) * xb[std::min(c1, last)];
        a2 += value_at<V>(w.val, j + 2) * xb[std::min(c2, last)];
        a3 += value_at<V>(w.val, j + 3) * xb[std::min(c3, last)];
      }
      for (; j < e; ++j) {
        uint32_t c = index_at<I>(w.col, j);
        maxc = std::max(maxc, c);
        a0 += value_at<V>(w.val, j) * xb[std::min(c, last)];
      }
      y[b * ldy + o] = (a0 + a1) + (a2 + a3);
    }
  }
}

// SpMM: Y[o, n] = sum_j v_j * X[c_j, n] for rows [r0, r1), X [in, ldx] with N columns.
// The caller has checked the rows' column indices (every index < in).
template <ValT V, IdxT I>
void spmm_rows_portable(const Csr w, const float* X, int64_t ldx, int64_t N, float* Y,
                        int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    float* yo = Y + o * ldy;
    for (int64_t n = 0; n < N; ++n) yo[n] = 0.f;
    for (int64_t j = w.row_ptr[o]; j < w.row_ptr[o + 1]; ++j) {
      const float v = value_at<V>(w.val, j);
      const float* xr = X + static_cast<int64_t>(index_at<I>(w.col, j)) * ldx;
      for (int64_t n = 0; n < N; ++n) yo[n] += v * xr[n];
    }
  }
}

// Rows [r0, r1) (column indices already checked by the caller) against X, 64-column block by
// block.
template <ValT V, IdxT I>
void spmm_portable(const Csr& w, const XView& X, float* Y, int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1;) {
    const int64_t o1 = block_end(w.row_ptr, o, r1, kBlockNnz);
    for (int64_t n0 = 0; n0 < X.N; n0 += kXBlock) {
      spmm_rows_portable<V, I>(w, X.at(n0), X.ld(n0), std::min(kXBlock, X.N - n0), Y + n0, ldy,
                               o, o1);
    }
    o = o1;
  }
}

inline int popcount64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(v);
#else
  int n = 0;
  while (v) { v &= v - 1; ++n; }
  return n;
#endif
}

struct Bitmap {
  const uint64_t* bits;   // [out, W]
  int64_t W;
  const int64_t* row_ptr;
  const void* val;
  int64_t out;
};

// Bitmap rows [r0, r1) against batch rows [0, B) of x [B, ldx] (ldx >= W * 64, zero-padded).
template <ValT V>
void bitmap_portable(const Bitmap& w, const float* x, int64_t ldx, int64_t B, float* y,
                     int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t o = r0; o < r1; ++o) {
    const uint64_t* bits = w.bits + o * w.W;
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * ldx;
      int64_t j = w.row_ptr[o];
      float acc = 0.f;
      for (int64_t q = 0; q < w.W; ++q) {
        uint64_t m = bits[q];
        const float* xq = xb + q * kWordBits;
        while (m) {
          acc += value_at<V>(w.val, j++) * xq[ctz64(m)];
          m &= m - 1;
        }
      }
      y[b * ldy + o] = acc;
    }
  }
}

#if SUBKERN_SPARSE_X86
#define SK_S_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,f16c,fma")))
#define SK_S_VBMI2 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vbmi2,f16c,fma")))
#define SK_S_AVX2 __attribute__((target("avx2,fma,f16c")))

// ---------------------------------------------------------------------------------------------
// AVX-512
// ---------------------------------------------------------------------------------------------

template <ValT V>
SK_S_AVX512 inline __m512 load_values16(const void* values, int64_t j, __mmask16 m) {
  if constexpr (V == ValT::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(values) + j);
  } else {
    const __m256i h =
        _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(values) + j);
    if constexpr (V == ValT::BF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <IdxT I>
SK_S_AVX512 inline __m512i load_index16(const void* idx, int64_t j, __mmask16 m) {
  if constexpr (I == IdxT::U16) {
    return _mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(idx) + j));
  } else {
    return _mm512_maskz_loadu_epi32(m, static_cast<const int32_t*>(idx) + j);
  }
}

template <ValT V>
SK_S_AVX512 inline float value_at_avx512(const void* values, int64_t j) {
  if constexpr (V == ValT::F16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(values)[j]);
  } else {
    return value_at<V>(values, j);
  }
}

// Rows [r0, r1) x batch rows [b0, b0 + NB) with gathers; NB batch rows share index/value loads.
template <ValT V, IdxT I, int NB>
SK_S_AVX512 void spmv_avx512(const Csr& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                             int64_t r0, int64_t r1, int64_t b0, uint32_t& maxc) {
  const __m512i last = _mm512_set1_epi32(static_cast<int>(w.in - 1));
  __m512i vmax = _mm512_setzero_si512();
  const float* xb = x + b0 * ldx;
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t s = w.row_ptr[o], e = w.row_ptr[o + 1];
    __m512 acc[NB][2];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    int64_t j = s;
    for (; j + 32 <= e; j += 32) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m512i c = load_index16<I>(w.col, j + 16 * h, 0xFFFF);
        vmax = _mm512_max_epu32(vmax, c);
        c = _mm512_min_epu32(c, last);
        const __m512 v = load_values16<V>(w.val, j + 16 * h, 0xFFFF);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          const __m512 g = _mm512_i32gather_ps(c, xb + b * ldx, 4);
          acc[b][h] = _mm512_fmadd_ps(v, g, acc[b][h]);
        }
      }
    }
    for (; j < e; j += 16) {
      const int64_t n = std::min<int64_t>(16, e - j);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      __m512i c = load_index16<I>(w.col, j, m);
      vmax = _mm512_max_epu32(vmax, c);
      c = _mm512_min_epu32(c, last);
      const __m512 v = load_values16<V>(w.val, j, m);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, xb + b * ldx, 4);
        acc[b][0] = _mm512_fmadd_ps(v, g, acc[b][0]);
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      y[(b0 + b) * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
    }
  }
  maxc = std::max(maxc, static_cast<uint32_t>(_mm512_reduce_max_epu32(vmax)));
}

// One row against columns [n0, n0 + 16 K) of X [in, ldx] (the last vector masked by `tail`):
// nonzeros [s, e) of the row, whose column indices the caller has checked. `load` starts from the
// partial sums already in yo (a later column panel), else from zero; `last` applies the epilogue
// (+ bias, then ReLU when `relu`) before the store. U independent partial sums per vector hide the
// FMA latency (8 accumulators in flight).
template <ValT V, IdxT I, int K>
SK_S_AVX512 inline void spmm_row_avx512(const void* __restrict col, const void* __restrict val,
                                        int64_t s, int64_t e, const float* X, int64_t ldx,
                                        float* yo, __mmask16 tail, bool load, bool last,
                                        float bias, bool relu) {
  constexpr int U = K >= 3 ? 2 : 8 / K;
  __m512 acc[U][K];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[u][k] = _mm512_setzero_ps();
  }
  if (load) {
#pragma GCC unroll 8
    for (int k = 0; k < K - 1; ++k) acc[0][k] = _mm512_loadu_ps(yo + 16 * k);
    acc[0][K - 1] = _mm512_maskz_loadu_ps(tail, yo + 16 * (K - 1));
  }
  int64_t j = s;
  for (; j + U <= e; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m512 v = _mm512_set1_ps(value_at_avx512<V>(val, j + u));
      const float* xr = X + static_cast<int64_t>(index_at<I>(col, j + u)) * ldx;
#pragma GCC unroll 8
      for (int k = 0; k < K - 1; ++k) {
        acc[u][k] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * k), acc[u][k]);
      }
      acc[u][K - 1] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(tail, xr + 16 * (K - 1)),
                                      acc[u][K - 1]);
    }
  }
  for (; j < e; ++j) {
    const __m512 v = _mm512_set1_ps(value_at_avx512<V>(val, j));
    const float* xr = X + static_cast<int64_t>(index_at<I>(col, j)) * ldx;
#pragma GCC unroll 8
    for (int k = 0; k < K - 1; ++k) {
      acc[0][k] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16 * k), acc[0][k]);
    }
    acc[0][K - 1] = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(tail, xr + 16 * (K - 1)),
                                    acc[0][K - 1]);
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[0][k] = _mm512_add_ps(acc[0][k], acc[u][k]);
  }
  if (last) {
    const __m512 b = _mm512_set1_ps(bias);
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) acc[0][k] = _mm512_add_ps(acc[0][k], b);
    if (relu) {
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) acc[0][k] = _mm512_max_ps(acc[0][k], _mm512_setzero_ps());
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K - 1; ++k) _mm512_storeu_ps(yo + 16 * k, acc[0][k]);
  _mm512_mask_storeu_ps(yo + 16 * (K - 1), tail, acc[0][K - 1]);
}

template <ValT V, IdxT I>
SK_S_AVX512 inline void spmm_row_any_avx512(int K, const void* col, const void* val, int64_t s,
                                            int64_t e, const float* X, int64_t ldx, float* yo,
                                            __mmask16 tail, bool load, bool last, float bias,
                                            bool relu) {
  switch (K) {
    case 4: spmm_row_avx512<V, I, 4>(col, val, s, e, X, ldx, yo, tail, load, last, bias, relu);
      break;
    case 3: spmm_row_avx512<V, I, 3>(col, val, s, e, X, ldx, yo, tail, load, last, bias, relu);
      break;
    case 2: spmm_row_avx512<V, I, 2>(col, val, s, e, X, ldx, yo, tail, load, last, bias, relu);
      break;
    default: spmm_row_avx512<V, I, 1>(col, val, s, e, X, ldx, yo, tail, load, last, bias, relu);
      break;
  }
}

// Rows [r0, r1) (column indices already checked by the caller) against X [in, ldx] (N columns),
// Y [out, ldy] written (never read first), epilogue Y = relu?(Y + bias).
//
// Without panels (the whole X batch block fits the L2 budget): blocks of rows holding about
// kBlockNnz nonzeros (indices and values stay in L1) run against every 64-column batch block, so
// the weight is read once per call. With column panels (X [in, 64] would not stay in L2: e.g. a
// 11008-wide layer at 128 tokens, 5.6 MB): for each batch block and each panel of P input
// features (P x 64 x 4 B about kPanelBytes), every row applies its nonzeros of that panel (split
// points found by one scan per call: the columns of a row are sorted) to partial sums kept in Y,
// so X's panel is reused from L2 by all rows instead of streaming from L3 for every nonzero. The
// weight is then read once per batch block.
template <ValT V, IdxT I>
SK_S_AVX512 void spmm_avx512(const Csr& w, const XView& X, float* Y, int64_t ldy, int64_t r0,
                             int64_t r1, const Epilogue& epi) {
  const int64_t N = X.N;
  const int64_t* row_ptr = w.row_ptr;
  const void* col = w.col;
  const void* val = w.val;
  const int64_t width = 64;
  const int64_t panel = panel_width(w.in, std::min<int64_t>(width, N), X.ld(0));
  auto bias_of = [&](int64_t r) { return epi.bias == nullptr ? 0.f : epi.bias[r]; };
  const bool fuse = epi.bias != nullptr || epi.relu;
  if (panel >= w.in) {
    const int64_t group = batch_group(w.in, width, X.ld(0));
    for (int64_t g0 = 0; g0 < N; g0 += group) {
      const int64_t g1 = std::min(N, g0 + group);
      for (int64_t o = r0; o < r1;) {
        const int64_t o1 = block_end(row_ptr, o, r1, kBlockNnz);
        for (int64_t n0 = g0; n0 < g1; n0 += width) {
          const int64_t cols = std::min<int64_t>(width, N - n0);
          const int K = static_cast<int>((cols + 15) / 16);
          const int rem = static_cast<int>(cols - 16 * (K - 1));
          const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
          for (int64_t r = o; r < o1; ++r) {
            spmm_row_any_avx512<V, I>(K, col, val, row_ptr[r], row_ptr[r + 1], X.at(n0),
                                      X.ld(n0), Y + r * ldy + n0, tail, false, fuse, bias_of(r),
                                      epi.relu);
          }
        }
        o = o1;
      }
    }
    return;
  }
  // split[(r - r0) * (np + 1) + p]: offset (from row_ptr[r]) of row r's first nonzero in panel p
  const int64_t np = (w.in + panel - 1) / panel;
  std::vector<uint32_t> split(static_cast<size_t>((r1 - r0) * (np + 1)));
  for (int64_t r = r0; r < r1; ++r) {
    uint32_t* sp = split.data() + (r - r0) * (np + 1);
    const int64_t s = row_ptr[r], re = row_ptr[r + 1];
    int64_t j = s;
    sp[0] = 0;
    for (int64_t p = 1; p < np; ++p) {
      const uint32_t c1 = static_cast<uint32_t>(p * panel);
      while (j < re && index_at<I>(col, j) < c1) ++j;
      sp[p] = static_cast<uint32_t>(j - s);
    }
    sp[np] = static_cast<uint32_t>(re - s);
  }
  for (int64_t n0 = 0; n0 < N; n0 += width) {
    const int64_t cols = std::min<int64_t>(width, N - n0);
    const int K = static_cast<int>((cols + 15) / 16);
    const int rem = static_cast<int>(cols - 16 * (K - 1));
    const __mmask16 tail = static_cast<__mmask16>((1u << rem) - 1u);
    for (int64_t p = 0; p < np; ++p) {
      const bool first = p == 0, last = p + 1 == np;
      for (int64_t r = r0; r < r1; ++r) {
        const uint32_t* sp = split.data() + (r - r0) * (np + 1);
        const int64_t s = row_ptr[r] + sp[p], e = row_ptr[r] + sp[p + 1];
        if (s == e && !first && !(last && fuse)) continue;   // nothing to add or finish
        spmm_row_any_avx512<V, I>(K, col, val, s, e, X.at(n0), X.ld(n0), Y + r * ldy + n0,
                                  tail, !first, last && fuse, bias_of(r), epi.relu);
      }
    }
  }
}

// Lane-packed SpMM for batches of 3-8 (csr_linear): x is transposed to xT [in, BP] (BP = 4 or 8
// floats per input feature, the batch padded with zeros) so that one zmm holds the activations of
// P = 16 / BP nonzeros: P loads of BP floats (vinsertf32x4 / vinsertf32x8), the P values spread
// over their lanes by one vpermps, one FMA. The 16-column SpMM spends a whole zmm per nonzero
// whatever the batch (4 of 16 lanes at batch 4), and the gather SpMV one 16-wide gather per batch
// row and 16 nonzeros; here the work per nonzero falls with the batch.
template <ValT V, int P>
SK_S_AVX512 inline __m128 load_values_packed(const void* val, int64_t j) {
  static_assert(P == 2 || P == 4, "2 or 4 values");
  if constexpr (V == ValT::F32) {
    const float* v = static_cast<const float*>(val) + j;
    if constexpr (P == 4) {
      return _mm_loadu_ps(v);
    } else {
      double d;
      std::memcpy(&d, v, 8);
      return _mm_castpd_ps(_mm_set_sd(d));
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(val) + j;
    __m128i raw;
    if constexpr (P == 4) {
      int64_t t;
      std::memcpy(&t, h, 8);
      raw = _mm_cvtsi64_si128(t);
    } else {
      int32_t t;
      std::memcpy(&t, h, 4);
      raw = _mm_cvtsi32_si128(t);
    }
    if constexpr (V == ValT::BF16) {
      return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(raw), 16));
    } else {
      return _mm_cvtph_ps(raw);
    }
  }
}

// The BP activations of the P = 16 / BP nonzeros j .. j + P - 1, one per 512 / P bits.
template <IdxT I, int BP>
SK_S_AVX512 inline __m512 load_rows_packed(const void* col, int64_t j, const float* xT) {
  if constexpr (BP == 4) {
    __m512 v = _mm512_castps128_ps512(
        _mm_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j)) * 4));
    v = _mm512_insertf32x4(v, _mm_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j + 1)) * 4),
                           1);
    v = _mm512_insertf32x4(v, _mm_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j + 2)) * 4),
                           2);
    return _mm512_insertf32x4(
        v, _mm_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j + 3)) * 4), 3);
  } else {
    const __m512 v = _mm512_castps256_ps512(
        _mm256_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j)) * 8));
    return _mm512_insertf32x8(
        v, _mm256_loadu_ps(xT + static_cast<int64_t>(index_at<I>(col, j + 1)) * 8), 1);
  }
}

// Rows [r0, r1) (column indices checked by the caller) for batch rows [0, B), B <= BP:
// y[b * ldy + o] = sum_j v_j xT[c_j * BP + b] + bias[o].
template <ValT V, IdxT I, int BP>
SK_S_AVX512 void spmm_lanes_avx512(const Csr& w, const float* xT, int64_t B, float* y,
                                   int64_t ldy, int64_t r0, int64_t r1, const float* bias) {
  constexpr int P = 16 / BP;
  constexpr int U = 4;   // independent partial sums (FMA latency)
  alignas(64) int32_t slot_of_lane[16];
  for (int l = 0; l < 16; ++l) slot_of_lane[l] = l / BP;
  const __m512i spread = _mm512_load_si512(slot_of_lane);
  const void* col = w.col;
  const void* val = w.val;
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t s = w.row_ptr[o], e = w.row_ptr[o + 1];
    __m512 acc[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) acc[u] = _mm512_setzero_ps();
    int64_t j = s;
    for (; j + U * P <= e; j += U * P) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m512 xv = load_rows_packed<I, BP>(col, j + u * P, xT);
        const __m512 vv = _mm512_permutexvar_ps(
            spread, _mm512_castps128_ps512(load_values_packed<V, P>(val, j + u * P)));
        acc[u] = _mm512_fmadd_ps(vv, xv, acc[u]);
      }
    }
    for (; j + P <= e; j += P) {
      const __m512 xv = load_rows_packed<I, BP>(col, j, xT);
      const __m512 vv = _mm512_permutexvar_ps(
          spread, _mm512_castps128_ps512(load_values_packed<V, P>(val, j)));
      acc[0] = _mm512_fmadd_ps(vv, xv, acc[0]);
    }
    const __m512 a = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    alignas(32) float sum[8];
    if constexpr (BP == 4) {
      _mm_store_ps(sum, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    } else {
      _mm256_store_ps(sum, h);
    }
    for (; j < e; ++j) {   // the last nonzeros of the row (fewer than P)
      const float v = value_at_avx512<V>(val, j);
      const float* xr = xT + static_cast<int64_t>(index_at<I>(col, j)) * BP;
      for (int b = 0; b < BP; ++b) sum[b] += v * xr[b];
    }
    const float bo = bias == nullptr ? 0.f : bias[o];
    for (int64_t b = 0; b < B; ++b) y[b * ldy + o] = sum[b] + bo;
  }
}

// Bitmap rows [r0, r1) x batch rows [b0, b0 + NB): vexpandps of the values under each 16-bit
// chunk of the row's bitmap.
template <ValT V, int NB>
SK_S_VBMI2 void bitmap_avx512(const Bitmap& w, const float* x, int64_t ldx, float* y,
                              int64_t ldy, int64_t r0, int64_t r1, int64_t b0) {
  const float* xb = x + b0 * ldx;
  for (int64_t o = r0; o < r1; ++o) {
    const auto* chunks = reinterpret_cast<const uint16_t*>(w.bits + o * w.W);
    int64_t j = w.row_ptr[o];
    __m512 acc[NB][2];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    // The value offset of each 64-bit word comes from a running popcount over the words (an add
    // chain of 1 cycle per word); chunk offsets inside a word do not feed the next word.
    for (int64_t q = 0; q < w.W; ++q) {
      const uint64_t word = w.bits[o * w.W + q];
      const int64_t jq = j;
      j += popcount64(word);
      if (word == 0) continue;
      int64_t jc = jq;
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const __mmask16 m = chunks[4 * q + h];
        __m512 v;
        if constexpr (V == ValT::F32) {
          v = _mm512_maskz_expandloadu_ps(m, static_cast<const float*>(w.val) + jc);
        } else {
          const __m256i hv =
              _mm256_maskz_expandloadu_epi16(m, static_cast<const uint16_t*>(w.val) + jc);
          if constexpr (V == ValT::BF16) {
            v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hv), 16));
          } else {
            v = _mm512_cvtph_ps(hv);
          }
        }
        jc += _mm_popcnt_u32(m);
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) {
          acc[b][h & 1] = _mm512_fmadd_ps(
              v, _mm512_loadu_ps(xb + b * ldx + q * kWordBits + 16 * h), acc[b][h & 1]);
        }
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      y[(b0 + b) * ldy + o] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2
// ---------------------------------------------------------------------------------------------

template <ValT V>
SK_S_AVX2 inline __m256 load_values8(const void* values, int64_t j) {
  if constexpr (V == ValT::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + j);
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + j));
    if constexpr (V == ValT::BF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

template <IdxT I>
SK_S_AVX2 inline __m256i load_index8(const void* idx, int64_t j) {
  if constexpr (I == IdxT::U16) {
    return _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(idx) + j)));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int32_t*>(idx) + j));
  }
}

template <ValT V>
SK_S_AVX2 inline float value_at_avx2(const void* values, int64_t j) {
  if constexpr (V == ValT::F16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(values)[j]);
  } else {
    return value_at<V>(values, j);
  }
}

SK_S_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <ValT V, IdxT I>
SK_S_AVX2 void spmv_avx2(const Csr& w, const float* x, int64_t ldx, int64_t B, float* y,
                         int64_t ldy, int64_t r0, int64_t r1, uint32_t& maxc) {
  const __m256i last = _mm256_set1_epi32(static_cast<int>(w.in - 1));
  __m256i vmax = _mm256_setzero_si256();
  uint32_t smax = 0;
  const uint32_t slast = static_cast<uint32_t>(w.in - 1);
  for (int64_t o = r0; o < r1; ++o) {
    const int64_t s = w.row_ptr[o], e = w.row_ptr[o + 1];
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * ldx;
      __m256 acc = _mm256_setzero_ps();
      int64_t j = s;
      for (; j + 8 <= e; j += 8) {
        __m256i c = load_index8<I>(w.col, j);
        vmax = _mm256_max_epu32(vmax, c);
        c = _mm256_min_epu32(c, last);
        acc = _mm256_fmadd_ps(load_values8<V>(w.val, j), _mm256_i32gather_ps(xb, c, 4), acc);
      }
      float tail = 0.f;
      for (; j < e; ++j) {
        const uint32_t c = index_at<I>(w.col, j);
        smax = std::max(smax, c);
        tail += value_at_avx2<V>(w.val, j) * xb[std::min(c, slast)];
      }
      y[b * ldy + o] = hsum256(acc) + tail;
    }
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
  for (uint32_t l : lanes) smax = std::max(smax, l);
  maxc = std::max(maxc, smax);
}

template <ValT V, IdxT I, int K>
SK_S_AVX2 inline void spmm_row_avx2(const void* __restrict col, const void* __restrict val,
                                    int64_t s, int64_t e, const float* X, int64_t ldx,
                                    float* yo) {
  constexpr int U = K >= 3 ? 2 : 8 / K;
  __m256 acc[U][K];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc[u][k] = _mm256_setzero_ps();
  }
  int64_t j = s;
  for (; j + U <= e; j += U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const __m256 v = _mm256_set1_ps(value_at_avx2<V>(val, j + u));
      const float* xr = X + static_cast<int64_t>(index_at<I>(col, j + u)) * ldx;
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        acc[u][k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * k), acc[u][k]);
      }
    }
  }
  for (; j < e; ++j) {
    const __m256 v = _mm256_set1_ps(value_at_avx2<V>(val, j));
    const float* xr = X + static_cast<int64_t>(index_at<I>(col, j)) * ldx;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc[0][k] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xr + 8 * k),
                                                            acc[0][k]);
  }
#pragma GCC unroll 8
  for (int u = 1; u < U; ++u) {
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[u][k]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k) _mm256_storeu_ps(yo + 8 * k, acc[0][k]);
}

// AVX2 SpMM of rows [r0, r1) (column indices already checked by the caller): 32-column blocks
// (8..24 for the remainder of N / 8 * 8), the last N % 8 columns with the portable loop.
template <ValT V, IdxT I>
SK_S_AVX2 void spmm_avx2(const Csr& w, const XView& X, float* Y, int64_t ldy, int64_t r0,
                         int64_t r1) {
  const int64_t N = X.N;
  const int64_t* row_ptr = w.row_ptr;
  const void* col = w.col;
  const void* val = w.val;
  const int64_t full = N / 8 * 8;
  const int64_t group = batch_group(w.in, 64, X.ld(0));
  for (int64_t g0 = 0; g0 < N; g0 += group) {
    const int64_t g1 = std::min(N, g0 + group);
    for (int64_t o = r0; o < r1;) {
      const int64_t o1 = block_end(row_ptr, o, r1, kBlockNnz);
      for (int64_t n0 = g0; n0 < std::min(g1, full); n0 += 32) {
        const int K = static_cast<int>(std::min<int64_t>(32, full - n0) / 8);
        for (int64_t r = o; r < o1; ++r) {
          float* yo = Y + r * ldy + n0;
          const int64_t s = row_ptr[r], e = row_ptr[r + 1];
          switch (K) {
            case 4: spmm_row_avx2<V, I, 4>(col, val, s, e, X.at(n0), X.ld(n0), yo); break;
            case 3: spmm_row_avx2<V, I, 3>(col, val, s, e, X.at(n0), X.ld(n0), yo); break;
            case 2: spmm_row_avx2<V, I, 2>(col, val, s, e, X.at(n0), X.ld(n0), yo); break;
            default: spmm_row_avx2<V, I, 1>(col, val, s, e, X.at(n0), X.ld(n0), yo); break;
          }
        }
      }
      if (full < N && g1 == N) {  // the last N % 8 columns, all in the last block
        spmm_rows_portable<V, I>(w, X.at(full), X.ld(full), N - full, Y + full, ldy, o, o1);
      }
      o = o1;
    }
  }
}
#endif  // SUBKERN_SPARSE_X86

// ---------------------------------------------------------------------------------------------
// Transposes of the SpMM's activations (x [B, in] -> xT [in, B]) and outputs (yT [out, B] ->
// y [B, out]). torch's strided copy (t().contiguous()) took 59 us for a [3072, 16] float32
// output and 375 us for [3072, 128] on this project's Xeon, more than the SpMM itself at 98 %
// sparsity; 16 x 16 tiles transposed in registers (AVX-512) or in L1 (scalar) take a fraction.
// ---------------------------------------------------------------------------------------------

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (portable: 16 x 16 tiles).
void transpose_rows_portable(const float* src, int64_t lds, float* dst, int64_t ldd,
                             int64_t r0, int64_t r1, int64_t cols) {
  constexpr int64_t kT = 16;
  for (int64_t rb = r0; rb < r1; rb += kT) {
    const int64_t re = std::min(r1, rb + kT);
    for (int64_t cb = 0; cb < cols; cb += kT) {
      const int64_t ce = std::min(cols, cb + kT);
      for (int64_t r = rb; r < re; ++r) {
        for (int64_t c = cb; c < ce; ++c) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

#if SUBKERN_SPARSE_X86
// One 16 x 16 tile: four rounds of unpack / shuffle in registers (row k of dst = column k).
SK_S_AVX512 inline void transpose16x16_avx512(const float* src, int64_t lds, float* dst,
                                              int64_t ldd) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i + 0]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0x88);
      t[8 * i + k + 4] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + k + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

SK_S_AVX512 void transpose_rows_avx512(const float* src, int64_t lds, float* dst, int64_t ldd,
                                       int64_t r0, int64_t r1, int64_t cols) {
  const int64_t cfull = cols / 16 * 16;
  int64_t rb = r0;
  for (; rb + 16 <= r1; rb += 16) {
    for (int64_t cb = 0; cb < cfull; cb += 16) {
      transpose16x16_avx512(src + rb * lds + cb, lds, dst + cb * ldd + rb, ldd);
    }
    if (cfull < cols) transpose_rows_portable(src + cfull, lds, dst + cfull * ldd, ldd, rb,
                                              rb + 16, cols - cfull);
  }
  if (rb < r1) transpose_rows_portable(src, lds, dst, ldd, rb, r1, cols);
}
#endif  // SUBKERN_SPARSE_X86

// dst[c * ldd + r] = src[r * lds + c] for source rows [r0, r1) (a multiple of 16 apart).
void transpose_rows(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t r0,
                    int64_t r1, int64_t cols) {
#if SUBKERN_SPARSE_X86
  if (active_isa() == Isa::Avx512Vpopcnt) {
    transpose_rows_avx512(src, lds, dst, ldd, r0, r1, cols);
    return;
  }
#endif
  transpose_rows_portable(src, lds, dst, ldd, r0, r1, cols);
}

// Runs fn(r0, r1) over ranges of 16-row groups of `rows` source rows, on torch's intra-op
// threads when the copy is large.
template <typename F>
void transpose_tasks(int64_t rows, int64_t cols, const F& fn) {
  if (rows == 0 || cols == 0) return;
  const int64_t groups = (rows + 15) / 16;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), groups, rows * cols / (int64_t(1) << 15)}));
  intraop_tasks(nthreads, [&](int64_t t) {
    fn(std::min(rows, groups * t / nthreads * 16), std::min(rows, groups * (t + 1) / nthreads * 16));
  });
}

// dst [cols, rows] (contiguous) = src [rows, cols] (contiguous) transposed.
void transpose_f32(const float* src, int64_t rows, int64_t cols, float* dst) {
  transpose_tasks(rows, cols, [&](int64_t r0, int64_t r1) {
    transpose_rows(src, cols, dst, rows, r0, r1, cols);
  });
}

// dst = src [rows, cols] (contiguous) transposed into the column-blocked X [cols, rows] of XView
// (blocked_numel(cols, rows) floats): source rows [64 b, 64 b + 64) become block b.
void transpose_to_blocks(const float* src, int64_t rows, int64_t cols, float* dst) {
  transpose_tasks(rows, cols, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = r0 / kXBlock * kXBlock; b0 < r1; b0 += kXBlock) {
      const int64_t lo = std::max(r0, b0), hi = std::min(r1, b0 + kXBlock);
      transpose_rows(src + b0 * cols, cols, dst + b0 * cols, block_ld(rows, b0), lo - b0, hi - b0,
                     cols);
    }
  });
}

// X [in, N] (any float dtype and strides) copied into a column-blocked float32 X (XView).
at::Tensor stage_blocked(const at::Tensor& X) {
  const int64_t in = X.size(0), N = X.size(1);
  at::Tensor Xb = at::empty({blocked_numel(in, N)}, X.options().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < N; n0 += kXBlock) {
    const int64_t cols = std::min(kXBlock, N - n0), ld = block_ld(N, n0);
    Xb.narrow(0, n0 * in, in * ld).view({in, ld}).narrow(1, 0, cols).copy_(X.narrow(1, n0, cols));
  }
  return Xb;
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

bool cpu_has_vbmi2() {
#if SUBKERN_SPARSE_X86
  static const bool has = __builtin_cpu_supports("avx512vbmi2");
  return has;
#else
  return false;
#endif
}

ValT value_type(const at::Tensor& values, const char* op) {
  switch (values.scalar_type()) {
    case at::kFloat: return ValT::F32;
    case at::kBFloat16: return ValT::BF16;
    case at::kHalf: return ValT::F16;
    default:
      TORCH_CHECK(false, op, ": values must be float32, bfloat16 or float16, got ",
                  values.scalar_type());
  }
  return ValT::F32;
}

template <class F>
void with_types(ValT v, IdxT i, F&& f) {
  auto by_idx = [&](auto vt) {
    if (i == IdxT::U16) {
      f(vt, std::integral_constant<IdxT, IdxT::U16>{});
    } else {
      f(vt, std::integral_constant<IdxT, IdxT::I32>{});
    }
  };
  switch (v) {
    case ValT::F32: by_idx(std::integral_constant<ValT, ValT::F32>{}); break;
    case ValT::BF16: by_idx(std::integral_constant<ValT, ValT::BF16>{}); break;
    case ValT::F16: by_idx(std::integral_constant<ValT, ValT::F16>{}); break;
  }
}

// Splits rows [0, out) into `parts` contiguous ranges of about equal cost
// (row_ptr[o] + kRowCost * o is the cost of rows [0, o)). bounds has parts + 1 entries.
std::vector<int64_t> balanced_rows(const int64_t* row_ptr, int64_t out, int64_t parts) {
  std::vector<int64_t> bounds(static_cast<size_t>(parts + 1), out);
  bounds[0] = 0;
  const double total = static_cast<double>(row_ptr[out]) + static_cast<double>(kRowCost * out);
  for (int64_t t = 1; t < parts; ++t) {
    const double target = total * static_cast<double>(t) / static_cast<double>(parts);
    int64_t lo = bounds[t - 1], hi = out;  // first o with cost(o) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<double>(row_ptr[mid]) + static_cast<double>(kRowCost * mid) < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bounds[t] = lo;
  }
  return bounds;
}

int64_t thread_count(int64_t work, int64_t out) {
  const int64_t requested = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
  return std::max<int64_t>(1, std::min({requested, by_work, out}));
}

Csr make_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
             int64_t in_features, const char* op, IdxT& it, ValT& vt) {
  TORCH_CHECK(values.device().is_cpu() && col_idx.device().is_cpu(), op,
              " (CPU): col_idx and values must be CPU tensors");
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got ", values.sizes());
  vt = value_type(values, op);
  const int64_t nnz = values.size(0);
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.size(0) == nnz, op,
              ": col_idx must be 1-D [nnz] = [", nnz, "], got ", col_idx.sizes());
  if (col_idx.scalar_type() == at::kShort) {
    TORCH_CHECK(in_features <= 65536, op, ": int16 col_idx needs in_features <= 65536, got ",
                in_features);
    it = IdxT::U16;
  } else {
    TORCH_CHECK(col_idx.scalar_type() == at::kInt, op, ": col_idx must be int16 or int32, got ",
                col_idx.scalar_type());
    it = IdxT::I32;
  }
  check_csr_row_ptr(row_ptr, nnz, op);
  TORCH_CHECK(nnz == 0 || in_features > 0, op, ": ", nnz,
              " nonzeros but in_features is 0 (every column index is out of range)");
  return Csr{row_ptr.data_ptr<int64_t>(), col_idx.data_ptr(), values.data_ptr(),
             row_ptr.size(0) - 1, in_features};
}

void check_cols(const ColGuard& guard, int64_t nnz, int64_t in, const char* op) {
  const uint32_t m = guard.max_seen.load();
  TORCH_CHECK(nnz == 0 || static_cast<int64_t>(m) < in, op, ": col_idx holds column ", m,
              " but in_features is ", in, " (corrupt sparse weight)");
}

// Runs fn(vtag, itag, r0, r1) on torch's intra-op threads for `nthreads` row ranges of equal cost
// (balanced_rows), the value and index types as integral_constant tags, after checking each
// range's column indices: a range holding a column >= in is reported to guard and skipped (its
// rows stay unwritten; the caller raises).
template <typename F>
void run_checked_ranges(const Csr& w, ValT vt, IdxT it, int64_t nthreads, ColGuard& guard,
                        const F& fn) {
  const std::vector<int64_t> bounds = balanced_rows(w.row_ptr, w.out, nthreads);
  with_types(vt, it, [&](auto vtag, auto itag) {
    constexpr IdxT I = decltype(itag)::value;
    intraop_tasks(nthreads, [&](int64_t t) {
      const int64_t r0 = bounds[t], r1 = bounds[t + 1];
      const uint32_t mx = max_index<I>(w.col, w.row_ptr[r0], w.row_ptr[r1]);
      guard.report(mx);
      if (mx >= static_cast<uint64_t>(w.in)) return;
      fn(vtag, itag, r0, r1);
    });
  });
}

// Y[o, :N] (ldy) for all rows: the SpMM of a CSR weight with X [in, ldx] (N columns), then the
// epilogue Y = relu?(Y + bias). Y is written, never read first (it may be uninitialised); rows of
// a thread whose column indices are out of range are left unwritten (the caller raises).
void run_spmm(const Csr& w, ValT vt, IdxT it, const XView& X, float* Y, int64_t ldy,
              ColGuard& guard, const Epilogue& epi) {
  const int64_t N = X.N;
  const int64_t nnz = w.row_ptr[w.out];
  const int64_t nthreads = thread_count((nnz + w.out) * std::max<int64_t>(N, 1), w.out);
  const Isa isa = active_isa();
  run_checked_ranges(w, vt, it, nthreads, guard, [&](auto vtag, auto itag, int64_t r0,
                                                     int64_t r1) {
    constexpr ValT V = decltype(vtag)::value;
    constexpr IdxT I = decltype(itag)::value;
#if SUBKERN_SPARSE_X86
    if (isa == Isa::Avx512Vpopcnt) {
      spmm_avx512<V, I>(w, X, Y, ldy, r0, r1, epi);
      return;
    }
    if (isa == Isa::Avx2) {
      spmm_avx2<V, I>(w, X, Y, ldy, r0, r1);
    } else {
      spmm_portable<V, I>(w, X, Y, ldy, r0, r1);
    }
#else
    spmm_portable<V, I>(w, X, Y, ldy, r0, r1);
#endif
    if (epi.bias != nullptr || epi.relu) {
      for (int64_t r = r0; r < r1; ++r) {
        float* yr = Y + r * ldy;
        const float b = epi.bias == nullptr ? 0.f : epi.bias[r];
        for (int64_t n = 0; n < N; ++n) {
          const float v = yr[n] + b;
          yr[n] = epi.relu ? std::max(v, 0.f) : v;
        }
      }
    }
  });
  (void)isa;
}

#if SUBKERN_SPARSE_X86
// y [B, out] (written, every entry of the rows whose columns are in range) for 3 <= B <= 8 with the
// lane-packed AVX-512 SpMM: x [B, in] (contiguous float32) transposed once into xT [in, BP].
void run_spmm_lanes(const Csr& w, ValT vt, IdxT it, const float* x, int64_t B, float* y,
                    ColGuard& guard, const float* bias) {
  const int64_t BP = B <= 4 ? 4 : 8;
  const int64_t in = w.in;
  std::vector<float> xT(static_cast<size_t>(in * BP), 0.f);   // batch padding stays zero
  transpose_rows(x, in, xT.data(), BP, 0, B, in);
  const int64_t nnz = w.row_ptr[w.out];
  const int64_t nthreads = thread_count((nnz + kRowCost * w.out) * BP / 4, w.out);
  run_checked_ranges(w, vt, it, nthreads, guard, [&](auto vtag, auto itag, int64_t r0,
                                                     int64_t r1) {
    constexpr ValT V = decltype(vtag)::value;
    constexpr IdxT I = decltype(itag)::value;
    if (BP == 4) {
      spmm_lanes_avx512<V, I, 4>(w, xT.data(), B, y, w.out, r0, r1, bias);
    } else {
      spmm_lanes_avx512<V, I, 8>(w, xT.data(), B, y, w.out, r0, r1, bias);
    }
  });
}
#endif

void run_spmv(const Csr& w, ValT vt, IdxT it, const float* x, int64_t B, float* y,
              ColGuard& guard) {
  const int64_t nnz = w.row_ptr[w.out];
  const int64_t nthreads = thread_count((nnz + w.out) * B, w.out);
  const std::vector<int64_t> bounds = balanced_rows(w.row_ptr, w.out, nthreads);
  const Isa isa = active_isa();
  const int64_t ld = w.in;
  with_types(vt, it, [&](auto vtag, auto itag) {
    constexpr ValT V = decltype(vtag)::value;
    constexpr IdxT I = decltype(itag)::value;
    intraop_tasks(nthreads, [&](int64_t t) {
      uint32_t mx = 0;
      const int64_t r0 = bounds[t], r1 = bounds[t + 1];
#if SUBKERN_SPARSE_X86
      if (isa == Isa::Avx512Vpopcnt) {
        int64_t b = 0;
        for (; b + 4 <= B; b += 4) spmv_avx512<V, I, 4>(w, x, ld, y, w.out, r0, r1, b, mx);
        for (; b + 2 <= B; b += 2) spmv_avx512<V, I, 2>(w, x, ld, y, w.out, r0, r1, b, mx);
        for (; b < B; ++b) spmv_avx512<V, I, 1>(w, x, ld, y, w.out, r0, r1, b, mx);
      } else if (isa == Isa::Avx2) {
        spmv_avx2<V, I>(w, x, ld, B, y, w.out, r0, r1, mx);
      } else {
        spmv_portable<V, I>(w, x, ld, B, y, w.out, r0, r1, mx);
      }
#else
      spmv_portable<V, I>(w, x, ld, B, y, w.out, r0, r1, mx);
#endif
      guard.report(mx);
    });
  });
  (void)isa;
}

at::Tensor add_bias_and_cast(at::Tensor y, const std::optional<at::Tensor>& bias,
                             at::ScalarType dtype, const char* op) {
  const at::Tensor b32 = float_bias(bias, y.size(1), op);
  if (b32.defined()) y.add_(b32.unsqueeze(0));
  return dtype == at::kFloat ? y : y.to(dtype);
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& values,
                          int64_t in_features, const std::optional<at::Tensor>& bias) {
  const char* op = "subkern::csr_linear";
  check_float_input_2d(x, in_features, op);
  IdxT it;
  ValT vt;
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous(),
                   va = values.contiguous();
  const Csr w = make_csr(rp, ci, va, in_features, op, it, vt);
  const int64_t B = x.size(0);
  const int64_t nnz = va.size(0);
#if SUBKERN_SPARSE_X86
  if (B >= kLanesMinBatch && B <= kLanesMaxBatch && w.out > 0 && nnz > 0 &&
      active_isa() == Isa::Avx512Vpopcnt) {
    const at::Tensor b32 = float_bias(bias, w.out, op);
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty({B, w.out}, xf.options());
    ColGuard guard;
    run_spmm_lanes(w, vt, it, xf.data_ptr<float>(), B, y.data_ptr<float>(), guard,
                   b32.defined() ? b32.data_ptr<float>() : nullptr);
    check_cols(guard, nnz, in_features, op);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
#endif
  if (B > kSpmvMaxBatch && w.out > 0 && nnz > 0) {
    // SpMM on the transposed activation, bias fused into the kernel's epilogue
    const at::Tensor b32 = float_bias(bias, w.out, op);
    ColGuard guard;
    const at::Tensor xf = x.to(at::kFloat).contiguous();                 // [B, in]
    at::Tensor xT = at::empty({blocked_numel(in_features, B)}, xf.options());  // blocked [in, B]
    transpose_to_blocks(xf.data_ptr<float>(), B, in_features, xT.data_ptr<float>());
    at::Tensor yT = at::empty({w.out, B}, xf.options());
    Epilogue epi;
    epi.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
    const XView X{xT.data_ptr<float>(), 0, in_features, B, true};
    run_spmm(w, vt, it, X, yT.data_ptr<float>(), B, guard, epi);
    check_cols(guard, nnz, in_features, op);
    at::Tensor y = at::empty({B, w.out}, xf.options());
    transpose_f32(yT.data_ptr<float>(), w.out, B, y.data_ptr<float>());
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::Tensor y = at::zeros({B, w.out}, x.options().dtype(at::kFloat));
  if (B > 0 && w.out > 0 && nnz > 0) {
    ColGuard guard;
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    run_spmv(w, vt, it, xf.data_ptr<float>(), B, y.data_ptr<float>(), guard);
    check_cols(guard, nnz, in_features, op);
  }
  return add_bias_and_cast(y, bias, x.scalar_type(), op);
}

at::Tensor csr_matmul_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                          const at::Tensor& values, const at::Tensor& X, int64_t in_features,
                          const std::optional<at::Tensor>& bias, bool relu) {
  const char* op = "subkern::csr_matmul";
  TORCH_CHECK(X.device().is_cpu(), op, " (CPU): X must be a CPU tensor");
  TORCH_CHECK(X.dim() == 2 && X.size(0) == in_features, op, ": X must be [", in_features,
              ", N], got ", X.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat || X.scalar_type() == at::kBFloat16 ||
                  X.scalar_type() == at::kHalf,
              op, ": X must be float32, bfloat16 or float16, got ", X.scalar_type());
  IdxT it;
  ValT vt;
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous(),
                   va = values.contiguous();
  const Csr w = make_csr(rp, ci, va, in_features, op, it, vt);
  const at::Tensor b32 = float_bias(bias, w.out, op);
  const int64_t N = X.size(1);
  const int64_t nnz = va.size(0);
  if (N == 0 || w.out == 0 || nnz == 0) {  // Y = relu?(0 + bias)
    at::Tensor Y = at::zeros({w.out, N}, X.options().dtype(at::kFloat));
    if (b32.defined()) Y.add_(b32.unsqueeze(1));
    if (relu) Y.clamp_min_(0.f);
    return X.scalar_type() == at::kFloat ? Y : Y.to(X.scalar_type());
  }
  // X is read in place (float32 with contiguous columns) unless its rows lie more than a block
  // apart at a multiple of 2 KB (a block's rows then share few L2 sets: N = 1024 ran at half
  // speed) and each row of X feeds enough nonzeros to repay a copy (nnz >= kStageReuse x in), or
  // its rows are short and straddle cache lines (N < 16); those are staged into the
  // column-blocked layout (XView), as is any other dtype or stride, converted on the way. The
  // im2col X of a sparse conv is not copied: the copy cost more than the stride (ResNet-50 at
  // batch 8, X = [C kh kw, 8 H W] with 25088 columns: 281 ms in place, 349 ms staged).
  const int64_t ldx = X.stride(0);
  const bool conflicting =
      ldx > kXBlock && (ldx * 4) % 2048 == 0 && nnz >= kStageReuse * in_features;
  const bool straddling = N < 16 && ldx >= N && ldx % 16 != 0;
  const bool in_place = X.scalar_type() == at::kFloat && X.stride(1) == 1 && !conflicting &&
                        !straddling;
  const at::Tensor Xf = in_place ? X : stage_blocked(X);
  const XView Xv{Xf.data_ptr<float>(), in_place ? ldx : 0, in_features, N, !in_place};
  at::Tensor Y = at::empty({w.out, N}, X.options().dtype(at::kFloat));   // every entry is written
  ColGuard guard;
  Epilogue epi;
  epi.bias = b32.defined() ? b32.data_ptr<float>() : nullptr;
  epi.relu = relu;
  run_spmm(w, vt, it, Xv, Y.data_ptr<float>(), N, guard, epi);
  check_cols(guard, nnz, in_features, op);
  return X.scalar_type() == at::kFloat ? Y : Y.to(X.scalar_type());
}

at::Tensor bitmap_linear_cpu(const at::Tensor& x, const at::Tensor& bitmap,
                             const at::Tensor& row_ptr, const at::Tensor& values,
                             int64_t in_features, const std::optional<at::Tensor>& bias) {
  const char* op = "subkern::bitmap_linear";
  check_float_input_2d(x, in_features, op);
  const int64_t W = (in_features + kWordBits - 1) / kWordBits;
  TORCH_CHECK(bitmap.device().is_cpu() && bitmap.scalar_type() == at::kLong &&
                  bitmap.dim() == 2 && bitmap.size(1) == W,
              op, ": bitmap must be a CPU int64 tensor [out_features, ", W, "], got ",
              bitmap.scalar_type(), " ", bitmap.sizes());
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1, op,
              ": values must be a 1-D CPU tensor [nnz], got ", values.sizes());
  const ValT vt = value_type(values, op);
  const int64_t out = bitmap.size(0), nnz = values.size(0);
  check_csr_row_ptr(row_ptr, nnz, op);
  TORCH_CHECK(row_ptr.size(0) == out + 1, op, ": row_ptr must have ", out + 1,
              " entries (one per bitmap row + 1), got ", row_ptr.size(0));
  const at::Tensor bm = bitmap.contiguous(), rp = row_ptr.contiguous(), va = values.contiguous();
  const auto* bits = reinterpret_cast<const uint64_t*>(bm.data_ptr<int64_t>());
  const int64_t* p = rp.data_ptr<int64_t>();
  const uint64_t pad_mask =
      (in_features % kWordBits) == 0 ? ~uint64_t(0) : (uint64_t(1) << (in_features % kWordBits)) - 1;
  for (int64_t o = 0; o < out; ++o) {  // popcounts must match row_ptr: values never over-read
    int64_t count = 0;
    for (int64_t q = 0; q < W; ++q) {
      uint64_t word = bits[o * W + q];
      TORCH_CHECK(q + 1 < W || (word & ~pad_mask) == 0, op, ": bitmap row ", o,
                  " has bits set past in_features = ", in_features);
      count += popcount64(word);
    }
    TORCH_CHECK(count == p[o + 1] - p[o], op, ": bitmap row ", o, " has ", count,
                " set bits but row_ptr gives it ", p[o + 1] - p[o], " values");
  }
  const int64_t B = x.size(0);
  at::Tensor y = at::zeros({B, out}, x.options().dtype(at::kFloat));
  if (B > 0 && out > 0 && nnz > 0) {
    at::Tensor xf = x.to(at::kFloat).contiguous();
    const int64_t ldx = W * kWordBits;
    if (ldx != in_features) {
      at::Tensor xp = at::zeros({B, ldx}, xf.options());
      xp.narrow(1, 0, in_features).copy_(xf);
      xf = xp;
    }
    const Bitmap w{bits, W, p, va.data_ptr(), out};
    const float* xd = xf.data_ptr<float>();
    float* yd = y.data_ptr<float>();
    const int64_t nthreads = thread_count((nnz + W * 16) * B, out);
    // cost of a bitmap row: its nonzeros plus the chunk loop (16 words' worth per 64 bits)
    std::vector<int64_t> bounds(static_cast<size_t>(nthreads + 1));
    for (int64_t t = 0; t <= nthreads; ++t) bounds[t] = out * t / nthreads;
    const Isa isa = active_isa();
    const bool expand = isa == Isa::Avx512Vpopcnt && (vt == ValT::F32 || cpu_has_vbmi2());
    with_types(vt, IdxT::I32, [&](auto vtag, auto) {
      constexpr ValT V = decltype(vtag)::value;
      intraop_tasks(nthreads, [&](int64_t t) {
        const int64_t r0 = bounds[t], r1 = bounds[t + 1];
#if SUBKERN_SPARSE_X86
        if (expand) {
          int64_t b = 0;
          for (; b + 4 <= B; b += 4) bitmap_avx512<V, 4>(w, xd, ldx, yd, out, r0, r1, b);
          for (; b + 2 <= B; b += 2) bitmap_avx512<V, 2>(w, xd, ldx, yd, out, r0, r1, b);
          for (; b < B; ++b) bitmap_avx512<V, 1>(w, xd, ldx, yd, out, r0, r1, b);
          return;
        }
#endif
        bitmap_portable<V>(w, xd, ldx, B, yd, out, r0, r1);
      });
    });
    (void)expand;
  }
  return add_bias_and_cast(y, bias, x.scalar_type(), op);
}

}  // namespace

at::Tensor direct_csr_linear(const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& values,
                             int64_t in_features, const std::optional<at::Tensor>& bias) {
  return csr_linear_cpu(x, row_ptr, col_idx, values, in_features, bias);
}

at::Tensor direct_csr_matmul(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const at::Tensor& X, int64_t in_features,
                             const std::optional<at::Tensor>& bias, bool relu) {
  return csr_matmul_cpu(row_ptr, col_idx, values, X, in_features, bias, relu);
}

}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {  // schemas: subkern/ops/sparse_linear.py
  m.impl("csr_linear", &subkern::cpu::csr_linear_cpu);
  m.impl("csr_matmul", &subkern::cpu::csr_matmul_cpu);
  m.impl("bitmap_linear", &subkern::cpu::bitmap_linear_cpu);
}
