// CUDA kernel of subkern::ternary_linear for the torch dispatcher (schema: subkern/ops/ternary.py).
//
// Checks the inputs, converts x (float32/bfloat16/float16) and bias to contiguous float32,
// allocates the output with torch (caching allocator, current stream) and calls the torch-free
// launcher of csrc/cuda/ternary.cu; returns x's dtype. The int64 bit words are read as pairs of
// little-endian 32-bit words (the same storage). Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "cuda/ternary.cuh"

namespace {

void check_bits(const at::Tensor& bits, const at::Tensor& x, const char* name, int64_t out,
                int64_t words64) {
  TORCH_CHECK(bits.is_cuda() && bits.device() == x.device(), "subkern::ternary_linear (CUDA): ",
              name, " must be on x's device ", x.device(), ", got ", bits.device());
  TORCH_CHECK(bits.scalar_type() == at::kLong, "subkern::ternary_linear: ", name,
              " must be int64 words, got ", bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2 && bits.size(1) == words64 && (out < 0 || bits.size(0) == out),
              "subkern::ternary_linear: ", name, " must be [out_features, ", words64, "], got ",
              bits.sizes());
}

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& mask_bits,
                               const at::Tensor& sign_bits, double scale, int64_t in_features,
                               const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "subkern::ternary_linear (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && in_features >= 0 && x.size(1) == in_features,
              "subkern::ternary_linear: x must be [batch, ", in_features, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "subkern::ternary_linear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  const int64_t words64 = (in_features + 63) / 64;
  check_bits(mask_bits, x, "mask_bits", -1, words64);
  const int64_t out = mask_bits.size(0);
  check_bits(sign_bits, x, "sign_bits", out, words64);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == out,
                "subkern::ternary_linear: bias must be [", out, "] on x's device, got ",
                bias->sizes(), " on ", bias->device());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor mc = mask_bits.contiguous();
  const at::Tensor sc = sign_bits.contiguous();
  at::Tensor y = at::empty({x.size(0), out}, xf.options());
  const cudaError_t err = subkern::cuda::ternary_linear_launch(
      xf.data_ptr<float>(), reinterpret_cast<const uint32_t*>(mc.data_ptr<int64_t>()),
      reinterpret_cast<const uint32_t*>(sc.data_ptr<int64_t>()),
      bias_f.defined() ? bias_f.data_ptr<float>() : nullptr, static_cast<float>(scale),
      x.size(0), out, in_features, 2 * words64, y.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "subkern (CUDA): the ternary_linear kernel failed to launch: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(subkern, CUDA, m) { m.impl("ternary_linear", &ternary_linear_cuda); }
