// CUDA kernel of subkern::csr_linear (see sparse_linear.cuh for the format and the math).
//
// One warp per output row and tile of kSparseBatchTile batch rows. The warp walks the row's
// nonzeros 64 at a time: lane l loads the index and value pairs j = 2 l, 2 l + 1 of the chunk with
// one vectorised load each (ushort2 / int2 indices, float2 / 32-bit pairs of bf16/fp16 values)
// when the chunk start is aligned, else element by element; every lane then adds v * x[b, col]
// for each batch row of the tile (x rows are small and stay in L1/L2; the weight is streamed
// once per batch tile). Lanes' partial sums are reduced with warp shuffles and lane 0 writes the
// sum + bias. bf16 values widen with a shift (exact), fp16 with __half2float.
//
// The transposed-activation kernel (csr_linear_xt_*, batch >= 2 by default) reads x as xT
// [in, ld]: a nonzero's batch activations are one contiguous float4 run (BT / 4 loads covering
// BT / 8 sectors) where the row-warp kernel issues BT loads `in` floats apart, a sector each
// (batch 16 at 95 % sparsity on an H100: 66.5 us, 0.70x cuBLAS bf16, with the row-warp kernel).
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/sparse_linear.cuh"

namespace subkern {
namespace cuda {
namespace {

// A 16-bit value pattern (bf16 or fp16) as float.
template <SparseValueType V>
__device__ __forceinline__ float widen(unsigned short u) {
  if constexpr (V == SparseValueType::kBFloat16) {
    return __uint_as_float(static_cast<unsigned>(u) << 16);
  } else {
    return __half2float(__ushort_as_half(u));
  }
}

template <SparseValueType V>
__device__ __forceinline__ float value_at(const void* values, int64_t j) {
  if constexpr (V == SparseValueType::kFloat32) {
    return __ldg(static_cast<const float*>(values) + j);
  } else {
    return widen<V>(__ldg(static_cast<const unsigned short*>(values) + j));
  }
}

template <bool COL16>
__device__ __forceinline__ int64_t col_at(const void* cols, int64_t j) {
  if constexpr (COL16) {
    return static_cast<int64_t>(__ldg(static_cast<const unsigned short*>(cols) + j));
  } else {
    return static_cast<int64_t>(__ldg(static_cast<const int*>(cols) + j));
  }
}

// The warp's per-lane partial sums of output row o for BT batch rows: summed across the warp,
// lane 0 stores y[b0 + b, o] (+ bias[o]) for the nb batch rows that exist.
template <int BT>
__device__ __forceinline__ void warp_sums_to_rows(const float (&acc)[BT], int lane, int nb,
                                                  int64_t b0, int64_t o, int64_t out,
                                                  const float* __restrict__ bias,
                                                  float* __restrict__ y) {
  const float bo = bias != nullptr ? bias[o] : 0.f;
#pragma unroll
  for (int b = 0; b < BT; ++b) {
    float s = acc[b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0 && b < nb) y[(b0 + b) * out + o] = s + bo;
  }
}

template <bool COL16, SparseValueType V>
__global__ void csr_linear_kernel(const float* __restrict__ x, const int64_t* __restrict__ row_ptr,
                                  const void* __restrict__ cols, const void* __restrict__ values,
                                  const float* __restrict__ bias, int64_t batch, int64_t out,
                                  int64_t in, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kSparseRowsPerBlock + (threadIdx.x >> 5);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kSparseBatchTile;
  if (o >= out) return;  // whole warps leave together
  const int nb = static_cast<int>(batch - b0 < kSparseBatchTile ? batch - b0 : kSparseBatchTile);
  float acc[kSparseBatchTile];
#pragma unroll
  for (int b = 0; b < kSparseBatchTile; ++b) acc[b] = 0.f;
  const int64_t start = __ldg(row_ptr + o), end = __ldg(row_ptr + o + 1);
  const float* xb = x + b0 * in;
  // pair loads need 8-byte aligned bases (a view with an odd storage offset falls back)
  const bool base_aligned = (reinterpret_cast<uintptr_t>(cols) % 8) == 0 &&
                            (reinterpret_cast<uintptr_t>(values) % 8) == 0;
  for (int64_t j0 = start; j0 < end; j0 += 64) {
    // two consecutive nonzeros per lane: coalesced 4-byte (16-bit pairs) or 8-byte loads
    int64_t c[2];
    float v[2];
    const int64_t j = j0 + 2 * lane;
    const bool aligned = base_aligned && (j0 % 2) == 0 && j + 1 < end;
    if (aligned && COL16) {
      const ushort2 cc = __ldg(reinterpret_cast<const ushort2*>(
          static_cast<const unsigned short*>(cols) + j));
      c[0] = cc.x;
      c[1] = cc.y;
    } else if (aligned) {
      const int2 cc = __ldg(reinterpret_cast<const int2*>(static_cast<const int*>(cols) + j));
      c[0] = cc.x;
      c[1] = cc.y;
    } else {
      c[0] = j < end ? col_at<COL16>(cols, j) : -1;
      c[1] = j + 1 < end ? col_at<COL16>(cols, j + 1) : -1;
    }
    if constexpr (V == SparseValueType::kFloat32) {
      if (aligned) {
        const float2 vv =
            __ldg(reinterpret_cast<const float2*>(static_cast<const float*>(values) + j));
        v[0] = vv.x;
        v[1] = vv.y;
      }
    } else {
      if (aligned) {  // the pair of 16-bit values in one 4-byte load
        const ushort2 vv = __ldg(reinterpret_cast<const ushort2*>(
            static_cast<const unsigned short*>(values) + j));
        v[0] = widen<V>(vv.x);
        v[1] = widen<V>(vv.y);
      }
    }
    if (!aligned) {
      v[0] = j < end ? value_at<V>(values, j) : 0.f;
      v[1] = j + 1 < end ? value_at<V>(values, j + 1) : 0.f;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (c[h] < 0 || c[h] >= in) continue;  // past the row, or a corrupt index: never read
#pragma unroll
      for (int b = 0; b < kSparseBatchTile; ++b) {
        if (b < nb) acc[b] += v[h] * __ldg(xb + b * in + c[h]);
      }
    }
  }
  warp_sums_to_rows<kSparseBatchTile>(acc, lane, nb, b0, o, out, bias, y);
}

// Transposed-activation variant: lane l takes nonzeros start + l, start + l + 32, ...; the BT
// activations of a nonzero's column are BT / 4 float4 loads from xT (a contiguous, 16-byte
// aligned run: ld and the tile start are multiples of 4).
template <bool COL16, SparseValueType V, int BT>
__global__ void csr_linear_xt_kernel(const float* __restrict__ xT, int64_t ld,
                                     const int64_t* __restrict__ row_ptr,
                                     const void* __restrict__ cols,
                                     const void* __restrict__ values,
                                     const float* __restrict__ bias, int64_t batch, int64_t out,
                                     int64_t in, float* __restrict__ y) {
  static_assert(BT % 4 == 0, "whole float4 vectors");
  const int lane = threadIdx.x & 31;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kSparseRowsPerBlock + (threadIdx.x >> 5);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  if (o >= out) return;  // whole warps leave together
  const int nb = static_cast<int>(batch - b0 < BT ? batch - b0 : BT);
  float acc[BT];
#pragma unroll
  for (int b = 0; b < BT; ++b) acc[b] = 0.f;
  const int64_t start = __ldg(row_ptr + o), end = __ldg(row_ptr + o + 1);
  const float* xb = xT + b0;
  for (int64_t j = start + lane; j < end; j += 32) {
    const int64_t c = col_at<COL16>(cols, j);
    if (c < 0 || c >= in) continue;  // a corrupt index: never read
    const float v = value_at<V>(values, j);
    const float4* xr = reinterpret_cast<const float4*>(xb + c * ld);
#pragma unroll
    for (int q = 0; q < BT / 4; ++q) {
      const float4 xv = __ldg(xr + q);
      acc[4 * q] += v * xv.x;
      acc[4 * q + 1] += v * xv.y;
      acc[4 * q + 2] += v * xv.z;
      acc[4 * q + 3] += v * xv.w;
    }
  }
  warp_sums_to_rows<BT>(acc, lane, nb, b0, o, out, bias, y);
}

// Grids of kSparseRowsPerBlock warps per block over the output rows and `tile` batch rows per
// blockIdx.y, in chunks of at most 65535 batch tiles (the gridDim.y limit): launch(s, rows, grid,
// block) launches batch rows [s, s + rows).
template <typename Launch>
cudaError_t launch_batch_chunks(int64_t batch, int64_t out, int64_t tile, const Launch& launch) {
  const int64_t row_blocks = (out + kSparseRowsPerBlock - 1) / kSparseRowsPerBlock;
  if (row_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const int64_t chunk = int64_t(65535) * tile;
  const dim3 block(32 * kSparseRowsPerBlock);
  for (int64_t s = 0; s < batch; s += chunk) {
    const int64_t rows = batch - s < chunk ? batch - s : chunk;
    const dim3 grid(static_cast<unsigned>(row_blocks),
                    static_cast<unsigned>((rows + tile - 1) / tile));
    launch(s, rows, grid, block);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <bool COL16, SparseValueType V, int BT>
cudaError_t launch_xt_typed(const float* xT, int64_t ld, const int64_t* row_ptr, const void* cols,
                            const void* values, const float* bias, int64_t batch, int64_t out,
                            int64_t in, float* y, cudaStream_t stream) {
  return launch_batch_chunks(batch, out, BT, [&](int64_t s, int64_t rows, dim3 grid, dim3 block) {
    csr_linear_xt_kernel<COL16, V, BT><<<grid, block, 0, stream>>>(
        xT + s, ld, row_ptr, cols, values, bias, rows, out, in, y + s * out);
  });
}

template <bool COL16, SparseValueType V>
cudaError_t launch_xt_tile(const float* xT, int64_t ld, const int64_t* row_ptr, const void* cols,
                           const void* values, const float* bias, int64_t batch, int64_t out,
                           int64_t in, float* y, cudaStream_t stream) {
  switch (csr_linear_xt_tile(batch)) {
    case 4:
      return launch_xt_typed<COL16, V, 4>(xT, ld, row_ptr, cols, values, bias, batch, out, in,
                                          y, stream);
    case 8:
      return launch_xt_typed<COL16, V, 8>(xT, ld, row_ptr, cols, values, bias, batch, out, in,
                                          y, stream);
    default:
      return launch_xt_typed<COL16, V, 16>(xT, ld, row_ptr, cols, values, bias, batch, out, in,
                                           y, stream);
  }
}

template <bool COL16, SparseValueType V>
cudaError_t launch_typed(const float* x, const int64_t* row_ptr, const void* cols,
                         const void* values, const float* bias, int64_t batch, int64_t out,
                         int64_t in, float* y, cudaStream_t stream) {
  return launch_batch_chunks(batch, out, kSparseBatchTile,
                             [&](int64_t s, int64_t rows, dim3 grid, dim3 block) {
    csr_linear_kernel<COL16, V><<<grid, block, 0, stream>>>(x + s * in, row_ptr, cols, values,
                                                            bias, rows, out, in, y + s * out);
  });
}

template <bool COL16>
cudaError_t launch_values(const float* x, const int64_t* row_ptr, const void* cols,
                          const void* values, SparseValueType vt, const float* bias,
                          int64_t batch, int64_t out, int64_t in, float* y, cudaStream_t stream) {
  switch (vt) {
    case SparseValueType::kFloat32:
      return launch_typed<COL16, SparseValueType::kFloat32>(x, row_ptr, cols, values, bias,
                                                            batch, out, in, y, stream);
    case SparseValueType::kBFloat16:
      return launch_typed<COL16, SparseValueType::kBFloat16>(x, row_ptr, cols, values, bias,
                                                             batch, out, in, y, stream);
    case SparseValueType::kFloat16:
      return launch_typed<COL16, SparseValueType::kFloat16>(x, row_ptr, cols, values, bias,
                                                            batch, out, in, y, stream);
  }
  return cudaErrorInvalidValue;
}

template <bool COL16>
cudaError_t launch_xt_values(const float* xT, int64_t ld, const int64_t* row_ptr,
                             const void* cols, const void* values, SparseValueType vt,
                             const float* bias, int64_t batch, int64_t out, int64_t in, float* y,
                             cudaStream_t stream) {
  switch (vt) {
    case SparseValueType::kFloat32:
      return launch_xt_tile<COL16, SparseValueType::kFloat32>(xT, ld, row_ptr, cols, values,
                                                              bias, batch, out, in, y, stream);
    case SparseValueType::kBFloat16:
      return launch_xt_tile<COL16, SparseValueType::kBFloat16>(xT, ld, row_ptr, cols, values,
                                                               bias, batch, out, in, y, stream);
    case SparseValueType::kFloat16:
      return launch_xt_tile<COL16, SparseValueType::kFloat16>(xT, ld, row_ptr, cols, values,
                                                              bias, batch, out, in, y, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t csr_linear_xt_tile(int64_t batch) { return batch <= 4 ? 4 : batch <= 8 ? 8 : 16; }

int64_t csr_linear_xt_ld(int64_t batch) {
  const int64_t tile = csr_linear_xt_tile(batch);
  return (batch + tile - 1) / tile * tile;
}

cudaError_t csr_linear_xt_launch(const float* xT, int64_t ld, const int64_t* row_ptr,
                                 const void* col_idx, bool col16, const void* values,
                                 SparseValueType value_type, const float* bias, int64_t batch,
                                 int64_t out, int64_t in, float* y, cudaStream_t stream) {
  if (batch <= 0 || out <= 0) return cudaSuccess;
  // float4 loads: ld a multiple of 4 floats, xT 16-byte aligned, every tile inside a row
  if (ld < csr_linear_xt_ld(batch) || ld % 4 != 0 || reinterpret_cast<uintptr_t>(xT) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  return col16 ? launch_xt_values<true>(xT, ld, row_ptr, col_idx, values, value_type, bias,
                                        batch, out, in, y, stream)
               : launch_xt_values<false>(xT, ld, row_ptr, col_idx, values, value_type, bias,
                                         batch, out, in, y, stream);
}

cudaError_t csr_linear_launch(const float* x, const int64_t* row_ptr, const void* col_idx,
                              bool col16, const void* values, SparseValueType value_type,
                              const float* bias, int64_t batch, int64_t out, int64_t in,
                              float* y, cudaStream_t stream) {
  if (batch <= 0 || out <= 0) return cudaSuccess;
  return col16 ? launch_values<true>(x, row_ptr, col_idx, values, value_type, bias, batch, out,
                                     in, y, stream)
               : launch_values<false>(x, row_ptr, col_idx, values, value_type, bias, batch,
                                      out, in, y, stream);
}

}  // namespace cuda
}  // namespace subkern
