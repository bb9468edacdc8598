// C++ CPU kernel of subkern::ternary_linear (schema defined in subkern/ops/ternary.py):
//
//   ternary_linear(x [B, in], mask_bits int64 [out, W], sign_bits int64 [out, W], scale,
//                  in_features, bias [out]?) -> y [B, out]
//       y[b, o] = scale * sum_i M[o, i] * (S[o, i] ? +x[b, i] : -x[b, i])  (+ bias[o])
//
// Bit layout: W = ceil(in / 64) words per row; bit i of row o is bit i % 64 (LSB first) of word
// i / 64 (unsigned 64-bit patterns stored in int64). Padding bits past `in` are ignored.
//
// Design
// ------
// * No multiplications: per 64-bit word of a row, P = M & S (weights +c) and N = M & ~S (weights
//   -c); y = scale * (sum of x over P - sum of x over N).
// * AVX-512: every 16-bit chunk of P and N is a lane mask of 16 floats of x. Two accumulators per
//   (row, batch row): accP = _mm512_mask_add_ps(accP, P16, accP, x16), accN likewise with N16;
//   2 vector uops per 16 weights and batch row, and the weight is never expanded. A micro-kernel
//   holds R output rows x NB batch rows (R * NB = 8, 16 accumulators, independent dependency
//   chains) and shares each x load across its R rows. The tile's P and N bits are first re-laid
//   chunk-major (fill_chunks_avx512: gathers + VPERMW), so the inner loop loads its mask
//   registers straight from memory at constant offsets of one pointer (kmovw k, m16).
// * AVX2: each byte of P and N indexes a table of 8 floats in {0, 1}; w = T[P8] - T[N8] is the
//   ternary weight of 8 lanes, applied with one FMA per batch row (exact: w in {-1, 0, 1}).
// * Portable: the set bits of P and N are walked with count-trailing-zeros.
// * Blocking: rows are processed in tiles of 8 (their bits, 8 * W * 16 bytes, stay in L1) and,
//   inside a tile, every batch block of 8, 4, 2, 1 rows of x runs against it, so the bits are read
//   from memory once per call whatever the batch. When in % 64 != 0, x is first copied into a
//   zero-padded buffer of W * 64 columns, so the kernels read whole words without tail code (the
//   padding bits then meet zeros).
// * Threads: up to at::get_num_threads() tasks over tiles of output rows on the persistent pool of
//   parallel.h (small calls run on the calling thread). Results do not depend on the thread count.
// * Small batches on AVX-512 CPUs run faster from the prepacked nibble layout (ternary_lut.cpp,
//   subkern::ternary_linear_prepacked), which subkern.nn.SupermaskLinear uses.
// * bfloat16/float16 inputs are converted to float32, accumulated in float32 and converted back.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <vector>

#include "cpu/common.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SUBKERN_TERNARY_X86 1
#include <immintrin.h>
#else
#define SUBKERN_TERNARY_X86 0
#endif

namespace subkern::cpu {
namespace {

constexpr int64_t kWordBits = 64;
constexpr int64_t kRowTile = 8;  // output rows per tile (R * NB = kRowTile in the micro-kernels)
// Calls with fewer weight-rows (out * in * batch) than this per thread run on fewer threads.
constexpr int64_t kMinWorkPerThread = int64_t(1) << 20;

// Arguments of one micro-kernel call: rows [o0, o0 + R) against batch rows [b0, b0 + NB).
struct Problem {
  const float* x;       // [B, ldx] (ldx = W * 64 padded, or in when in % 64 == 0)
  int64_t ldx;
  const uint64_t* m;    // [out, W]
  const uint64_t* s;    // [out, W]
  int64_t W;
  float* y;             // [B, out]
  int64_t out;
  float scale;
  const float* bias;    // [out] or nullptr
};

// The +c and -c bits of one tile of rows, computed once per tile: pos[r * W + w] = M & S and
// neg[r * W + w] = M & ~S of row o0 + r. The micro-kernels read 16-bit (AVX-512) or 8-bit (AVX2)
// pieces of them straight from memory (kmovw k, m16 is a load, no shift/move uops).
struct TileBits {
  const uint64_t* pos;
  const uint64_t* neg;
};

void fill_tile_bits(const Problem& p, int64_t o0, int64_t rows, uint64_t* pos, uint64_t* neg) {
  const uint64_t* m = p.m + o0 * p.W;
  const uint64_t* s = p.s + o0 * p.W;
  for (int64_t j = 0; j < rows * p.W; ++j) {
    pos[j] = m[j] & s[j];
    neg[j] = m[j] & ~s[j];
  }
}

inline void store(const Problem& p, int64_t b, int64_t o, float sum) {
  float v = p.scale * sum;
  if (p.bias != nullptr) v += p.bias[o];
  p.y[b * p.out + o] = v;
}

// ---------------------------------------------------------------------------------------------
// Portable
// ---------------------------------------------------------------------------------------------

// Rows [0, rows) of a tile (bits in tb, rows relative to o0) against batch rows [0, B).
void tile_portable(const Problem& p, const TileBits& tb, int64_t o0, int64_t rows, int64_t B) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint64_t* prow = tb.pos + r * p.W;
    const uint64_t* nrow = tb.neg + r * p.W;
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = p.x + b * p.ldx;
      float pos = 0.f, neg = 0.f;
      for (int64_t w = 0; w < p.W; ++w) {
        const float* xw = xr + w * kWordBits;
        uint64_t pw = prow[w];
        uint64_t nw = nrow[w];
        while (pw) { pos += xw[ctz64(pw)]; pw &= pw - 1; }
        while (nw) { neg += xw[ctz64(nw)]; nw &= nw - 1; }
      }
      store(p, b, o0 + r, pos - neg);
    }
  }
}

#if SUBKERN_TERNARY_X86
// ---------------------------------------------------------------------------------------------
// AVX-512: mask bits as lane masks
// ---------------------------------------------------------------------------------------------
#define SK_T_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq")))
#define SK_T_AVX2 __attribute__((target("avx2,fma")))

// The tile's bits re-laid for the AVX-512 kernel: for every 16-bit chunk c of the rows, the +c
// pieces of the 8 rows, then their -c pieces: chunks[(2 c + 0) * 8 + r] = 16 bits of M & S,
// chunks[(2 c + 1) * 8 + r] = 16 bits of M & ~S (rows past the tile are zero). One pointer walks
// all rows, so the inner loop is loads of mask registers at constant offsets and masked adds.
// Built with vector gathers and one VPERMW per 64-bit word and sign: cheap next to the 64 masked
// adds per word that consume it.
SK_T_AVX512 void fill_chunks_avx512(const Problem& p, int64_t o0, int64_t rows,
                                    uint16_t* chunks) {
  alignas(64) static const uint16_t kPerm[32] = {
      // output u16 lane (q * 8 + r) takes input u16 lane (r * 4 + q): row r's chunk q
      0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
      2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
  const __m512i perm = _mm512_load_si512(kPerm);
  const __m512i rowoff = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi64(p.W * 8));
  const __mmask8 live = static_cast<__mmask8>((1u << rows) - 1u);
  const auto* m = reinterpret_cast<const long long*>(p.m + o0 * p.W);
  const auto* sgn = reinterpret_cast<const long long*>(p.s + o0 * p.W);
  for (int64_t w = 0; w < p.W; ++w) {
    const __m512i mv = _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), live, rowoff, m + w, 1);
    const __m512i sv =
        _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), live, rowoff, sgn + w, 1);
    __m512i pos = _mm512_permutexvar_epi16(perm, _mm512_and_si512(mv, sv));
    __m512i neg = _mm512_permutexvar_epi16(perm, _mm512_andnot_si512(sv, mv));
    // pos holds [q][r] for q = 0..3; interleave as [q][+/-][r]: 128-bit lanes of 8 rows.
    uint16_t* out = chunks + w * 4 * 16;
    for (int q = 0; q < 4; ++q) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + q * 16),
                       _mm512_extracti32x4_epi32(pos, 0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + q * 16 + 8),
                       _mm512_extracti32x4_epi32(neg, 0));
      if (q < 3) {
        pos = _mm512_alignr_epi32(pos, pos, 4);
        neg = _mm512_alignr_epi32(neg, neg, 4);
      }
    }
  }
}

// kmovw k, m16: a load uop. (Compilers otherwise load into a general register and move it with
// kmovd k, r32, which takes port 5 away from the vaddps; with inline assembly the mask loads stay
// on the load ports.)
SK_T_AVX512 inline __mmask16 load_mask16(const uint16_t* ptr) {
  __mmask16 k;
  asm("kmovw %1, %0" : "=k"(k) : "m"(*ptr));
  return k;
}

// Rows [r0, r0 + R) of the tile against batch rows [b0, b0 + NB).
template <int R, int NB>
SK_T_AVX512 void micro_avx512(const Problem& p, const uint16_t* chunks, int64_t o0, int64_t r0,
                              int64_t b0) {
  __m512 accp[R][NB], accn[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      accp[r][b] = _mm512_setzero_ps();
      accn[r][b] = _mm512_setzero_ps();
    }
  }
  const float* xb = p.x + b0 * p.ldx;
  const int64_t nchunks = 4 * p.W;
  const uint16_t* ck = chunks + r0;
  for (int64_t c = 0; c < nchunks; ++c, ck += 16) {
    __m512 xv[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(xb + b * p.ldx + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __mmask16 kp = load_mask16(ck + r);
      const __mmask16 kn = load_mask16(ck + 8 + r);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        accp[r][b] = _mm512_mask_add_ps(accp[r][b], kp, accp[r][b], xv[b]);
        accn[r][b] = _mm512_mask_add_ps(accn[r][b], kn, accn[r][b], xv[b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      store(p, b0 + b, o0 + r0 + r,
            _mm512_reduce_add_ps(_mm512_sub_ps(accp[r][b], accn[r][b])));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: bytes of the bits index a table of 8 floats in {0, 1}
// ---------------------------------------------------------------------------------------------

struct ByteTable {
  alignas(32) float v[256][8];
  ByteTable() {
    for (int i = 0; i < 256; ++i)
      for (int j = 0; j < 8; ++j) v[i][j] = ((i >> j) & 1) ? 1.f : 0.f;
  }
};
const ByteTable& byte_table() {
  static const ByteTable table;
  return table;
}

SK_T_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int NB>
SK_T_AVX2 void micro_avx2(const Problem& p, const TileBits& tb, int64_t o0, int64_t r0,
                          int64_t b0) {
  const auto& T = byte_table().v;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
  }
  // Byte c of a row: bits 8c .. 8c + 7 (little-endian words).
  const auto* pos = reinterpret_cast<const uint8_t*>(tb.pos + r0 * p.W);
  const auto* neg = reinterpret_cast<const uint8_t*>(tb.neg + r0 * p.W);
  const int64_t stride = 8 * p.W;
  const float* xb = p.x + b0 * p.ldx;
  for (int64_t c = 0; c < stride; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_sub_ps(_mm256_load_ps(T[pos[r * stride + c]]),
                                      _mm256_load_ps(T[neg[r * stride + c]]));
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        acc[r][b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + b * p.ldx + 8 * c), acc[r][b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) store(p, b0 + b, o0 + r0 + r, hsum256(acc[r][b]));
  }
}

// One tile of `rows` (<= kRowTile) output rows against batch rows [0, B): batch blocks of 8, 4,
// 2, 1 with R = kRowTile / NB rows per micro-kernel call (a partial tile uses R = 1).
template <template <int, int> class K, class Bits>
void tile_vector(const Problem& p, const Bits& tb, int64_t o0, int64_t rows, int64_t B) {
  int64_t b = 0;
  auto run = [&](auto nb_tag) {
    constexpr int NB = decltype(nb_tag)::value;
    constexpr int R = kRowTile / NB;
    int64_t r = 0;
    if (rows == kRowTile) {
      for (; r + R <= rows; r += R) K<R, NB>::call(p, tb, o0, r, b);
    }
    for (; r < rows; ++r) K<1, NB>::call(p, tb, o0, r, b);
  };
  for (; b + 8 <= B; b += 8) run(std::integral_constant<int, 8>{});
  if (b + 4 <= B) { run(std::integral_constant<int, 4>{}); b += 4; }
  if (b + 2 <= B) { run(std::integral_constant<int, 2>{}); b += 2; }
  if (b + 1 <= B) { run(std::integral_constant<int, 1>{}); b += 1; }
}

template <int R, int NB>
struct Avx512K {
  static void call(const Problem& p, const uint16_t* tb, int64_t o0, int64_t r0, int64_t b0) {
    micro_avx512<R, NB>(p, tb, o0, r0, b0);
  }
};
template <int R, int NB>
struct Avx2K {
  static void call(const Problem& p, const TileBits& tb, int64_t o0, int64_t r0, int64_t b0) {
    micro_avx2<R, NB>(p, tb, o0, r0, b0);
  }
};
#endif  // SUBKERN_TERNARY_X86

// ---------------------------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------------------------

using subkern::cpu::run_tasks;

void check_bits(const at::Tensor& bits, const char* name, int64_t out, int64_t W) {
  TORCH_CHECK(bits.device().is_cpu(), "subkern::ternary_linear (CPU): ", name,
              " must be a CPU tensor");
  TORCH_CHECK(bits.scalar_type() == at::kLong, "subkern::ternary_linear: ", name,
              " must be int64 words, got ", bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2 && bits.size(1) == W && (out < 0 || bits.size(0) == out),
              "subkern::ternary_linear: ", name, " must be [out_features, ", W,
              "] (in_features bits in 64-bit words), got ", bits.sizes());
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& mask_bits,
                              const at::Tensor& sign_bits, double scale, int64_t in_features,
                              const std::optional<at::Tensor>& bias) {
  check_float_input_2d(x, in_features, "subkern::ternary_linear");
  const int64_t W = (in_features + kWordBits - 1) / kWordBits;
  check_bits(mask_bits, "mask_bits", -1, W);
  const int64_t out = mask_bits.size(0);
  check_bits(sign_bits, "sign_bits", out, W);
  const int64_t B = x.size(0);
  const at::Tensor bias_f = float_bias(bias, out, "subkern::ternary_linear");
  at::Tensor y = at::empty({B, out}, x.options().dtype(at::kFloat));
  if (B == 0 || out == 0) return y.to(x.scalar_type());
  if (W == 0) {  // no inputs: y = bias (or 0)
    fill_bias_rows(y, bias_f);
    return y.to(x.scalar_type());
  }
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t padded = W * kWordBits;
  if (padded != in_features) {  // zero-pad the columns to whole words
    at::Tensor xp = at::zeros({B, padded}, xf.options());
    xp.narrow(1, 0, in_features).copy_(xf);
    xf = xp;
  }
  const at::Tensor mc = mask_bits.contiguous();
  const at::Tensor sc = sign_bits.contiguous();
  Problem p{xf.data_ptr<float>(),
            padded,
            reinterpret_cast<const uint64_t*>(mc.data_ptr<int64_t>()),
            reinterpret_cast<const uint64_t*>(sc.data_ptr<int64_t>()),
            W,
            y.data_ptr<float>(),
            out,
            static_cast<float>(scale),
            bias_f.defined() ? bias_f.data_ptr<float>() : nullptr};

  const Isa isa = active_isa();
  const int64_t ntiles = (out + kRowTile - 1) / kRowTile;
  const double work = static_cast<double>(out) * static_cast<double>(padded) *
                      static_cast<double>(B);
  const int64_t nthreads = threads_for_work(work, kMinWorkPerThread, ntiles);

  run_tasks(nthreads, [&](int64_t t) {
    std::vector<uint64_t> bits(static_cast<size_t>(2 * kRowTile * W));
    const TileBits tb{bits.data(), bits.data() + kRowTile * W};
    const int64_t t0 = ntiles * t / nthreads, t1 = ntiles * (t + 1) / nthreads;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t o0 = tile * kRowTile;
      const int64_t rows = std::min(kRowTile, out - o0);
#if SUBKERN_TERNARY_X86
      if (isa == Isa::Avx512Vpopcnt) {
        auto* chunks = reinterpret_cast<uint16_t*>(bits.data());  // 2 * 8 rows * W words
        fill_chunks_avx512(p, o0, rows, chunks);
        tile_vector<Avx512K>(p, static_cast<const uint16_t*>(chunks), o0, rows, B);
        continue;
      }
#endif
      fill_tile_bits(p, o0, rows, bits.data(), bits.data() + kRowTile * W);
#if SUBKERN_TERNARY_X86
      if (isa == Isa::Avx2) {
        tile_vector<Avx2K>(p, tb, o0, rows, B);
        continue;
      }
#endif
      tile_portable(p, tb, o0, rows, B);
    }
  });
  (void)isa;
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace
}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("ternary_linear", &subkern::cpu::ternary_linear_cpu);
}
