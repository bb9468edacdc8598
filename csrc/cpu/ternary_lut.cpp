// C++ CPU kernel of subkern::ternary_linear_prepacked (schema and layout in
// subkern/ops/ternary.py): the ternary layer from nibble lookup tables.
//
//   ternary_linear_prepacked(x [B, in], packed uint8 [ceil(out / 16), ceil(in / 4) * 16], scale,
//                            in_features, out_features, bias [out]?) -> y [B, out]
//
// Prepacked layout: output rows in blocks of 16 and inputs in groups of 4. For block q and group
// g, the 16 bytes packed[q, 16 g .. 16 g + 15] hold, in byte r, the bits of row o = 16 q + r on
// inputs 4 g .. 4 g + 3: low nibble P = M & S (weights +c), high nibble N = M & ~S (weights -c),
// bit j of a nibble = input 4 g + j. Rows past out_features and inputs past in_features are 0.
//
// Math: with, for every batch row b and group g, the 16-entry table
//     T_bg[p] = sum_{j : bit j of p set} x[b, 4 g + j]      (p = 0 .. 15)
// the layer is
//     y[b, o] = scale * sum_g (T_bg[P_og] - T_bg[N_og])  (+ bias[o]).
// The tables cost in * 4 floats per batch row and are built once per call (by every thread for
// its own use at batch <= kOwnTablesMaxBatch; T[p] adds the set x values in increasing j, so it
// is the same on every path and thread).
//
// AVX-512 inner step, per group g, block of 16 rows and batch row: vpmovzxbd (16 bytes -> 16
// dword lanes, shared by the batch rows), vpermps(idx, T_bg) (only the low 4 bits of each lane
// index the 16 floats), vpsrld 4, vpermps: 64 weights in 2 permutes and 2 adds, plus 2 uops per
// block shared across the batch rows. A micro-kernel holds RB blocks x NB batch rows (RB * NB =
// 4, two accumulators each: independent dependency chains) and the batch is done in blocks of 4,
// 2, 1 rows against one tile of RB blocks while its bytes are in L1.
// Other instruction sets: the same tables, scalar (subkern.nn.SupermaskLinear routes those CPUs
// to the bit-mask kernel of ternary.cpp instead).
// Threads: torch's own intra-op (OpenMP) threads over tiles of rows (intraop_tasks,
// csrc/cpu/topk_select.h), the threads the surrounding torch ops use, so the kernel does not
// compete with OpenMP workers still spinning after them; the per-row sums do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu/common.h"
#include "cpu/cpu_features.h"
#include "cpu/direct.h"
#include "cpu/parallel.h"
#include "cpu/topk_select.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SUBKERN_LUT_X86 1
#include <immintrin.h>
#else
#define SUBKERN_LUT_X86 0
#endif

namespace subkern::cpu {
namespace {

constexpr int64_t kBlockRows = 16;   // output rows per block of the layout
constexpr int64_t kGroup = 4;        // inputs per nibble
constexpr int64_t kTileBlocks = 4;   // blocks per thread work item (64 rows)
// Calls with fewer weight-rows (out * in * batch) than this per thread use fewer threads.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;
// Batches up to this size give every thread its own copy of the tables (G * 64 B per row).
constexpr int64_t kOwnTablesMaxBatch = 4;

struct Problem {
  const uint8_t* packed;  // [nblocks, G * 16]
  int64_t G;              // groups of 4 inputs
  const float* tables;    // [B, G * 16]
  float* y;               // [B, out]
  int64_t out;
  float scale;
  const float* bias;      // [out] or nullptr
};

// T[b, g, p] for p = 0..15 (portable; also the order every path sums in).
void build_tables_portable(const float* x, int64_t in, int64_t G, float* t) {
  for (int64_t g = 0; g < G; ++g) {
    float v[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t i = g * kGroup + j;
      v[j] = i < in ? x[i] : 0.f;
    }
    float* tg = t + g * 16;
    for (int p = 0; p < 16; ++p) {
      float s = 0.f;
      for (int j = 0; j < 4; ++j) {
        if (p & (1 << j)) s += v[j];
      }
      tg[p] = s;
    }
  }
}

void block_portable(const Problem& p, int64_t q, int64_t b) {
  const uint8_t* pk = p.packed + q * p.G * 16;
  const float* t = p.tables + b * p.G * 16;
  float acc[kBlockRows] = {};
  for (int64_t g = 0; g < p.G; ++g) {
    const uint8_t* bytes = pk + g * 16;
    const float* tg = t + g * 16;
    for (int r = 0; r < kBlockRows; ++r) acc[r] += tg[bytes[r] & 15] - tg[bytes[r] >> 4];
  }
  const int64_t o0 = q * kBlockRows;
  const int64_t rows = std::min(kBlockRows, p.out - o0);
  for (int64_t r = 0; r < rows; ++r) {
    float v = p.scale * acc[r];
    if (p.bias != nullptr) v += p.bias[o0 + r];
    p.y[b * p.out + o0 + r] = v;
  }
}

#if SUBKERN_LUT_X86
#define SK_LUT_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq")))

// Same sums as build_tables_portable (s = ((0 + v0) + v1) + v2) + v3 over the set bits, in
// float32), 16 lanes = the 16 nibbles.
SK_LUT_AVX512 void build_tables_avx512(const float* x, int64_t in, int64_t G, float* t) {
  const int64_t full = in / kGroup;
  for (int64_t g = 0; g < G; ++g) {
    float v[4];
    if (g < full) {
      std::memcpy(v, x + g * kGroup, sizeof(v));
    } else {
      for (int j = 0; j < 4; ++j) {
        const int64_t i = g * kGroup + j;
        v[j] = i < in ? x[i] : 0.f;
      }
    }
    __m512 s = _mm512_setzero_ps();
    s = _mm512_mask_add_ps(s, 0xAAAA, s, _mm512_set1_ps(v[0]));
    s = _mm512_mask_add_ps(s, 0xCCCC, s, _mm512_set1_ps(v[1]));
    s = _mm512_mask_add_ps(s, 0xF0F0, s, _mm512_set1_ps(v[2]));
    s = _mm512_mask_add_ps(s, 0xFF00, s, _mm512_set1_ps(v[3]));
    _mm512_storeu_ps(t + g * 16, s);
  }
}

// Blocks [q0, q0 + RB) against batch rows [b0, b0 + NB).
template <int RB, int NB>
SK_LUT_AVX512 void micro_avx512(const Problem& p, int64_t q0, int64_t b0) {
  __m512 accp[RB][NB], accn[RB][NB];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      accp[r][b] = _mm512_setzero_ps();
      accn[r][b] = _mm512_setzero_ps();
    }
  }
  const int64_t ld = p.G * 16;
  const uint8_t* pk = p.packed + q0 * ld;
  const float* tb = p.tables + b0 * ld;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512 t[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) t[b] = _mm512_loadu_ps(tb + b * ld + g * 16);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512i lo = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(pk + r * ld + g * 16)));
      const __m512i hi = _mm512_srli_epi32(lo, 4);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        accp[r][b] = _mm512_add_ps(accp[r][b], _mm512_permutexvar_ps(lo, t[b]));
        accn[r][b] = _mm512_add_ps(accn[r][b], _mm512_permutexvar_ps(hi, t[b]));
      }
    }
  }
  const __m512 scale = _mm512_set1_ps(p.scale);
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    const int64_t o0 = (q0 + r) * kBlockRows;
    const int64_t rows = std::min(kBlockRows, p.out - o0);
    const __mmask16 live = static_cast<__mmask16>((1u << rows) - 1u);
    __m512 bias = _mm512_setzero_ps();
    if (p.bias != nullptr) bias = _mm512_maskz_loadu_ps(live, p.bias + o0);
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const __m512 v = _mm512_fmadd_ps(scale, _mm512_sub_ps(accp[r][b], accn[r][b]), bias);
      _mm512_mask_storeu_ps(p.y + (b0 + b) * p.out + o0, live, v);
    }
  }
}

// Blocks [q0, q1) (at most kTileBlocks) against every batch row.
SK_LUT_AVX512 void tile_avx512(const Problem& p, int64_t q0, int64_t q1, int64_t B) {
  const int64_t nq = q1 - q0;
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) {
    for (int64_t q = q0; q < q1; ++q) micro_avx512<1, 4>(p, q, b);
  }
  if (b + 2 <= B) {
    int64_t q = q0;
    for (; q + 2 <= q1; q += 2) micro_avx512<2, 2>(p, q, b);
    for (; q < q1; ++q) micro_avx512<1, 2>(p, q, b);
    b += 2;
  }
  if (b < B) {
    int64_t q = q0;
    if (nq == 4) {
      micro_avx512<4, 1>(p, q, b);
      q += 4;
    }
    for (; q + 2 <= q1; q += 2) micro_avx512<2, 1>(p, q, b);
    for (; q < q1; ++q) micro_avx512<1, 1>(p, q, b);
  }
}
#endif  // SUBKERN_LUT_X86

at::Tensor ternary_linear_prepacked_cpu(const at::Tensor& x, const at::Tensor& packed,
                                        double scale, int64_t in_features, int64_t out_features,
                                        const std::optional<at::Tensor>& bias) {
  const char* op = "subkern::ternary_linear_prepacked";
  check_float_input_2d(x, in_features, op);
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const int64_t G = (in_features + kGroup - 1) / kGroup;
  const int64_t nblocks = (out_features + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK(packed.device().is_cpu(), op, " (CPU): packed must be a CPU tensor");
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == nblocks && packed.size(1) == G * 16, op,
              ": packed must be [", nblocks, ", ", G * 16, "] (ternary_prepack of a ",
              out_features, " x ", in_features, " layer), got ", packed.sizes());
  const int64_t B = x.size(0);
  const at::Tensor bias_f = float_bias(bias, out_features, op);
  at::Tensor y = at::empty({B, out_features}, x.options().dtype(at::kFloat));
  if (B == 0 || out_features == 0) return y.to(x.scalar_type());
  if (G == 0) {  // no inputs: y = bias (or 0)
    fill_bias_rows(y, bias_f);
    return y.to(x.scalar_type());
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor pc = packed.contiguous();
  at::Tensor tables = at::empty({B, G * 16}, xf.options());
  const Isa isa = active_isa();
  const float* xp = xf.data_ptr<float>();
  float* tp = tables.data_ptr<float>();
  const int64_t requested = std::max<int64_t>(1, at::get_num_threads());

  auto build_rows = [&](int64_t b0, int64_t b1, float* dst) {
    for (int64_t b = b0; b < b1; ++b) {
#if SUBKERN_LUT_X86
      if (isa == Isa::Avx512Vpopcnt) {
        build_tables_avx512(xp + b * in_features, in_features, G, dst + b * G * 16);
        continue;
      }
#endif
      build_tables_portable(xp + b * in_features, in_features, G, dst + b * G * 16);
    }
  };
  // Small batches: every thread builds its own copy of the tables inside the kernel's parallel
  // region (the same values: the build is deterministic), so the build runs in parallel and
  // each core reads its tables from its own cache; reading tables another core built cost
  // about 5 us of 36 at 768 x 3072, batch 1, 2 threads. Larger batches: one build task per
  // batch row, before the kernel.
  const bool own_tables = B <= kOwnTablesMaxBatch;
  if (!own_tables) {
    const int64_t table_threads =
        std::min<int64_t>({requested, B, std::max<int64_t>(1, B * G / 4096)});
    intraop_tasks(table_threads, [&](int64_t t) {
      build_rows(B * t / table_threads, B * (t + 1) / table_threads, tp);
    });
  }

  const Problem shared{pc.data_ptr<uint8_t>(), G, tp, y.data_ptr<float>(), out_features,
                       static_cast<float>(scale),
                       bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};
  const int64_t ntiles = (nblocks + kTileBlocks - 1) / kTileBlocks;
  const double work = static_cast<double>(nblocks * kBlockRows) *
                      static_cast<double>(G * kGroup) * static_cast<double>(B);
  const int64_t nthreads = threads_for_work(work, kMinWorkPerThread, ntiles);
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t t0 = ntiles * t / nthreads, t1 = ntiles * (t + 1) / nthreads;
    Problem p = shared;
    std::vector<float> own;
    if (own_tables) {
      float* dst = tp;   // task 0 fills the call's buffer, the others a private copy
      if (t > 0) {
        own.resize(static_cast<size_t>(B * G * 16));
        dst = own.data();
      }
      build_rows(0, B, dst);
      p.tables = dst;
    }
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t q0 = tile * kTileBlocks;
      const int64_t q1 = std::min(nblocks, q0 + kTileBlocks);
#if SUBKERN_LUT_X86
      if (isa == Isa::Avx512Vpopcnt) {
        tile_avx512(p, q0, q1, B);
        continue;
      }
#endif
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t q = q0; q < q1; ++q) block_portable(p, q, b);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

at::Tensor direct_ternary_linear_prepacked(const at::Tensor& x, const at::Tensor& packed,
                                           double scale, int64_t in_features,
                                           int64_t out_features,
                                           const std::optional<at::Tensor>& bias) {
  return ternary_linear_prepacked_cpu(x, packed, scale, in_features, out_features, bias);
}

}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("ternary_linear_prepacked", &subkern::cpu::ternary_linear_prepacked_cpu);
}
