// Permuted-chunk layout of a CSR weight: the batch-1..3 sparse x dense product (csr_linear's
// semantics) without most of its gathers, for AVX-512 CPUs. An inference-time cache that
// subkern.nn.SparseLinear builds from its CSR buffers (subkern/ops/sparse_permuted.py); never
// stored in an artifact.
//
// Why: the CSR SpMV fetches x with one AVX-512 gather per 16 nonzeros, about 10 cycles each on
// Sapphire/Emerald Rapids (x sits in L1), so a 90 %-sparse 3072 x 768 layer is bound by its
// gathers, not by memory. A permute from registers costs one cycle: if the 32 activations
// x[32 c .. 32 c + 31] are held in two zmm registers, _mm512_permutex2var_ps fetches 16 of them
// for 16 different rows at once from 5-bit indices.
//
// Layout (out rows in blocks of 16, inputs in chunks of 32; S slots, a multiple of 4):
//   slot_idx uint8 [nblocks, nchunks, S / 4, 16, 4]: for block q, chunk c, slot group g, byte
//            4 r + k is the column (minus 32 c, 0..31) of the (4 g + k)-th nonzero of row 16 q + r
//            in chunk c; so the 16 dwords of a 64-byte group, shifted right by 8 k, index slot
//            4 g + k of all 16 rows (permutex2var reads the low 5 bits of each dword);
//   slot_val float [nblocks, nchunks, S, 16]: the matching values; unused slots are 0;
//   res_ptr int64 [nblocks * 16 + 1], res_col int32 [rnnz], res_val float [rnnz]: the residual,
//            a CSR of the nonzeros past the first S of their (row, chunk) (rows past out empty).
//   y[o] = sum over slots + residual, the same sum as the CSR, in another order (float32).
// S is chosen per weight by a cost model (csr_permute_slots): slot vectors cost about a
// permute + FMA each, residual rows a gather per 16 nonzeros plus a horizontal sum.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/csr_checks.h"
#include "cpu/direct.h"
#include "cpu/topk_select.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SUBKERN_PERM_X86 1
#include <immintrin.h>
#define SK_P_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
#else
#define SUBKERN_PERM_X86 0
#endif

namespace subkern::cpu {
namespace {

constexpr int64_t kRows = 16;       // rows per block (zmm lanes)
constexpr int64_t kChunk = 32;      // inputs per chunk (two zmm registers of x)
// Cost model, in units of one slot vector (16 lanes: a permute and an FMA, ~1.3 ns measured on
// an Emerald Rapids core): a 16-wide gather of x ~3.5, a row's horizontal sum and store ~1.5.
constexpr double kGatherCost = 3.5;
constexpr double kRowSumCost = 1.5;
// Use the layout only when its modelled time is below this share of the CSR kernel's, and its
// bytes at most this multiple of the CSR's (large layers are memory bound: padding costs there).
constexpr double kMaxCostShare = 0.8;
constexpr double kMaxByteGrowth = 1.25;
// Slot vectors per thread below which fewer threads run (a fork-join costs about 2.5 us).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 12;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
               int64_t in_features, const char* op) {
  TORCH_CHECK(col_idx.device().is_cpu() && values.device().is_cpu(), op,
              ": the CSR tensors must be on the CPU");
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.size(0) == values.size(0), op,
              ": col_idx must be 1-D like values, got ", col_idx.sizes());
  TORCH_CHECK(col_idx.scalar_type() == at::kShort || col_idx.scalar_type() == at::kInt, op,
              ": col_idx must be int16 or int32, got ", col_idx.scalar_type());
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  check_csr_row_ptr(row_ptr, values.size(0), op);
  check_csr_columns(col_idx, in_features, op);
}

// counts[o * nchunks + c] = nonzeros of row o in chunk c.
std::vector<int32_t> chunk_counts(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                  int64_t nchunks) {
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t out = row_ptr.size(0) - 1;
  std::vector<int32_t> counts(static_cast<size_t>(out * nchunks), 0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t j = p[o]; j < p[o + 1]; ++j) ++counts[o * nchunks + csr_column(col_idx, j) / kChunk];
  }
  return counts;
}

struct Model {
  double cost;
  double bytes;
};

// Modelled cost and bytes of the layout with S slots (S = 0: the plain CSR kernel).
Model model(const std::vector<int32_t>& counts, int64_t out, int64_t nchunks, int64_t S) {
  const int64_t nblocks = ceil_div(out, kRows);
  double cost = static_cast<double>(nblocks * nchunks * S);
  double res_nnz = 0;
  for (int64_t o = 0; o < out; ++o) {
    int64_t r = 0;
    for (int64_t c = 0; c < nchunks; ++c) r += std::max<int64_t>(0, counts[o * nchunks + c] - S);
    if (r > 0 || S == 0) cost += static_cast<double>(ceil_div(r, 16)) * kGatherCost + kRowSumCost;
    res_nnz += static_cast<double>(r);
  }
  const double slot_bytes = static_cast<double>(nblocks * nchunks * S * kRows) * 5.0;
  return {cost, slot_bytes + res_nnz * 8.0 + static_cast<double>(nblocks * kRows) * 8.0};
}

struct Layout {
  const uint8_t* idx;
  const float* val;
  const int64_t* res_ptr;
  const int32_t* res_col;
  const float* res_val;
  const float* bias;   // float32 [out] or null
  int64_t S, out, in, nblocks, nchunks, rnnz;
};

// Portable version of the kernel below (used when the ISA level was lowered after packing, e.g.
// SUBKERN_CPU_ISA=avx2 or set_cpu_isa): the same sums, one lane at a time.
void permuted_blocks_portable(const Layout& L, const float* xp, int64_t ldxp, int64_t B, float* y,
                              int64_t ldy, int64_t q0, int64_t q1) {
  const int64_t groups = L.S / 4;
  const int64_t last = std::max<int64_t>(L.in, 1) - 1;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t rows = std::min<int64_t>(kRows, L.out - q * kRows);
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = xp + b * ldxp;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = q * kRows + r;
        float sum = 0.f;
        for (int64_t c = 0; c < L.nchunks; ++c) {
          const uint8_t* ix = L.idx + (q * L.nchunks + c) * groups * 64;
          const float* v = L.val + (q * L.nchunks + c) * L.S * kRows;
          for (int64_t k = 0; k < L.S; ++k) {
            const int64_t col = ix[(k / 4) * 64 + 4 * r + k % 4] & 31;
            sum += v[k * kRows + r] * xb[c * kChunk + col];
          }
        }
        const int64_t s = std::clamp<int64_t>(L.res_ptr[row], 0, L.rnnz);
        const int64_t e = std::clamp<int64_t>(L.res_ptr[row + 1], s, L.rnnz);
        for (int64_t j = s; j < e; ++j) {
          const int64_t col = std::min<int64_t>(static_cast<uint32_t>(L.res_col[j]), last);
          sum += L.res_val[j] * xb[col];
        }
        y[b * ldy + row] = sum + (L.bias != nullptr ? L.bias[row] : 0.f);
      }
    }
  }
}

#if SUBKERN_PERM_X86
// y[b, 16 q + r] for blocks [q0, q1) and NB batch rows of the zero-padded x (xp [NB, nchunks 32]).
template <int NB>
SK_P_AVX512 void permuted_blocks(const Layout& L, const float* xp, int64_t ldxp, float* y,
                                 int64_t ldy, int64_t q0, int64_t q1) {
  const int64_t groups = L.S / 4;
  const __m512i last = _mm512_set1_epi32(static_cast<int>(std::max<int64_t>(L.in, 1) - 1));
  for (int64_t q = q0; q < q1; ++q) {
    const uint8_t* ix = L.idx + q * L.nchunks * groups * 64;
    const float* v = L.val + q * L.nchunks * L.S * kRows;
    __m512 acc[NB][2];
    for (int b = 0; b < NB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < L.nchunks; ++c) {
      __m512 xl[NB], xh[NB];
      for (int b = 0; b < NB; ++b) {
        xl[b] = _mm512_loadu_ps(xp + b * ldxp + c * kChunk);
        xh[b] = _mm512_loadu_ps(xp + b * ldxp + c * kChunk + 16);
      }
      for (int64_t g = 0; g < groups; ++g, ix += 64, v += 64) {
        const __m512i id = _mm512_loadu_si512(ix);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          const __m512i idk = k == 0 ? id : _mm512_srli_epi32(id, 8 * k);
          const __m512 w = _mm512_loadu_ps(v + 16 * k);
#pragma GCC unroll 3
          for (int b = 0; b < NB; ++b) {
            acc[b][k & 1] =
                _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xl[b], idk, xh[b]), acc[b][k & 1]);
          }
        }
      }
    }
    alignas(64) float res[NB][kRows];
    for (int b = 0; b < NB; ++b) std::memset(res[b], 0, sizeof(res[b]));
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = q * kRows + r;
      // clamped: a corrupt res_ptr can give a wrong sum but never an out-of-bounds read
      const int64_t s = std::clamp<int64_t>(L.res_ptr[row], 0, L.rnnz);
      const int64_t e = std::clamp<int64_t>(L.res_ptr[row + 1], s, L.rnnz);
      if (s == e) continue;
      __m512 g[NB];
      for (int b = 0; b < NB; ++b) g[b] = _mm512_setzero_ps();
      for (int64_t j = s; j < e; j += 16) {
        const int64_t n = std::min<int64_t>(16, e - j);
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
        const __m512i col = _mm512_min_epu32(_mm512_maskz_loadu_epi32(m, L.res_col + j), last);
        const __m512 w = _mm512_maskz_loadu_ps(m, L.res_val + j);
        for (int b = 0; b < NB; ++b) {
          g[b] = _mm512_fmadd_ps(
              w, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, xp + b * ldxp, 4), g[b]);
        }
      }
      for (int b = 0; b < NB; ++b) res[b][r] = _mm512_reduce_add_ps(g[b]);
    }
    const int64_t rows = std::min<int64_t>(kRows, L.out - q * kRows);
    const __mmask16 store = static_cast<__mmask16>((1u << rows) - 1u);
    const __m512 bias = L.bias != nullptr ? _mm512_maskz_loadu_ps(store, L.bias + q * kRows)
                                          : _mm512_setzero_ps();
    for (int b = 0; b < NB; ++b) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                       _mm512_add_ps(_mm512_load_ps(res[b]), bias));
      _mm512_mask_storeu_ps(y + b * ldy + q * kRows, store, sum);
    }
  }
}
#endif

}  // namespace

bool csr_permute_supported() {
#if SUBKERN_PERM_X86
  return active_isa() == Isa::Avx512Vpopcnt;
#else
  return false;
#endif
}

int64_t csr_permute_slots(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                          const at::Tensor& values, int64_t in_features) {
  const char* op = "csr_permute_slots";
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  check_csr(rp, ci, values, in_features, op);
  const int64_t out = rp.size(0) - 1;
  if (out == 0 || in_features == 0 || values.size(0) == 0) return 0;
  const int64_t nchunks = ceil_div(in_features, kChunk);
  const std::vector<int32_t> counts = chunk_counts(rp, ci, nchunks);
  const Model csr = model(counts, out, nchunks, 0);
  const double csr_bytes = static_cast<double>(values.size(0)) *
                               static_cast<double>(values.element_size() + ci.element_size()) +
                           static_cast<double>(out + 1) * 8.0;
  int64_t best = 0;
  double best_cost = csr.cost * kMaxCostShare;
  for (int64_t S = 4; S <= 32; S += 4) {
    const Model m = model(counts, out, nchunks, S);
    if (m.cost < best_cost && m.bytes <= csr_bytes * kMaxByteGrowth) {
      best = S;
      best_cost = m.cost;
    }
  }
  return best;
}

std::vector<at::Tensor> csr_permute_pack(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         const at::Tensor& values, int64_t in_features,
                                         int64_t slots) {
  const char* op = "csr_permute_pack";
  TORCH_CHECK(slots > 0 && slots % 4 == 0, op, ": slots must be a positive multiple of 4, got ",
              slots);
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous();
  const at::Tensor va = values.to(at::kFloat).contiguous();
  check_csr(rp, ci, va, in_features, op);
  const int64_t out = rp.size(0) - 1;
  const int64_t nchunks = ceil_div(in_features, kChunk);
  const int64_t nblocks = ceil_div(out, kRows);
  const int64_t groups = slots / 4;
  at::Tensor idx = at::zeros({nblocks * nchunks * groups * 64}, rp.options().dtype(at::kByte));
  at::Tensor val = at::zeros({nblocks * nchunks * slots * kRows}, va.options());
  const int64_t* p = rp.data_ptr<int64_t>();
  const float* w = va.data_ptr<float>();
  uint8_t* ix = idx.data_ptr<uint8_t>();
  float* vv = val.data_ptr<float>();
  std::vector<int64_t> res_ptr(static_cast<size_t>(nblocks * kRows + 1), 0);
  std::vector<int32_t> res_col;
  std::vector<float> res_val;
  for (int64_t o = 0; o < out; ++o) {
    const int64_t q = o / kRows, r = o % kRows;
    int64_t c_prev = -1, k = 0;   // k: the nonzero's rank within its (row, chunk)
    for (int64_t j = p[o]; j < p[o + 1]; ++j) {
      const int64_t col = csr_column(ci, j);
      const int64_t c = col / kChunk;
      k = c == c_prev ? k + 1 : 0;
      c_prev = c;
      if (k < slots) {
        const int64_t base = q * nchunks + c;
        ix[(base * groups + k / 4) * 64 + 4 * r + k % 4] = static_cast<uint8_t>(col - c * kChunk);
        vv[(base * slots + k) * kRows + r] = w[j];
      } else {
        res_col.push_back(static_cast<int32_t>(col));
        res_val.push_back(w[j]);
      }
    }
    res_ptr[static_cast<size_t>(o + 1)] = static_cast<int64_t>(res_col.size());
  }
  for (int64_t o = out; o < nblocks * kRows; ++o) {
    res_ptr[static_cast<size_t>(o + 1)] = static_cast<int64_t>(res_col.size());
  }
  const int64_t rnnz = static_cast<int64_t>(res_col.size());
  at::Tensor rptr = at::empty({nblocks * kRows + 1}, rp.options());
  at::Tensor rcol = at::empty({rnnz}, rp.options().dtype(at::kInt));
  at::Tensor rval = at::empty({rnnz}, va.options());
  std::memcpy(rptr.data_ptr<int64_t>(), res_ptr.data(), res_ptr.size() * sizeof(int64_t));
  if (rnnz > 0) {
    std::memcpy(rcol.data_ptr<int32_t>(), res_col.data(), res_col.size() * sizeof(int32_t));
    std::memcpy(rval.data_ptr<float>(), res_val.data(), res_val.size() * sizeof(float));
  }
  return {idx, val, rptr, rcol, rval};
}

at::Tensor direct_csr_linear_permuted(const at::Tensor& x, const at::Tensor& slot_idx,
                                      const at::Tensor& slot_val, const at::Tensor& res_ptr,
                                      const at::Tensor& res_col, const at::Tensor& res_val,
                                      int64_t slots, int64_t in_features, int64_t out_features,
                                      const std::optional<at::Tensor>& bias) {
  const char* op = "csr_linear (permuted layout)";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == in_features, op,
              ": x must be a CPU tensor [batch, ", in_features, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) <= 3, op, ": batch must be <= 3, got ", x.size(0));
  TORCH_CHECK(slots > 0 && slots % 4 == 0 && in_features >= 0 && out_features >= 0, op,
              ": bad layout sizes (slots ", slots, ", in ", in_features, ", out ", out_features,
              ")");
  const int64_t nchunks = ceil_div(in_features, kChunk);
  const int64_t nblocks = ceil_div(out_features, kRows);
  auto check = [&](const at::Tensor& t, at::ScalarType dt, int64_t n, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 1 &&
                    t.is_contiguous() && (n < 0 || t.size(0) == n),
                op, ": ", name, " does not match the layout (", t.scalar_type(), " ",
                t.sizes(), ", expected ", n, " entries)");
  };
  check(slot_idx, at::kByte, nblocks * nchunks * (slots / 4) * 64, "slot_idx");
  check(slot_val, at::kFloat, nblocks * nchunks * slots * kRows, "slot_val");
  check(res_ptr, at::kLong, nblocks * kRows + 1, "res_ptr");
  check(res_val, at::kFloat, -1, "res_val");
  check(res_col, at::kInt, res_val.size(0), "res_col");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out_features &&
                    at::isFloatingType(bias->scalar_type()),
                op, ": bias must be a floating-point CPU tensor of shape [", out_features,
                "], got ", bias->scalar_type(), " ", bias->sizes());
  }
  const int64_t B = x.size(0);
  at::Tensor y = at::empty({B, out_features}, x.options().dtype(at::kFloat));
  if (B == 0 || out_features == 0) return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  const at::Tensor b32 = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  if (in_features == 0) {
    if (has_bias) y.copy_(b32.unsqueeze(0).expand({B, out_features})); else y.zero_();
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  // x in float32, zero-padded to whole chunks (the permutes read 32 floats per chunk)
  const int64_t ld = nchunks * kChunk;
  std::vector<float> xp(static_cast<size_t>(B * ld), 0.f);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xp.data() + b * ld, xf.data_ptr<float>() + b * in_features,
                static_cast<size_t>(in_features) * sizeof(float));
  }
  const Layout L{slot_idx.data_ptr<uint8_t>(), slot_val.data_ptr<float>(),
                 res_ptr.data_ptr<int64_t>(), res_col.data_ptr<int32_t>(),
                 res_val.data_ptr<float>(), has_bias ? b32.data_ptr<float>() : nullptr, slots,
                 out_features, in_features, nblocks, nchunks, res_val.size(0)};
  const int64_t work = nblocks * nchunks * slots + res_val.size(0) / 4;
  const int64_t nthreads = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(at::get_num_threads()),
                   std::max<int64_t>(1, work * B / kMinWorkPerThread), nblocks}));
  const float* xpp = xp.data();
  float* yp = y.data_ptr<float>();
  const bool avx512 = csr_permute_supported();
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t q0 = nblocks * t / nthreads, q1 = nblocks * (t + 1) / nthreads;
#if SUBKERN_PERM_X86
    if (avx512) {
      if (B == 1) permuted_blocks<1>(L, xpp, ld, yp, out_features, q0, q1);
      else if (B == 2) permuted_blocks<2>(L, xpp, ld, yp, out_features, q0, q1);
      else permuted_blocks<3>(L, xpp, ld, yp, out_features, q0, q1);
      return;
    }
#endif
    permuted_blocks_portable(L, xpp, ld, B, yp, out_features, q0, q1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace subkern::cpu
