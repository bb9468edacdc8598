// Checks and accessors of a CSR weight (row_ptr int64 [out + 1], col_idx int16 | int32 [nnz],
// values [nnz]) shared by the CPU sparse kernels (csrc/cpu/sparse_linear.cpp,
// csrc/cpu/sparse_permuted.cpp). int16 column indices hold unsigned 16-bit patterns
// (columns 0 .. 65535). Messages name the op `op`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace subkern::cpu {

// Column of nonzero j (col_idx contiguous, int16 read as unsigned, or int32).
inline uint32_t csr_column(const at::Tensor& col_idx, int64_t j) {
  return col_idx.scalar_type() == at::kShort
             ? static_cast<uint32_t>(static_cast<uint16_t>(col_idx.data_ptr<int16_t>()[j]))
             : static_cast<uint32_t>(col_idx.data_ptr<int32_t>()[j]);
}

// row_ptr: a CPU int64 [out + 1] tensor that starts at 0, ends at nnz and never decreases.
inline void check_csr_row_ptr(const at::Tensor& row_ptr, int64_t nnz, const char* op) {
  TORCH_CHECK(row_ptr.device().is_cpu(), op, " (CPU): row_ptr must be a CPU tensor");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.size(0) >= 1,
              op, ": row_ptr must be int64 [out_features + 1], got ", row_ptr.scalar_type(), " ",
              row_ptr.sizes());
  const at::Tensor rp = row_ptr.contiguous();
  const int64_t* p = rp.data_ptr<int64_t>();
  const int64_t out = rp.size(0) - 1;
  TORCH_CHECK(p[0] == 0, op, ": row_ptr[0] must be 0, got ", p[0]);
  TORCH_CHECK(p[out] == nnz, op, ": row_ptr[-1] must equal nnz = ", nnz, ", got ", p[out]);
  for (int64_t o = 0; o < out; ++o) {
    TORCH_CHECK(p[o + 1] >= p[o], op, ": row_ptr must be non-decreasing, but row_ptr[", o + 1,
                "] = ", p[o + 1], " < row_ptr[", o, "] = ", p[o]);
  }
}

// Every column index (col_idx contiguous) below in_features.
inline void check_csr_columns(const at::Tensor& col_idx, int64_t in_features, const char* op) {
  const int64_t nnz = col_idx.numel();
  for (int64_t j = 0; j < nnz; ++j) {
    const uint32_t c = csr_column(col_idx, j);
    TORCH_CHECK(static_cast<int64_t>(c) < in_features, op, ": col_idx holds column ", c,
                " but in_features is ", in_features, " (corrupt sparse weight)");
  }
}

}  // namespace subkern::cpu
