// CUDA kernels of edge-popup's top-k score masking; the algorithm is described in topk_mask.cuh.
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/topk_mask.cuh"

namespace subkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kTopkTile) / kThreads;  // 16 consecutive entries
constexpr int kBins = 1 << kTopkDigitBits;
static_assert(kPerThread * kThreads == kTopkTile, "tile = threads x entries per thread");

// Ranking key of one score (see the header), as uint64 for every dtype.
__device__ __forceinline__ uint64_t key32(float f) {
  const uint32_t b = __float_as_uint(f) & 0x7FFFFFFFu;
  return b <= 0x7F800000u ? static_cast<uint64_t>(b) + 1u : 0u;
}
__device__ __forceinline__ uint64_t key_of(float x) { return key32(x); }
__device__ __forceinline__ uint64_t key_of(__half x) { return key32(__half2float(x)); }
__device__ __forceinline__ uint64_t key_of(__nv_bfloat16 x) { return key32(__bfloat162float(x)); }
__device__ __forceinline__ uint64_t key_of(double x) {
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(x)) & 0x7FFFFFFFFFFFFFFFull;
  return b <= 0x7FF0000000000000ull ? b + 1u : 0u;
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_float<double>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Views of the segment table.
struct Meta {
  const int64_t* m;
  int64_t nseg;
  __device__ const void* scores(int64_t s) const {
    return reinterpret_cast<const void*>(static_cast<uintptr_t>(m[s]));
  }
  __device__ void* out(int64_t s) const {
    return reinterpret_cast<void*>(static_cast<uintptr_t>(m[nseg + s]));
  }
  __device__ int64_t n(int64_t s) const { return m[2 * nseg + s]; }
  __device__ int64_t keep(int64_t s) const { return m[3 * nseg + s]; }
  __device__ int64_t tile_start(int64_t s) const { return m[4 * nseg + s]; }
  // The segment owning global tile t: the last s with tile_start(s) <= t (binary search).
  __device__ int64_t segment_of(int64_t t) const {
    int64_t lo = 0, hi = nseg - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (tile_start(mid) <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    return lo;
  }
};

// The tile this block handles: segment, first entry and entry count.
struct Tile {
  int64_t seg, begin, count;
};

__device__ __forceinline__ Tile tile_of(const Meta& meta, int64_t t) {
  Tile tile;
  tile.seg = meta.segment_of(t);
  tile.begin = (t - meta.tile_start(tile.seg)) * kTopkTile;
  const int64_t left = meta.n(tile.seg) - tile.begin;
  tile.count = left < kTopkTile ? left : kTopkTile;
  return tile;
}

__global__ void init_kernel(Meta meta, int64_t* state) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s < meta.nseg) {
    state[2 * s] = 0;
    state[2 * s + 1] = meta.keep(s);
  }
}

// Histogram of digit (key >> shift) & (kBins - 1) over the tile's entries whose bits >= hi equal
// those of the segment's prefix; added to the segment's global histogram.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hist_kernel(Meta meta, const int64_t* state, unsigned long long* hist, int shift, int hi) {
  __shared__ unsigned int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += kThreads) local[b] = 0;
  __syncthreads();
  const Tile tile = tile_of(meta, blockIdx.x);
  const T* x = static_cast<const T*>(meta.scores(tile.seg)) + tile.begin;
  const uint64_t want = static_cast<uint64_t>(state[2 * tile.seg]) >> hi;
  for (int64_t i = threadIdx.x; i < tile.count; i += kThreads) {
    const uint64_t key = key_of(x[i]);
    if ((key >> hi) == want) {
      atomicAdd(&local[(key >> shift) & (kBins - 1)], 1u);
    }
  }
  __syncthreads();
  unsigned long long* h = hist + tile.seg * kBins;
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (local[b] != 0) atomicAdd(&h[b], static_cast<unsigned long long>(local[b]));
  }
}

// One block per segment: walks the buckets from the top (thread 0), appends T's digit to the
// prefix, updates `remaining`, and clears the histogram for the next pass.
__global__ void pick_kernel(int64_t* state, unsigned long long* hist, int shift) {
  const int64_t s = blockIdx.x;
  unsigned long long* h = hist + s * kBins;
  if (threadIdx.x == 0) {
    const int64_t remaining = state[2 * s + 1];
    int64_t above = 0;
    int digit = 0;
    for (int b = kBins - 1; b >= 0; --b) {
      const int64_t c = static_cast<int64_t>(h[b]);
      if (above + c >= remaining) {
        digit = b;
        break;
      }
      above += c;
    }
    state[2 * s] = static_cast<int64_t>(static_cast<uint64_t>(state[2 * s]) |
                                        (static_cast<uint64_t>(digit) << shift));
    state[2 * s + 1] = remaining - above;
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) h[b] = 0;
}

// Ties (key == T) per tile.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(Meta meta, const int64_t* state, int64_t* tile_ties) {
  __shared__ unsigned int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const Tile tile = tile_of(meta, blockIdx.x);
  const T* x = static_cast<const T*>(meta.scores(tile.seg)) + tile.begin;
  const uint64_t threshold = static_cast<uint64_t>(state[2 * tile.seg]);
  unsigned int mine = 0;
  for (int64_t i = threadIdx.x; i < tile.count; i += kThreads) mine += key_of(x[i]) == threshold;
  if (mine != 0) atomicAdd(&count, mine);
  __syncthreads();
  if (threadIdx.x == 0) tile_ties[blockIdx.x] = count;
}

// One thread per segment: tile_ties becomes the exclusive prefix sum over the segment's tiles.
__global__ void scan_kernel(Meta meta, int64_t* tile_ties) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= meta.nseg) return;
  const int64_t end = s + 1 < meta.nseg ? meta.tile_start(s + 1) : meta.m[5 * meta.nseg];
  int64_t before = 0;
  for (int64_t t = meta.tile_start(s); t < end; ++t) {
    const int64_t c = tile_ties[t];
    tile_ties[t] = before;
    before += c;
  }
}

// Writes the mask of a tile: thread j owns entries [16 j, 16 j + 16) of the tile (flat order), so
// a block scan of the per-thread tie counts ranks the ties in flat order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    mask_kernel(Meta meta, const int64_t* state, const int64_t* tile_before) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const Tile tile = tile_of(meta, blockIdx.x);
  const T* x = static_cast<const T*>(meta.scores(tile.seg)) + tile.begin;
  T* out = static_cast<T*>(meta.out(tile.seg)) + tile.begin;
  const uint64_t threshold = static_cast<uint64_t>(state[2 * tile.seg]);
  const int64_t ties = state[2 * tile.seg + 1];
  const int64_t first = static_cast<int64_t>(threadIdx.x) * kPerThread;
  uint64_t keys[kPerThread];
  int eq = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + j;
    keys[j] = i < tile.count ? key_of(x[i]) : 0u;
    eq += (i < tile.count && keys[j] == threshold) ? 1 : 0;
  }
  int before_in_tile = 0;
  BlockScan(scan_storage).ExclusiveSum(eq, before_in_tile);
  int64_t rank = tile_before[blockIdx.x] + before_in_tile;
  const T one = from_float<T>(1.0f), zero = from_float<T>(0.0f);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + j;
    if (i < tile.count) {
      bool keep = keys[j] > threshold;
      if (keys[j] == threshold) {
        keep = rank < ties;
        ++rank;
      }
      out[i] = keep ? one : zero;
    }
  }
}

template <typename T>
cudaError_t run(const Meta& meta, const int64_t* host_meta, int64_t* state,
                unsigned long long* hist, int64_t* tile_ties, int64_t ntiles, bool write_mask,
                cudaStream_t stream) {
  const int key_bits = sizeof(T) == 8 ? 63 : 31;
  const int npass = (key_bits + kTopkDigitBits - 1) / kTopkDigitBits;
  const unsigned seg_blocks = static_cast<unsigned>((meta.nseg + 127) / 128);
  init_kernel<<<seg_blocks, 128, 0, stream>>>(meta, state);
  int hi = key_bits;
  for (int p = 0; p < npass; ++p) {
    const int shift = key_bits - kTopkDigitBits * (p + 1) > 0
                          ? key_bits - kTopkDigitBits * (p + 1) : 0;
    hist_kernel<T><<<static_cast<unsigned>(ntiles), kThreads, 0, stream>>>(meta, state, hist,
                                                                           shift, hi);
    pick_kernel<<<static_cast<unsigned>(meta.nseg), 256, 0, stream>>>(state, hist, shift);
    hi = shift;
  }
  if (write_mask) {
    for (int64_t s = 0; s < meta.nseg; ++s) {
      if (host_meta[meta.nseg + s] == 0) return cudaErrorInvalidValue;  // no output address
    }
    tie_count_kernel<T><<<static_cast<unsigned>(ntiles), kThreads, 0, stream>>>(meta, state,
                                                                                tile_ties);
    scan_kernel<<<seg_blocks, 128, 0, stream>>>(meta, tile_ties);
    mask_kernel<T><<<static_cast<unsigned>(ntiles), kThreads, 0, stream>>>(meta, state,
                                                                           tile_ties);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_mask_launch(ScoreType dtype, const int64_t* meta, const int64_t* host_meta,
                             int64_t nseg, void* workspace, size_t workspace_bytes,
                             bool write_mask, cudaStream_t stream) {
  if (nseg <= 0 || meta == nullptr || host_meta == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t ntiles = host_meta[5 * nseg];
  if (ntiles <= 0 || ntiles > int64_t(0x7FFFFFFF) ||
      workspace_bytes < topk_mask_workspace_size(nseg, ntiles)) {
    return cudaErrorInvalidValue;
  }
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t n = host_meta[2 * nseg + s], keep = host_meta[3 * nseg + s];
    if (n < 1 || keep < 1 || keep > n) return cudaErrorInvalidValue;
  }
  int64_t* state = static_cast<int64_t*>(workspace);
  auto* hist = reinterpret_cast<unsigned long long*>(state + 2 * nseg);
  int64_t* tile_ties = reinterpret_cast<int64_t*>(hist + nseg * kBins);
  const cudaError_t err = cudaMemsetAsync(
      hist, 0, static_cast<size_t>(nseg) * kBins * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return err;
  const Meta m{meta, nseg};
  switch (dtype) {
    case ScoreType::Float32:
      return run<float>(m, host_meta, state, hist, tile_ties, ntiles, write_mask, stream);
    case ScoreType::Float64:
      return run<double>(m, host_meta, state, hist, tile_ties, ntiles, write_mask, stream);
    case ScoreType::Float16:
      return run<__half>(m, host_meta, state, hist, tile_ties, ntiles, write_mask, stream);
    case ScoreType::BFloat16:
      return run<__nv_bfloat16>(m, host_meta, state, hist, tile_ties, ntiles, write_mask,
                                stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace subkern
