// C++ CPU kernels of STR's soft-threshold ops (schemas are defined in subkern/ops/soft_threshold.py):
//
//   soft_threshold(weight, s) -> W_eff = sign(W) * relu(|W| - g),  g = sigmoid(s)
//   soft_threshold_grads(G, weight, s, need_weight, need_s) -> (grad_weight, grad_s)
//       grad_weight = G * 1[|W| > g];  grad_s = -g (1 - g) * sum(G * sign(W) * 1[|W| > g])
//   soft_threshold_linear(x [..., in], weight [out, in], s, bias?) -> x @ W_eff^T + b
//   soft_threshold_linear_backward(grad_y, x, weight, s, output_mask) -> (gx, gw, gs)
//       G = grad_y^T @ x;  gx = grad_y @ W_eff;  gw, gs as soft_threshold_grads
//
// s holds one threshold per layer (one element) or one per output channel (row of the weight
// seen as [out, rest]); the threshold math runs in float (double for double weights) and W_eff
// is rounded once to the weight's dtype, as the reference.
//
// Design
// ------
// * Everything is row-structured ([out, rest]: a row shares one threshold), and the passes run
//   over blocks of rows on ATen's intra-op (OpenMP) thread pool, reached through a 1-D
//   TensorIterator (for_each is compiled inside libtorch, so no -fopenmp here). These are the
//   threads the GEMMs just used; std::thread workers (csrc/cpu/parallel.h's run_tasks) measured
//   3-4x slower for the same kind of pass in masked_linear.cpp because they compete with the
//   OpenMP workers that keep spinning after each GEMM.
// * Forward: W_eff is built in one pass into a thread-local buffer reused from call to call (no
//   fresh pages to fault in), then at::addmm / at::mm on its transposed view.
// * Backward: G = grad_y^T @ x is one GEMM; one pass over G and W then writes grad_weight over G
//   in place (same element, read before written), the per-row partial sums of grad_s (eight
//   independent lanes, so the loop vectorises and the result does not depend on the thread
//   count) and, when grad_x is wanted, W_eff again into the reused buffer; grad_x = grad_y @ W_eff
//   is the last GEMM. The backward allocates nothing beyond what dense F.linear's does.
// * A NaN weight gives a NaN W_eff (as sign(W) * relu(NaN) in the reference) and is never kept
//   for the gradients.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace subkern::cpu {
namespace {

// Elements per task of ATen's intra-op thread pool.
constexpr int64_t kGrain = 1 << 15;
constexpr int kLanes = 8;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// fn(begin, end) over row blocks of [0, rows) on ATen's intra-op thread pool: a 1-D
// TensorIterator over a byte per row hands out contiguous chunks of at least `grain` rows.
void parallel_rows(int64_t rows, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (rows <= 0) return;
  if (rows <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    fn(0, rows);
    return;
  }
  at::Tensor ticket = at::empty({rows}, at::TensorOptions().dtype(at::kByte));
  auto iter = at::TensorIteratorConfig()
                  .add_output(ticket)
                  .resize_outputs(false)
                  .check_all_same_dtype(false)
                  .build();
  const char* base = static_cast<const char*>(ticket.data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        for (int64_t j = 0; j < n1; ++j) {
          const int64_t begin = (data[0] + j * strides[1]) - base;
          fn(begin, begin + n0);
        }
      },
      grain);
}

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)); }

// sign(v) * relu(|v| - t): copysign of max(d, 0) (a NaN d stays NaN, as in the reference).
template <typename A>
inline A soft(A v, A t) {
  const A d = std::abs(v) - t;
  return std::copysign(d <= A(0) ? A(0) : d, v);
}

// out[r, :] = soft(w[r, :], thr[r * thr_stride]) for rows [r0, r1).
template <typename T>
void build_rows(const T* __restrict w, const acc_t<T>* __restrict thr, int64_t thr_stride,
                T* __restrict out, int64_t cols, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const A t = thr[r * thr_stride];
    const T* wr = w + r * cols;
    T* o = out + r * cols;
    for (int64_t i = 0; i < cols; ++i) o[i] = static_cast<T>(soft(static_cast<A>(wr[i]), t));
  }
}

// One pass over rows [r0, r1) of G and W (which outputs are written is compile-time):
//   gw = keep ? G : 0 (gw may be G itself);  partial[r] = sum(keep ? G * sign(W) : 0);
//   weff = soft(W).   keep = |W| > t.
// A row (a few KB) stays in L1/L2 between the sub-loops, so each of G and W is read from memory
// once. The row sum runs in kLanes independent lanes (vectorisable without reassociating, and
// the same for any thread count).
template <typename T, bool kGW, bool kS, bool kEff>
void grad_rows(const T* g, const T* __restrict w, const acc_t<T>* __restrict thr,
               int64_t thr_stride, T* gw, acc_t<T>* partial, T* __restrict weff, int64_t cols,
               int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const A t = thr[r * thr_stride];
    const T* gr = g + r * cols;
    const T* wr = w + r * cols;
    T* o = kGW ? gw + r * cols : nullptr;
    T* e = kEff ? weff + r * cols : nullptr;
    if constexpr (kEff) {
      for (int64_t i = 0; i < cols; ++i) e[i] = static_cast<T>(soft(static_cast<A>(wr[i]), t));
    }
    if constexpr (kS) {
      // G * sign(W) where kept, as selects between values computed unconditionally (nothing
      // that could trap sits inside a branch, so the compiler if-converts and vectorises)
      auto term = [t](A v, A gv) {
        const A neg = -gv;
        const A signed_g = v < A(0) ? neg : gv;
        return std::abs(v) > t ? signed_g : A(0);
      };
      A lane[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= cols; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          lane[l] += term(static_cast<A>(wr[i + l]), static_cast<A>(gr[i + l]));
        }
      }
      A sum = 0;
      for (; i < cols; ++i) sum += term(static_cast<A>(wr[i]), static_cast<A>(gr[i]));
      for (int l = 0; l < kLanes; ++l) sum += lane[l];
      partial[r] = sum;
    }
    if constexpr (kGW) {  // after the sum: o may be G itself
      for (int64_t i = 0; i < cols; ++i) {
        const T graw = gr[i];
        o[i] = std::abs(static_cast<A>(wr[i])) > t ? graw : T(0);
      }
    }
  }
}

at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_weight_s(const at::Tensor& weight, const at::Tensor& s) {
  TORCH_CHECK(weight.device().is_cpu() && s.device().is_cpu(),
              "subkern soft_threshold ops (CPU kernel): weight and s must be on CPU");
  TORCH_CHECK(weight.dim() >= 1, "weight must have at least one dimension");
  TORCH_CHECK(s.scalar_type() == weight.scalar_type() || s.scalar_type() == at::kFloat,
              "s must have the weight's dtype or float32");
  TORCH_CHECK(s.numel() == 1 || (s.dim() >= 1 && s.numel() == weight.size(0) &&
                                 s.size(0) == weight.size(0)),
              "s must have one element or out_channels elements");
}

// sigmoid(s) in the compute dtype, flattened; stride 0 (per layer) or 1 (per channel).
std::pair<at::Tensor, int64_t> thresholds(const at::Tensor& weight, const at::Tensor& s) {
  at::Tensor thr = at::sigmoid(s.to(compute_type(weight.scalar_type()))).reshape({-1})
                       .contiguous();
  return {thr, s.numel() == 1 ? 0 : 1};
}

int64_t cols_of(const at::Tensor& w) { return w.size(0) == 0 ? 0 : w.numel() / w.size(0); }

// Thread-local reusable buffer shaped as w (valid until this thread's next call; nothing
// returned to the caller aliases it).
at::Tensor weight_buffer(const at::Tensor& w) {
  thread_local at::Tensor buffer;
  const int64_t n = w.numel();
  if (!buffer.defined() || buffer.scalar_type() != w.scalar_type() || buffer.numel() < n) {
    buffer = at::empty({n}, w.options());
  }
  return buffer.narrow(0, 0, n).view(w.sizes());
}

void build_into(const at::Tensor& w, const at::Tensor& s, at::Tensor& out) {
  auto [thr, ts] = thresholds(w, s);
  const int64_t rows = w.size(0), cols = cols_of(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_threshold",
                                  [&] {
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const auto* pt = thr.const_data_ptr<acc_t<scalar_t>>();
    scalar_t* po = out.data_ptr<scalar_t>();
    parallel_rows(rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      build_rows<scalar_t>(pw, pt, ts, po, cols, r0, r1);
    });
  });
}

// One fused pass: gw (may alias g) and/or the per-row partial sums, and/or W_eff.
at::Tensor grad_pass(const at::Tensor& g, const at::Tensor& w, const at::Tensor& s,
                     at::Tensor* gw, bool need_s, at::Tensor* weff) {
  auto [thr, ts] = thresholds(w, s);
  const int64_t rows = w.size(0), cols = cols_of(w);
  at::Tensor partial =
      need_s ? at::empty({rows}, w.options().dtype(thr.scalar_type())) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "soft_threshold_grads",
                                  [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* pw = w.const_data_ptr<scalar_t>();
    const A* pt = thr.const_data_ptr<A>();
    scalar_t* pgw = gw != nullptr ? gw->data_ptr<scalar_t>() : nullptr;
    A* pp = need_s ? partial.data_ptr<A>() : nullptr;
    scalar_t* pe = weff != nullptr ? weff->data_ptr<scalar_t>() : nullptr;
    // the 7 combinations of (gw, partial sums, W_eff) as separate loops
    auto run = [&](auto gw_flag, auto s_flag, auto eff_flag) {
      parallel_rows(rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
        grad_rows<scalar_t, decltype(gw_flag)::value, decltype(s_flag)::value,
                  decltype(eff_flag)::value>(pg, pw, pt, ts, pgw, pp, pe, cols, r0, r1);
      });
    };
    using Y = std::true_type;
    using N = std::false_type;
    const int which = (pgw != nullptr ? 4 : 0) | (pp != nullptr ? 2 : 0) | (pe != nullptr ? 1 : 0);
    switch (which) {
      case 7: run(Y{}, Y{}, Y{}); break;
      case 6: run(Y{}, Y{}, N{}); break;
      case 5: run(Y{}, N{}, Y{}); break;
      case 4: run(Y{}, N{}, N{}); break;
      case 3: run(N{}, Y{}, Y{}); break;
      case 2: run(N{}, Y{}, N{}); break;
      case 1: run(N{}, N{}, Y{}); break;
      default: break;
    }
  });
  if (!need_s) return at::Tensor();
  // grad_s = -(sum) * g (1 - g), summed over the layer for a per-layer s
  at::Tensor total = s.numel() == 1 ? partial.sum().reshape({1}) : partial;
  at::Tensor gs = total.neg().mul_(thr * (1 - thr));
  return gs.to(s.scalar_type()).reshape(s.sizes());
}

at::Tensor soft_threshold_cpu(const at::Tensor& weight, const at::Tensor& s) {
  check_weight_s(weight, s);
  const auto w = weight.contiguous();
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  build_into(w, s, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> soft_threshold_grads_cpu(const at::Tensor& grad_weff,
                                                            const at::Tensor& weight,
                                                            const at::Tensor& s,
                                                            bool need_weight, bool need_s) {
  check_weight_s(weight, s);
  TORCH_CHECK(grad_weff.sizes() == weight.sizes(), "grad_weff must have the shape of weight");
  TORCH_CHECK(grad_weff.scalar_type() == weight.scalar_type(),
              "grad_weff must have the weight's dtype");
  const auto g = grad_weff.contiguous();
  const auto w = weight.contiguous();
  at::Tensor gw = need_weight ? at::empty_like(w, at::MemoryFormat::Contiguous)
                              : at::empty({0}, w.options());
  at::Tensor gs = at::empty({0}, s.options());
  if (need_weight || need_s) {
    at::Tensor got = grad_pass(g, w, s, need_weight ? &gw : nullptr, need_s, nullptr);
    if (need_s) gs = got;
  }
  return {gw, gs};
}

at::Tensor soft_threshold_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& s, const std::optional<at::Tensor>& bias) {
  check_weight_s(weight, s);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
              "x's last dimension must be in_features");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x must have the weight's dtype");
  const auto w = weight.contiguous();
  at::Tensor w_eff = weight_buffer(w);
  build_into(w, s, w_eff);
  return dense_linear_rows(x, w_eff, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_threshold_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& s,
    std::array<bool, 3> output_mask) {
  check_weight_s(weight, s);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [out_features, in_features]");
  const bool need_x = output_mask[0], need_w = output_mask[1], need_s = output_mask[2];
  // a gradient not asked for is a fresh empty tensor (outputs must not alias each other)
  at::Tensor gx = at::empty({0}, x.options());
  at::Tensor gw = at::empty({0}, weight.options());
  at::Tensor gs = at::empty({0}, s.options());
  const at::Tensor g2 = flatten_rows(grad_y);
  const auto w = weight.contiguous();
  at::Tensor w_eff = need_x ? weight_buffer(w) : at::Tensor();
  if (need_w || need_s) {
    at::Tensor g = at::mm(g2.t(), flatten_rows(x)).contiguous();  // G = dL/dW_eff [out, in]
    // grad_weight is written over G (each element read before it is written)
    at::Tensor got = grad_pass(g, w, s, need_w ? &g : nullptr, need_s, need_x ? &w_eff : nullptr);
    if (need_w) gw = g;
    if (need_s) gs = got;
  } else if (need_x) {
    build_into(w, s, w_eff);
  }
  if (need_x) gx = at::mm(g2, w_eff).view(x.sizes());
  return {gx, gw, gs};
}

}  // namespace
}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("soft_threshold", &subkern::cpu::soft_threshold_cpu);
  m.impl("soft_threshold_grads", &subkern::cpu::soft_threshold_grads_cpu);
  m.impl("soft_threshold_linear", &subkern::cpu::soft_threshold_linear_cpu);
  m.impl("soft_threshold_linear_backward", &subkern::cpu::soft_threshold_linear_backward_cpu);
}
