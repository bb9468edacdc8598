// CUDA kernel of subkern::ternary_linear (see ternary.cuh for the layout and the math).
//
// One warp computes one output row o for kTernaryBatchTile batch rows. It walks the row's 32-bit
// words in order; for word w, lane j owns column 32 w + j: it reads both words (the same address
// for the whole warp: one broadcast transaction), extracts its weight t = M - (M & ~S) * 2 in
// {-1, 0, +1} from bit j, and adds t * x[b, 32 w + j] for each batch row b (32 consecutive floats
// per batch row: one coalesced 128-byte load). The lanes' partial sums are reduced with warp
// shuffles and lane 0 writes scale * sum + bias. The weight is never expanded in memory.
#include "cuda/ternary.cuh"

namespace subkern {
namespace cuda {
namespace {

__global__ void ternary_linear_kernel(const float* __restrict__ x,
                                      const uint32_t* __restrict__ mask_bits,
                                      const uint32_t* __restrict__ sign_bits,
                                      const float* __restrict__ bias, float scale, int64_t batch,
                                      int64_t out, int64_t in, int64_t nwords32,
                                      float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kTernaryRowsPerBlock + (threadIdx.x >> 5);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kTernaryBatchTile;
  if (o >= out) return;  // whole warps leave together
  const int nb = static_cast<int>(batch - b0 < kTernaryBatchTile ? batch - b0
                                                                  : kTernaryBatchTile);
  float acc[kTernaryBatchTile];
#pragma unroll
  for (int b = 0; b < kTernaryBatchTile; ++b) acc[b] = 0.f;
  const uint32_t* mrow = mask_bits + o * nwords32;
  const uint32_t* srow = sign_bits + o * nwords32;
  for (int64_t w = 0; w < nwords32; ++w) {
    const int64_t col = 32 * w + lane;
    if (col >= in) break;  // columns only grow with w
    const uint32_t m = (__ldg(mrow + w) >> lane) & 1u;
    const uint32_t s = (__ldg(srow + w) >> lane) & 1u;
    const float t = m ? (s ? 1.f : -1.f) : 0.f;
#pragma unroll
    for (int b = 0; b < kTernaryBatchTile; ++b) {
      if (b < nb) acc[b] += t * __ldg(x + (b0 + b) * in + col);
    }
  }
#pragma unroll
  for (int b = 0; b < kTernaryBatchTile; ++b) {
    float v = acc[b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0 && b < nb) {
      y[(b0 + b) * out + o] = scale * v + (bias != nullptr ? bias[o] : 0.f);
    }
  }
}

}  // namespace

cudaError_t ternary_linear_launch(const float* x, const uint32_t* mask_bits,
                                  const uint32_t* sign_bits, const float* bias, float scale,
                                  int64_t batch, int64_t out, int64_t in, int64_t nwords32,
                                  float* y, cudaStream_t stream) {
  if (batch <= 0 || out <= 0) return cudaSuccess;
  const int64_t row_blocks = (out + kTernaryRowsPerBlock - 1) / kTernaryRowsPerBlock;
  if (row_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // gridDim.y is at most 65535: launch chunks of batch rows.
  constexpr int64_t kMaxBatchBlocks = 65535;
  const dim3 block(32 * kTernaryRowsPerBlock);
  for (int64_t start = 0; start < batch; start += kMaxBatchBlocks * kTernaryBatchTile) {
    const int64_t rows = batch - start < kMaxBatchBlocks * kTernaryBatchTile
                             ? batch - start
                             : kMaxBatchBlocks * kTernaryBatchTile;
    const dim3 grid(static_cast<unsigned>(row_blocks),
                    static_cast<unsigned>((rows + kTernaryBatchTile - 1) / kTernaryBatchTile));
    ternary_linear_kernel<<<grid, block, 0, stream>>>(x + start * in, mask_bits, sign_bits, bias,
                                                      scale, rows, out, in, nwords32,
                                                      y + start * out);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace subkern
