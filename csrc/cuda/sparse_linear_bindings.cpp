// CUDA kernel of subkern::csr_linear for the torch dispatcher (schema and format:
// subkern/ops/sparse_linear.py).
//
// Checks the inputs, converts x (float32/bfloat16/float16) and bias to contiguous float32 (x
// transposed to [in, ld] for the transposed-activation kernel), allocates the output with torch
// (caching allocator, current stream) and calls the torch-free launchers of
// csrc/cuda/sparse_linear.cu; returns x's dtype. The structure (row_ptr monotone,
// columns in range) is not re-validated per call (that would synchronise the device): the kernel
// skips out-of-range columns instead of reading them, and the CPU kernels / the loader validate.
// Compiled only when torch has CUDA.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "cuda/sparse_linear.cuh"

namespace {

using subkern::cuda::SparseValueType;

// Which kernel runs a batch: SUBKERN_CUDA_CSR_KERNEL=warp (the row-warp kernel that loads
// x[b, col] per batch row), xt (the transposed-activation kernel, any batch), or auto (the
// default: xt from batch 2 on, warp at batch 1). Read per call, so benchmarks can time both.
bool use_transposed_kernel(int64_t batch) {
  const char* choice = std::getenv("SUBKERN_CUDA_CSR_KERNEL");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "auto") == 0) return batch >= 2;
  if (std::strcmp(choice, "xt") == 0) return true;
  TORCH_CHECK(std::strcmp(choice, "warp") == 0,
              "SUBKERN_CUDA_CSR_KERNEL must be auto, warp or xt, got '", choice, "'");
  return false;
}

void check_on(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "subkern::csr_linear (CUDA): ", name,
              " must be on x's device ", x.device(), ", got ", t.device());
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const at::Tensor& values,
                           int64_t in_features, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "subkern::csr_linear (CUDA): x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && in_features >= 0 && x.size(1) == in_features,
              "subkern::csr_linear: x must be [batch, ", in_features, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "subkern::csr_linear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  check_on(row_ptr, x, "row_ptr");
  check_on(col_idx, x, "col_idx");
  check_on(values, x, "values");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1,
              "subkern::csr_linear: row_ptr must be int64 [out_features + 1], got ",
              row_ptr.scalar_type(), " ", row_ptr.sizes());
  TORCH_CHECK(values.dim() == 1, "subkern::csr_linear: values must be 1-D [nnz], got ",
              values.sizes());
  SparseValueType vt;
  switch (values.scalar_type()) {
    case at::kFloat: vt = SparseValueType::kFloat32; break;
    case at::kBFloat16: vt = SparseValueType::kBFloat16; break;
    case at::kHalf: vt = SparseValueType::kFloat16; break;
    default:
      TORCH_CHECK(false, "subkern::csr_linear: values must be float32, bfloat16 or float16, got ",
                  values.scalar_type());
  }
  const int64_t nnz = values.size(0);
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.size(0) == nnz,
              "subkern::csr_linear: col_idx must be 1-D [nnz] = [", nnz, "], got ",
              col_idx.sizes());
  const bool col16 = col_idx.scalar_type() == at::kShort;
  TORCH_CHECK(col16 || col_idx.scalar_type() == at::kInt,
              "subkern::csr_linear: col_idx must be int16 or int32, got ", col_idx.scalar_type());
  TORCH_CHECK(!col16 || in_features <= 65536,
              "subkern::csr_linear: int16 col_idx needs in_features <= 65536, got ", in_features);
  const int64_t out = row_ptr.size(0) - 1;
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == out,
                "subkern::csr_linear: bias must be [", out, "] on x's device, got ",
                bias->sizes(), " on ", bias->device());
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous(), va = values.contiguous();
  at::Tensor y = at::empty({x.size(0), out}, xf.options());
  if (nnz == 0 || in_features == 0) {
    if (bias_f.defined()) {
      y.copy_(bias_f.unsqueeze(0).expand({x.size(0), out}));
    } else {
      y.zero_();
    }
  } else {
    const int64_t batch = x.size(0);
    const float* bias_p = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    cudaError_t err;
    if (use_transposed_kernel(batch)) {
      const int64_t ld = subkern::cuda::csr_linear_xt_ld(batch);
      at::Tensor xT = at::zeros({in_features, ld}, xf.options());   // padding read, not used
      xT.narrow(1, 0, batch).copy_(xf.t());
      err = subkern::cuda::csr_linear_xt_launch(xT.data_ptr<float>(), ld,
                                                rp.data_ptr<int64_t>(), ci.data_ptr(), col16,
                                                va.data_ptr(), vt, bias_p, batch, out,
                                                in_features, y.data_ptr<float>(), stream);
    } else {
      err = subkern::cuda::csr_linear_launch(xf.data_ptr<float>(), rp.data_ptr<int64_t>(),
                                             ci.data_ptr(), col16, va.data_ptr(), vt, bias_p,
                                             batch, out, in_features, y.data_ptr<float>(),
                                             stream);
    }
    TORCH_CHECK(err == cudaSuccess, "subkern (CUDA): the csr_linear kernel failed to launch: ",
                cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(subkern, CUDA, m) { m.impl("csr_linear", &csr_linear_cuda); }
