// Small helpers shared by the CPU linear kernels (csrc/cpu/*.cpp): the checks of a 2-D float
// activation and of the optional bias, the output when there is nothing to reduce over, row
// flattening, the dense y = x @ W_eff^T (+ b) epilogue, the thread count for an amount of work,
// and a portable count-trailing-zeros.
//
// Everything is inline in namespace subkern::cpu and compiled for the generic baseline (callable
// from functions with a wider __attribute__((target(...)))).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace subkern::cpu {

// Index of the lowest set bit of v (v != 0).
inline int ctz64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctzll(v);
#else
  int n = 0;
  while (!(v & 1)) { v >>= 1; ++n; }
  return n;
#endif
}

// x must be a CPU tensor of shape [batch, in_features] in float32, bfloat16 or float16; the
// messages name the op `op`.
inline void check_float_input_2d(const at::Tensor& x, int64_t in_features, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, " (CPU): x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [batch, in_features], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(in_features >= 0 && x.size(1) == in_features, op, ": x has ", x.size(1),
              " columns but in_features is ", in_features);
}

// The optional bias, checked to be a floating CPU tensor of shape [out], as a contiguous float32 tensor
// (an undefined tensor when there is none).
inline at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t out, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == out, op,
              ": bias must be a CPU tensor of shape [", out, "], got ", bias->sizes());
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()), op, ": bias must be floating point, got ",
              bias->scalar_type());
  return bias->to(at::kFloat).contiguous();
}

// y [B, out] of a product with no inputs (an empty reduction): every row is the bias, or zero.
inline void fill_bias_rows(at::Tensor& y, const at::Tensor& bias_f) {
  if (bias_f.defined()) {
    y.copy_(bias_f.unsqueeze(0).expand({y.size(0), y.size(1)}));
  } else {
    y.zero_();
  }
}

// t viewed as [prod(leading dims), last dim].
inline at::Tensor flatten_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)});
}

// y = x @ w_eff^T (+ bias) over x's last dimension, shaped x.shape[:-1] + [out_features]
// (one at::addmm / at::mm on w_eff's transposed view).
inline at::Tensor dense_linear_rows(const at::Tensor& x, const at::Tensor& w_eff,
                                    const std::optional<at::Tensor>& bias) {
  const int64_t out_features = w_eff.size(0);
  const at::Tensor x2 = flatten_rows(x);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "bias must be [out_features]");
    y = at::addmm(*bias, x2, w_eff.t());
  } else {
    y = at::mm(x2, w_eff.t());
  }
  return y.view(out_shape);
}

// Threads for `work` units split into `tasks` tasks: at most torch's intra-op thread count, at
// most `tasks`, and one per `min_work_per_thread` units (at least 1).
inline int64_t threads_for_work(double work, int64_t min_work_per_thread, int64_t tasks) {
  const int64_t requested = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_work = std::max<int64_t>(
      1, static_cast<int64_t>(work / static_cast<double>(min_work_per_thread)));
  return std::min({requested, by_work, tasks});
}

}  // namespace subkern::cpu
