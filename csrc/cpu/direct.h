// Direct (dispatcher-free) entry points of CPU inference kernels, bound in csrc/_C.cpp.
//
// The deployment modules (subkern.nn.SupermaskLinear, SparseLinear, SparseConv2d) call these
// under no_grad instead of torch.ops.subkern.*: the dispatcher and the autograd key's
// redispatch cost a few microseconds per call, a real share of a 30-60 us layer. Each function is
// the same kernel (and the same argument checks) as the op registered for the CPU key; modules
// still use the op under autograd and torch.compile.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace subkern::cpu {

// subkern::ternary_linear_prepacked (csrc/cpu/ternary_lut.cpp).
at::Tensor direct_ternary_linear_prepacked(const at::Tensor& x, const at::Tensor& packed,
                                           double scale, int64_t in_features,
                                           int64_t out_features,
                                           const std::optional<at::Tensor>& bias);

// subkern::csr_linear (csrc/cpu/sparse_linear.cpp).
at::Tensor direct_csr_linear(const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& values,
                             int64_t in_features, const std::optional<at::Tensor>& bias);

// subkern::csr_matmul (csrc/cpu/sparse_linear.cpp).
at::Tensor direct_csr_matmul(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                             const at::Tensor& values, const at::Tensor& X, int64_t in_features,
                             const std::optional<at::Tensor>& bias, bool relu);

// The permuted-chunk layout of a CSR weight (csrc/cpu/sparse_permuted.cpp): whether this CPU runs
// it, the slot count its cost model picks (0: keep the CSR kernel), the layout, and csr_linear's
// product from it (batch <= 3).
bool csr_permute_supported();
int64_t csr_permute_slots(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                          const at::Tensor& values, int64_t in_features);
std::vector<at::Tensor> csr_permute_pack(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                         const at::Tensor& values, int64_t in_features,
                                         int64_t slots);
at::Tensor direct_csr_linear_permuted(const at::Tensor& x, const at::Tensor& slot_idx,
                                      const at::Tensor& slot_val, const at::Tensor& res_ptr,
                                      const at::Tensor& res_col, const at::Tensor& res_val,
                                      int64_t slots, int64_t in_features, int64_t out_features,
                                      const std::optional<at::Tensor>& bias);

}  // namespace subkern::cpu
