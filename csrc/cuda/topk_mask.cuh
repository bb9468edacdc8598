// CUDA kernels of edge-popup's top-k score masking (subkern.topk_mask / topk_threshold /
// topk_mask_batched), torch-free: raw pointers, sizes and a cudaStream_t, so that nvcc compiles
// them anywhere (tests/test_cuda_compile.py); csrc/cuda/topk_mask_bindings.cpp adapts them to
// torch.
//
// Semantics (subkern/ops/topk_mask_reference.py): a segment (one layer's scores, n entries) keeps
// `keep` = n - floor((1 - k) n) entries ranked by (|s| descending, flat index ascending), NaN
// lowest. Algorithm (no sort), for many segments at once (all layers of a model in one launch per
// step; every segment of a launch has the same dtype):
//
//   key:    |s|'s IEEE bits with the sign cleared, + 1, and 0 for NaN (fp16/bf16/fp32 through the
//           exact fp32 bits: 31 significant bits; fp64: 63 bits). Key order = ranking order.
//   select: the threshold key T (the keep-th largest) is found 11 bits at a time from the top
//           (3 passes for 31-bit keys, 6 for 63-bit): per 4096-entry tile a shared-memory
//           histogram of the current digit over the entries whose higher digits equal T's known
//           prefix, added to the segment's global histogram; then one thread per segment walks the
//           2048 buckets from the top, appends T's digit and subtracts the entries of the higher
//           buckets from `remaining`. At the end state = [T, ties to keep (>= 1)].
//   mask:   key > T kept; key == T kept while its rank among the segment's ties in flat order is
//           below `ties`. Rank = (ties in earlier tiles: per-tile counts, exclusive scan per
//           segment) + (ties before it in its tile: block scan). Deterministic; atomics only count.
//
// Tiles of all segments are numbered globally: segment s owns tiles [tile_start[s],
// tile_start[s + 1]) with tile_start[s + 1] - tile_start[s] = topk_mask_tiles(n_s).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace subkern {
namespace cuda {

// Entries per tile (one thread block).
constexpr int64_t kTopkTile = 4096;
// Bits of the key resolved per histogram pass.
constexpr int kTopkDigitBits = 11;

enum class ScoreType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// Tiles of a segment of n entries.
inline int64_t topk_mask_tiles(int64_t n) { return (n + kTopkTile - 1) / kTopkTile; }

// Layout of the int64 segment table `meta` (in device memory) for nseg segments:
//   meta[0 * nseg + s]  address of segment s's scores (contiguous)
//   meta[1 * nseg + s]  address of segment s's mask output (contiguous, same dtype; 0 = none)
//   meta[2 * nseg + s]  n_s >= 1
//   meta[3 * nseg + s]  keep_s, 1 <= keep_s <= n_s
//   meta[4 * nseg + s]  tile_start[s]; meta[5 * nseg] = total tiles
inline int64_t topk_mask_meta_size(int64_t nseg) { return 5 * nseg + 1; }

// Workspace bytes for nseg segments with ntiles tiles in all (16-byte aligned by the caller).
// The first 2 * nseg int64 hold each segment's state [T, ties] after topk_mask_launch.
inline size_t topk_mask_workspace_size(int64_t nseg, int64_t ntiles) {
  const int64_t nbins = int64_t(1) << kTopkDigitBits;
  return static_cast<size_t>(2 * nseg + nseg * nbins + ntiles) * sizeof(int64_t);
}

// Selects every segment's threshold and, when write_mask, writes its mask. `meta` is the table
// above in device memory (host copy `host_meta` gives the sizes without a device read). Launches
// asynchronously on `stream`; returns cudaSuccess, cudaErrorInvalidValue for bad arguments, or
// the launch error.
cudaError_t topk_mask_launch(ScoreType dtype, const int64_t* meta, const int64_t* host_meta,
                             int64_t nseg, void* workspace, size_t workspace_bytes,
                             bool write_mask, cudaStream_t stream);

}  // namespace cuda
}  // namespace subkern
