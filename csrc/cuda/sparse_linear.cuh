// CUDA kernel of subkern::csr_linear for the memory-bound small-batch case:
//
//   y[b, o] = sum_{j = row_ptr[o]}^{row_ptr[o+1] - 1} values[j] * x[b, col_idx[j]]  (+ bias[o])
//
// Torch-free on purpose (raw pointers, sizes, a cudaStream_t): nvcc compiles it on any machine
// (tests/test_cuda_compile.py) and csrc/cuda/sparse_linear_bindings.cpp adapts it to torch.
//
// Format (subkern/ops/sparse_linear.py): row_ptr int64 [out + 1]; col_idx [nnz] unsigned 16-bit
// (the int16 storage read as uint16) or int32; values [nnz] float32, bfloat16 or float16 (raw
// 16-bit patterns); x float32 [batch, in] row-major; y float32 [batch, out]; bias float32 [out]
// or null. Columns outside [0, in) are skipped (never read), so a corrupt structure cannot fault.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace subkern {
namespace cuda {

enum class SparseValueType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Batch rows one warp accumulates at a time (registers), and output rows (warps) per block.
constexpr int kSparseBatchTile = 8;
constexpr int kSparseRowsPerBlock = 8;

cudaError_t csr_linear_launch(const float* x, const int64_t* row_ptr, const void* col_idx,
                              bool col16, const void* values, SparseValueType value_type,
                              const float* bias, int64_t batch, int64_t out, int64_t in,
                              float* y, cudaStream_t stream);

// The transposed-activation kernel (batch >= 2): xT [in, ld] holds x transposed, each input
// feature's batch activations contiguous and zero-padded to ld = csr_linear_xt_ld(batch)
// floats; xT 16-byte aligned. One warp per output row and tile of csr_linear_xt_tile(batch)
// batch rows; every lane takes one nonzero at a time and loads the tile's activations of its
// column as float4 vectors (one contiguous run instead of a load per batch row `in` apart).
int64_t csr_linear_xt_tile(int64_t batch);
int64_t csr_linear_xt_ld(int64_t batch);
cudaError_t csr_linear_xt_launch(const float* xT, int64_t ld, const int64_t* row_ptr,
                                 const void* col_idx, bool col16, const void* values,
                                 SparseValueType value_type, const float* bias, int64_t batch,
                                 int64_t out, int64_t in, float* y, cudaStream_t stream);

}  // namespace cuda
}  // namespace subkern
