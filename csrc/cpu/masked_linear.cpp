// C++ CPU kernels of edge-popup's masked layers (schemas are defined in subkern/ops/masked.py):
//
//   masked_linear_with_mask(x [..., in], weight [out, in], scores, mask bool, bias?) -> y
//       y = x @ (W * M)^T + b
//   masked_linear_backward(grad_y, x, weight, scores, mask, output_mask) -> (gx, gs, gw)
//       G = grad_y^T @ x (= dL/dW_eff);  gx = grad_y @ (W * M);  gs = G * W * sign(S);  gw = G * M
//   masked_weight_grads(G, weight, scores, mask, need_weight) -> (gs, gw)   (the conv's epilogue)
//   masked_linear_select(x, weight, scores, k, bias) -> (y, mask, w_eff, w_sign)
//       the training step's forward (subkern.masked_linear on CPU): the top-k selection of
//       csrc/cpu/topk_mask.cpp, then ONE pass over S and W writing the bool mask, W_eff = W * M
//       and w_sign = W * sign(S) (NaN where sign(S) = 0), then the GEMM on W_eff
//   masked_linear_select_backward(grad_y, x, weight, scores, mask, w_eff, w_sign, output_mask)
//       gx = grad_y @ w_eff;  G = grad_y^T @ x;  gs = G * w_sign (in place, one pass reading G and
//       w_sign; (G * W) * sign(S) where w_sign is NaN);  gw = G * M
//
// Design
// ------
// * W_eff = W * M is built in one multithreaded pass (multiplication, not selection, so a NaN or
//   inf weight behaves as in the reference's `weight * mask`) into a thread-local buffer that is
//   reused from call to call (no fresh pages to fault in), then the GEMM is ATen's (MKL/oneDNN):
//   at::addmm / at::mm on the transposed view, no copy.
// * Backward: G = grad_y^T @ x is one GEMM; then one pass over G writes grad_scores, grad_weight
//   (when the weight requires grad) and, when grad_x is wanted, rebuilds W_eff into the reused
//   buffer (it already reads W and M), and grad_x = grad_y @ W_eff is the last GEMM. When the
//   weight does not require grad (edge-popup's case) grad_scores is written over G in place, so
//   the backward allocates nothing beyond what dense F.linear's backward does. (The training
//   step, masked_linear_select + masked_linear_select_backward, keeps W_eff and W * sign(S)
//   from its forward instead: 8 bytes per weight held between the passes buy a backward pass
//   that reads 8 bytes per weight instead of 13 and writes 4 instead of 8, and no rebuild.)
// * Large buffers of the training step come from pooled_empty: a bounded cache of allocations
//   reused once nothing refers to their storage (fresh multi-megabyte tensors every step cost
//   page faults and page zeroing; measured ~400-700 minor faults per step for 768x3072).
// * sign(S) is (S > 0) - (S < 0): 0 for 0 and NaN, as torch.sign. Products are formed in the
//   order autograd forms them, (G * W) * sign(S) and G * M, so float32/float64 results are
//   bit-identical to autograd's for the same G; half types compute in float and round once.
// * float32 with contiguous operands on AVX-512 CPUs: the passes are explicit AVX-512 loops
//   (16 entries per step: mask bytes widened to 0.0f / 1.0f, sign(S) by ordered compares) on
//   ATen's intra-op threads (intraop_tasks, csrc/cpu/topk_select.h), forming the same products in
//   the same order as the portable loops, hence the same bits.
// * Threads: the elementwise passes run through at::TensorIterator::for_each, whose parallel_for
//   is compiled inside libtorch: they run on torch's own intra-op (OpenMP) threads, the ones the
//   GEMMs just used. (std::thread workers, as in hamming.cpp, measured 3-4x slower here: they
//   compete with the OpenMP workers that keep spinning after each GEMM.) Chunks of kGrain elements
//   keep small layers on the calling thread.
#include "cpu/topk_select.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace subkern::cpu {
namespace {

// Elements per task of ATen's intra-op thread pool (TensorIterator::for_each -> parallel_for).
constexpr int64_t kGrain = 1 << 15;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// sign(v) as (v > 0) - (v < 0): 0 for +-0 and NaN, as torch.sign.
template <typename A>
inline A sign_of(A v) {
  return static_cast<A>((v > A(0)) - (v < A(0)));
}

// out = w * m over equally shaped contiguous tensors, one pass on ATen's thread pool.
// The loop runs inside libtorch's TensorIterator::for_each, i.e. on torch's own (OpenMP) worker
// threads: the same threads the GEMM just used, so nothing competes with spinning workers.
template <typename T>
void apply_mask(const at::Tensor& w, const at::Tensor& m, at::Tensor& out) {
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(w)
                  .add_const_input(m)
                  .check_all_same_dtype(false)
                  .resize_outputs(false)
                  .build();
  iter.for_each(
      [](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        using A = acc_t<T>;
        for (int64_t j = 0; j < n1; ++j) {
          char* po = data[0] + j * strides[3];
          const char* pw = data[1] + j * strides[4];
          const char* pm = data[2] + j * strides[5];
          if (strides[0] == sizeof(T) && strides[1] == sizeof(T) && strides[2] == 1) {
            T* __restrict o = reinterpret_cast<T*>(po);
            const T* __restrict wv = reinterpret_cast<const T*>(pw);
            const uint8_t* __restrict mv = reinterpret_cast<const uint8_t*>(pm);
            for (int64_t i = 0; i < n0; ++i) {
              o[i] = static_cast<T>(static_cast<A>(wv[i]) * static_cast<A>(mv[i]));
            }
          } else {
            for (int64_t i = 0; i < n0; ++i) {
              const A wi = static_cast<A>(*reinterpret_cast<const T*>(pw + i * strides[1]));
              const A mi = static_cast<A>(*reinterpret_cast<const uint8_t*>(pm + i * strides[2]));
              *reinterpret_cast<T*>(po + i * strides[0]) = static_cast<T>(wi * mi);
            }
          }
        }
      },
      kGrain);
}

// One pass over G = dL/dW_eff (all tensors of one shape):
//   gs = (g * w) * sign(s);  gw = g * m (when gw != nullptr);  weff = w * m (when weff != nullptr)
// gs may be g itself (in place). weff lets the linear backward rebuild W * M for grad_x in the
// same pass that already reads w and m.
template <typename T>
void weight_grads_iter(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                  const at::Tensor& m, at::Tensor& gs, at::Tensor* gw, at::Tensor* weff) {
  at::TensorIteratorConfig config;
  config.add_output(gs);
  if (gw != nullptr) config.add_output(*gw);
  if (weff != nullptr) config.add_output(*weff);
  config.add_const_input(g).add_const_input(w).add_const_input(s).add_const_input(m);
  config.check_all_same_dtype(false).resize_outputs(false);
  auto iter = config.build();
  const bool with_w = gw != nullptr;
  const bool with_eff = weff != nullptr;
  // operand indices: outputs first (gs, [gw], [weff]), then g, w, s, m
  const int i_gw = 1;
  const int i_eff = with_w ? 2 : 1;
  const int i_g = 1 + int(with_w) + int(with_eff);
  const int nt = i_g + 4;
  iter.for_each(
      [=](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        using A = acc_t<T>;
        const int64_t* outer = strides + nt;
        bool contiguous = strides[i_g + 3] == 1;
        for (int t = 0; t < nt; ++t) {
          if (t != i_g + 3 && strides[t] != static_cast<int64_t>(sizeof(T))) contiguous = false;
        }
        for (int64_t j = 0; j < n1; ++j) {
          char* p_gs = data[0] + j * outer[0];
          char* p_gw = with_w ? data[i_gw] + j * outer[i_gw] : nullptr;
          char* p_eff = with_eff ? data[i_eff] + j * outer[i_eff] : nullptr;
          const char* p_g = data[i_g] + j * outer[i_g];
          const char* p_w = data[i_g + 1] + j * outer[i_g + 1];
          const char* p_s = data[i_g + 2] + j * outer[i_g + 2];
          const char* p_m = data[i_g + 3] + j * outer[i_g + 3];
          if (contiguous) {
            T* vgs = reinterpret_cast<T*>(p_gs);  // may alias vg
            const T* vg = reinterpret_cast<const T*>(p_g);
            const T* __restrict vw = reinterpret_cast<const T*>(p_w);
            const T* __restrict vs = reinterpret_cast<const T*>(p_s);
            const uint8_t* __restrict vm = reinterpret_cast<const uint8_t*>(p_m);
            if (with_eff) {
              T* __restrict ve = reinterpret_cast<T*>(p_eff);
              for (int64_t i = 0; i < n0; ++i) {
                ve[i] = static_cast<T>(static_cast<A>(vw[i]) * static_cast<A>(vm[i]));
              }
            }
            if (with_w) {
              T* __restrict vgw = reinterpret_cast<T*>(p_gw);
              for (int64_t i = 0; i < n0; ++i) {
                vgw[i] = static_cast<T>(static_cast<A>(vg[i]) * static_cast<A>(vm[i]));
              }
            }
            for (int64_t i = 0; i < n0; ++i) {
              const A gw_prod = static_cast<A>(vg[i]) * static_cast<A>(vw[i]);
              vgs[i] = static_cast<T>(static_cast<A>(static_cast<T>(gw_prod)) *
                                      sign_of(static_cast<A>(vs[i])));
            }
          } else {
            for (int64_t i = 0; i < n0; ++i) {
              const A gi = static_cast<A>(*reinterpret_cast<const T*>(p_g + i * strides[i_g]));
              const A wi =
                  static_cast<A>(*reinterpret_cast<const T*>(p_w + i * strides[i_g + 1]));
              const A si =
                  static_cast<A>(*reinterpret_cast<const T*>(p_s + i * strides[i_g + 2]));
              const A mi =
                  static_cast<A>(*reinterpret_cast<const uint8_t*>(p_m + i * strides[i_g + 3]));
              if (with_eff) {
                *reinterpret_cast<T*>(p_eff + i * strides[i_eff]) = static_cast<T>(wi * mi);
              }
              if (with_w) {
                *reinterpret_cast<T*>(p_gw + i * strides[i_gw]) = static_cast<T>(gi * mi);
              }
              *reinterpret_cast<T*>(p_gs + i * strides[0]) =
                  static_cast<T>(static_cast<A>(static_cast<T>(gi * wi)) * sign_of(si));
            }
          }
        }
      },
      kGrain);
}

// ------------------------------------------------------------------------------------------
// float32 fast path (contiguous operands, AVX-512): the same products in the same order, so the
// results are bit-identical to the portable loops; chunks on ATen's intra-op threads.
// ------------------------------------------------------------------------------------------

#if defined(__x86_64__)
#define SK_ML_AVX512 __attribute__((target("avx512f")))

// Software prefetch distance of the passes, in float32 entries (2 KB ahead): measured ~25% off
// the step's non-GEMM time on a memory-bound core, where the hardware prefetcher alone fell short.
constexpr int64_t kPrefetchAhead = 512;

// 16 mask bytes (0/1) as floats 0.0f / 1.0f
SK_ML_AVX512 inline __m512 load_mask16(const uint8_t* m) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
  return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepu8_epi32(0xFFFF, bytes));
}

// W_eff rows go out with non-temporal stores when 64-byte aligned: the GEMM reads them next,
// once, and a regular store would first read every line of the 9 MB buffer.
SK_ML_AVX512 inline void store_weff(float* p, __m512 v, bool stream) {
  if (stream) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

// out = w * m (m: bool bytes 0/1)
SK_ML_AVX512 void apply_mask_f32(const float* w, const uint8_t* m, float* out, int64_t n) {
  const bool stream = (reinterpret_cast<uintptr_t>(out) & 63) == 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512 mf = load_mask16(m + i);
    store_weff(out + i, _mm512_mul_ps(_mm512_loadu_ps(w + i), mf), stream);
  }
  if (stream) _mm_sfence();
  for (; i < n; ++i) out[i] = w[i] * static_cast<float>(m[i]);
}

// gs = (g * w) * sign(s) (gs may be g);  gw = g * m and weff = w * m where not null.
SK_ML_AVX512 void weight_grads_f32(const float* g, const float* w, const float* s,
                                   const uint8_t* m, float* gs, float* gw, float* weff,
                                   int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 minus_one = _mm512_set1_ps(-1.0f);
  const bool stream = weff != nullptr && (reinterpret_cast<uintptr_t>(weff) & 63) == 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(g + i + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(s + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512 vg = _mm512_loadu_ps(g + i);
    const __m512 vw = _mm512_loadu_ps(w + i);
    const __m512 vs = _mm512_loadu_ps(s + i);
    // sign(s): +1 / -1 / 0 (0 for +-0 and NaN: ordered compares)
    __m512 sg = _mm512_mask_mov_ps(zero, _mm512_cmp_ps_mask(vs, zero, _CMP_GT_OQ), one);
    sg = _mm512_mask_mov_ps(sg, _mm512_cmp_ps_mask(vs, zero, _CMP_LT_OQ), minus_one);
    if (gw != nullptr || weff != nullptr) {
      const __m512 mf = load_mask16(m + i);
      if (gw != nullptr) _mm512_storeu_ps(gw + i, _mm512_mul_ps(vg, mf));
      if (weff != nullptr) store_weff(weff + i, _mm512_mul_ps(vw, mf), stream);
    }
    _mm512_storeu_ps(gs + i, _mm512_mul_ps(_mm512_mul_ps(vg, vw), sg));
  }
  if (stream) _mm_sfence();
  for (; i < n; ++i) {
    const float mi = static_cast<float>(m[i]);
    const float gi = g[i], wi = w[i], si = s[i];
    if (gw != nullptr) gw[i] = gi * mi;
    if (weff != nullptr) weff[i] = wi * mi;
    gs[i] = (gi * wi) * sign_of(si);
  }
}
// gs = g * wsign (gs may be g), wsign = W * sign(S) from the forward; where wsign is NaN (the
// marker of sign(S) = 0, or a NaN weight) gs is formed from w and s as (g * w) * sign(s).
// g * (w * sign(s)) equals (g * w) * sign(s) bit for bit when sign(s) = +-1 (a sign flip is exact
// and rounding is symmetric), so the result is the reference's everywhere.
SK_ML_AVX512 void signed_grads_f32(const float* g, const float* wsign, const float* w,
                                   const float* s, float* gs, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(g + i + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wsign + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512 vws = _mm512_loadu_ps(wsign + i);
    const __m512 prod = _mm512_mul_ps(_mm512_loadu_ps(g + i), vws);
    const __mmask16 marked = _mm512_cmp_ps_mask(vws, vws, _CMP_UNORD_Q);
    if (marked == 0) {
      _mm512_storeu_ps(gs + i, prod);
      continue;
    }
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, prod);
    for (int j = 0; j < 16; ++j) {
      if ((marked >> j) & 1) tmp[j] = (g[i + j] * w[i + j]) * sign_of(s[i + j]);
    }
    _mm512_storeu_ps(gs + i, _mm512_load_ps(tmp));
  }
  for (; i < n; ++i) {
    gs[i] = wsign[i] == wsign[i] ? g[i] * wsign[i] : (g[i] * w[i]) * sign_of(s[i]);
  }
}
#undef SK_ML_AVX512
#endif

// Whether the float32 AVX-512 path applies to these operands.
bool fast_f32(std::initializer_list<const at::Tensor*> ts) {
#if defined(__x86_64__)
  if (active_isa() != Isa::Avx512Vpopcnt) return false;
  for (const at::Tensor* t : ts) {
    if (t->scalar_type() != at::kFloat && t->scalar_type() != at::kBool) return false;
    if (!t->is_contiguous()) return false;
  }
  return true;
#else
  (void)ts;
  return false;
#endif
}

// Splits [0, n) into per-thread chunks (multiples of 16 entries) and runs fn(i0, i1) on each.
template <typename F>
void parallel_chunks(int64_t n, const F& fn) {
  const int64_t nthreads = pass_threads(n);
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t i0 = (n * t / nthreads) & ~int64_t(15);
    const int64_t i1 = t + 1 == nthreads ? n : (n * (t + 1) / nthreads) & ~int64_t(15);
    if (i1 > i0) fn(i0, i1);
  });
}

// One pass over G (see weight_grads_iter): the float32 AVX-512 path or the TensorIterator loops.
template <typename T>
void weight_grads(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                  const at::Tensor& m, at::Tensor& gs, at::Tensor* gw, at::Tensor* weff) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (fast_f32({&g, &w, &s, &m, &gs}) && (gw == nullptr || gw->is_contiguous()) &&
        (weff == nullptr || weff->is_contiguous())) {
      const float* pg = g.const_data_ptr<float>();
      const float* pw = w.const_data_ptr<float>();
      const float* ps = s.const_data_ptr<float>();
      const auto* pm = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
      float* pgs = gs.data_ptr<float>();
      float* pgw = gw != nullptr ? gw->data_ptr<float>() : nullptr;
      float* peff = weff != nullptr ? weff->data_ptr<float>() : nullptr;
      parallel_chunks(g.numel(), [&](int64_t i0, int64_t i1) {
        weight_grads_f32(pg + i0, pw + i0, ps + i0, pm + i0, pgs + i0,
                         pgw != nullptr ? pgw + i0 : nullptr,
                         peff != nullptr ? peff + i0 : nullptr, i1 - i0);
      });
      return;
    }
  }
#endif
  weight_grads_iter<T>(g, w, s, m, gs, gw, weff);
}

void check_common(const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& mask) {
  TORCH_CHECK(weight.device().is_cpu(), "subkern masked ops (CPU kernel): weight must be on CPU");
  TORCH_CHECK(scores.sizes() == weight.sizes(), "scores must have the shape of weight");
  TORCH_CHECK(mask.sizes() == weight.sizes(), "mask must have the shape of weight");
  TORCH_CHECK(scores.scalar_type() == weight.scalar_type(), "scores must have weight's dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be a bool tensor");
}

// Buffers of the training step's large tensors (masked_linear_select's mask, W_eff and
// W * sign(S), kept by autograd until the backward; the backward's G / grad_scores and grad_x):
// a bounded cache of allocations that are handed out again once nothing but the cache
// refers to their storage (a fresh multi-megabyte tensor per step costs page faults and zeroing
// of new pages on every call). Blocks below kPoolMinBytes come from at::empty.
constexpr int64_t kPoolMinBytes = int64_t(1) << 20;
constexpr size_t kPoolEntries = 64;
constexpr int64_t kPoolMaxBytes = int64_t(1) << 30;

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t n = 1;
  for (const int64_t d : sizes) n *= d;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(
                                 c10::typeMetaToScalarType(options.dtype())));
  // inference mode makes inference tensors, which autograd could not save later: not pooled
  if (nbytes < kPoolMinBytes || !options.device().is_cpu() ||
      c10::InferenceMode::is_enabled()) {
    return at::empty(sizes, options);
  }
  // A fresh tensor (own TensorImpl, no autograd or view metadata) on the block's storage.
  auto on_storage = [&](const at::Tensor& block) {
    return at::empty({0}, options).set_(block.storage(), 0, sizes);
  };
  static std::mutex mu;
  static std::vector<at::Tensor> pool;  // 1-D, contiguous blocks
  std::lock_guard<std::mutex> lock(mu);
  // free: nothing but this cache refers to the block's storage
  auto is_free = [](const at::Tensor& t) { return t.storage().use_count() == 1; };
  int64_t cached = 0;
  at::Tensor* victim = nullptr;
  for (at::Tensor& t : pool) {
    cached += t.nbytes();
    if (!is_free(t)) continue;
    if (t.numel() == n && t.dtype() == options.dtype()) return on_storage(t);
    victim = &t;
  }
  at::Tensor fresh = at::empty({n}, options);
  if (pool.size() < kPoolEntries && cached + nbytes <= kPoolMaxBytes) {
    pool.push_back(fresh);
  } else if (victim != nullptr && cached - victim->nbytes() + nbytes <= kPoolMaxBytes) {
    *victim = fresh;  // a free block of another size makes room
  } else {
    return at::empty(sizes, options);
  }
  return on_storage(fresh);
}

// The calling thread's reusable W_eff buffer, shaped as w (valid until this thread's next call;
// nothing returned to the caller aliases it).
at::Tensor weight_buffer(const at::Tensor& w) {
  thread_local at::Tensor buffer;
  const int64_t n = w.numel();
  if (!buffer.defined() || buffer.scalar_type() != w.scalar_type() || buffer.numel() < n) {
    buffer = at::empty({n}, w.options());
  }
  return buffer.narrow(0, 0, n).view(w.sizes());
}

// W * M into the reusable buffer.
at::Tensor effective_weight(const at::Tensor& weight, const at::Tensor& mask) {
  const auto w = weight.contiguous();
  const auto m = mask.contiguous();
  at::Tensor out = weight_buffer(w);
#if defined(__x86_64__)
  if (fast_f32({&w, &m})) {
    const float* pw = w.const_data_ptr<float>();
    const auto* pm = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
    float* po = out.data_ptr<float>();
    parallel_chunks(w.numel(), [&](int64_t i0, int64_t i1) {
      apply_mask_f32(pw + i0, pm + i0, po + i0, i1 - i0);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "apply_mask",
                                  [&] { apply_mask<scalar_t>(w, m, out); });
  return out;
}

at::Tensor masked_linear_with_mask_cpu(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& scores, const at::Tensor& mask,
                                       const std::optional<at::Tensor>& bias) {
  check_common(weight, scores, mask);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
              "x's last dimension must be in_features");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x must have weight's dtype");
  return dense_linear_rows(x, effective_weight(weight, mask), bias);
}

std::tuple<at::Tensor, at::Tensor> masked_weight_grads_cpu(const at::Tensor& grad_weff,
                                                           const at::Tensor& weight,
                                                           const at::Tensor& scores,
                                                           const at::Tensor& mask,
                                                           bool need_weight) {
  check_common(weight, scores, mask);
  TORCH_CHECK(grad_weff.sizes() == weight.sizes(), "grad_weff must have the shape of weight");
  TORCH_CHECK(grad_weff.scalar_type() == weight.scalar_type(),
              "grad_weff must have weight's dtype");
  const auto g = grad_weff.contiguous();
  const auto w = weight.contiguous();
  const auto s = scores.contiguous();
  const auto m = mask.contiguous();
  at::Tensor gs = at::empty_like(w, at::MemoryFormat::Contiguous);
  at::Tensor gw = need_weight ? at::empty_like(w, at::MemoryFormat::Contiguous)
                              : at::empty({0}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "weight_grads",
                                  [&] {
    weight_grads<scalar_t>(g, w, s, m, gs, need_weight ? &gw : nullptr, nullptr);
  });
  return {gs, gw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scores, const at::Tensor& mask, std::array<bool, 3> output_mask) {
  check_common(weight, scores, mask);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  const bool need_x = output_mask[0], need_s = output_mask[1], need_w = output_mask[2];
  // a gradient not asked for is a fresh empty tensor (outputs must not alias each other)
  auto empty = [&] { return at::empty({0}, weight.options()); };
  const at::Tensor g2 = flatten_rows(grad_y);
  at::Tensor gx = empty(), gs = empty(), gw = empty();
  if (need_s || need_w) {
    at::Tensor g = at::mm(g2.t(), flatten_rows(x));  // G = dL/dW_eff [out, in]
    const auto w = weight.contiguous();
    const auto s = scores.contiguous();
    const auto m = mask.contiguous();
    if (need_w) gw = at::empty_like(w, at::MemoryFormat::Contiguous);
    // without a weight grad, grad_scores overwrites G (same element, read before written)
    gs = need_w ? at::empty_like(w, at::MemoryFormat::Contiguous) : g;
    // with grad_x too, the same pass rebuilds W * M into the reused buffer
    at::Tensor w_eff = need_x ? weight_buffer(w) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "weight_grads",
                                    [&] {
      weight_grads<scalar_t>(g, w, s, m, gs, need_w ? &gw : nullptr,
                             need_x ? &w_eff : nullptr);
    });
    if (need_x) gx = at::mm(g2, w_eff).view(x.sizes());
    if (!need_s) gs = empty();
  } else if (need_x) {
    gx = at::mm(g2, effective_weight(weight, mask)).view(x.sizes());
  }
  return {gx, gs, gw};
}

// The training step's forward: selection, then mask, W_eff and W * sign(S) in one pass, then
// the GEMM. Returns (y, mask, w_eff, w_sign); w_eff and w_sign (pooled buffers) are kept by
// autograd for masked_linear_select_backward, which then reads neither the mask nor S nor W.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_select_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scores, double k,
    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu(), "subkern masked ops (CPU kernel): weight must be on CPU");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  TORCH_CHECK(scores.sizes() == weight.sizes(), "scores must have the shape of weight");
  TORCH_CHECK(scores.scalar_type() == weight.scalar_type(), "scores must have weight's dtype");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
              "x's last dimension must be in_features");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x must have weight's dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor mask = pooled_empty(w.sizes(), w.options().dtype(at::kBool));
  at::Tensor w_eff = pooled_empty(w.sizes(), w.options());
  at::Tensor w_sign = pooled_empty(w.sizes(), w.options());
  topk_mask_apply_into(scores, k, w, mask, w_eff, w_sign);
  return {dense_linear_rows(x, w_eff, bias), mask, w_eff, w_sign};
}

// Backward of masked_linear_select from what its forward kept:
//   gx = grad_y @ w_eff;  G = grad_y^T @ x;  gs = G * w_sign (NaN markers: (G * W) * sign(S));
//   gw = G * M.
// Without a weight grad (edge-popup) gs overwrites G in one pass reading G and w_sign only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_select_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& w_eff,
    const at::Tensor& w_sign, std::array<bool, 3> output_mask) {
  check_common(weight, scores, mask);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  TORCH_CHECK(w_eff.sizes() == weight.sizes() && w_sign.sizes() == weight.sizes() &&
                  w_eff.scalar_type() == weight.scalar_type() &&
                  w_sign.scalar_type() == weight.scalar_type(),
              "w_eff and w_sign must have weight's shape and dtype");
  const bool need_x = output_mask[0], need_s = output_mask[1], need_w = output_mask[2];
  auto empty = [&] { return at::empty({0}, weight.options()); };
  const at::Tensor g2 = flatten_rows(grad_y);
  at::Tensor gx = empty(), gs = empty(), gw = empty();
  if (need_x) {
    gx = pooled_empty({g2.size(0), w_eff.size(1)}, x.options());
    at::mm_out(gx, g2, w_eff);
    gx = gx.view(x.sizes());
  }
  if (need_s || need_w) {
    at::Tensor g = pooled_empty(weight.sizes(), weight.options());  // G = dL/dW_eff [out, in]
    at::mm_out(g, g2.t(), flatten_rows(x));
    const auto w = weight.contiguous();
    const auto s = scores.contiguous();
    bool done = false;
#if defined(__x86_64__)
    const auto ws = w_sign.contiguous();
    if (need_s && !need_w && fast_f32({&g, &ws, &w, &s})) {
      const float* pws = ws.const_data_ptr<float>();
      const float* pw = w.const_data_ptr<float>();
      const float* ps = s.const_data_ptr<float>();
      float* pg = g.data_ptr<float>();
      parallel_chunks(g.numel(), [&](int64_t i0, int64_t i1) {
        signed_grads_f32(pg + i0, pws + i0, pw + i0, ps + i0, pg + i0, i1 - i0);
      });
      gs = g;
      done = true;
    }
#endif
    if (!done) {
      const auto m = mask.contiguous();
      if (need_w) gw = at::empty_like(w, at::MemoryFormat::Contiguous);
      gs = need_w ? at::empty_like(w, at::MemoryFormat::Contiguous) : g;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                      "weight_grads", [&] {
        weight_grads<scalar_t>(g, w, s, m, gs, need_w ? &gw : nullptr, nullptr);
      });
    }
    if (!need_s) gs = empty();
  }
  return {gx, gs, gw};
}

}  // namespace
}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("masked_linear_select", &subkern::cpu::masked_linear_select_cpu);
  m.impl("masked_linear_select_backward", &subkern::cpu::masked_linear_select_backward_cpu);
  m.impl("masked_linear_with_mask", &subkern::cpu::masked_linear_with_mask_cpu);
  m.impl("masked_linear_backward", &subkern::cpu::masked_linear_backward_cpu);
  m.impl("masked_weight_grads", &subkern::cpu::masked_weight_grads_cpu);
}
