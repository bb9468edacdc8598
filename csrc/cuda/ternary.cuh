// CUDA kernel of subkern::ternary_linear: y = scale * x @ (M * (2 S - 1))^T + bias from packed bits.
//
// Torch-free on purpose (raw pointers, sizes, a cudaStream_t): nvcc compiles it on any machine
// (tests/test_cuda_compile.py) and csrc/cuda/ternary_bindings.cpp adapts it to torch.
//
// Layout (subkern/ops/ternary.py): mask and sign bits are [out, nwords32] 32-bit words (the int64
// words of the Python side read as pairs of little-endian 32-bit words): bit i of row o is bit
// i % 32 of word i / 32. x is float32 [batch, in] row-major, y float32 [batch, out], bias float32
// [out] or null. Bits past `in` are ignored.
//
// y[b, o] = scale * sum_i M[o, i] * (S[o, i] ? +x[b, i] : -x[b, i]) + bias[o]
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace subkern {
namespace cuda {

// Batch rows one block computes (its accumulators live in registers).
constexpr int kTernaryBatchTile = 8;
// Output rows per block (one warp each).
constexpr int kTernaryRowsPerBlock = 8;

cudaError_t ternary_linear_launch(const float* x, const uint32_t* mask_bits,
                                  const uint32_t* sign_bits, const float* bias, float scale,
                                  int64_t batch, int64_t out, int64_t in, int64_t nwords32,
                                  float* y, cudaStream_t stream);

}  // namespace cuda
}  // namespace subkern
