// CUDA kernels for Hamming distances and exact Hamming top-k over packed binary codes.
//
// Torch-free on purpose: raw pointers, sizes and a cudaStream_t, so that nvcc compiles this on any
// machine (tests/test_cuda_compile.py) and csrc/cuda/bindings.cpp adapts it to torch.
//
// Codes are uint8 [n, nbytes] row-major (FAISS layout), 1 <= nbytes <= 512. The Hamming distance
// of two codes is popcount(a XOR b) summed over the code, an integer in [0, 8 * nbytes].
//
// hamming_topk selects, for every query, the k database codes of smallest (distance, index): the
// result is ascending by distance, ties broken by the lower index, and slots past the database size
// hold (INT32_MAX, -1) -- exactly the torch reference (subkern/ops/binary_reference.py). It never
// builds the [nq, n] distance matrix. Distances are small integers, so selection is by histogram:
//
//   1. hist:     per (query, database slice), a histogram of the distances (in shared memory).
//   2. select:   per query, the threshold T = the smallest distance whose cumulative count reaches
//                k. Every code with distance < T is in the result (n_lt < k of them) and so are the
//                take_eq = k - n_lt codes of distance T with the lowest indices. Per slice, the
//                counts of both kinds and their exclusive prefix sums over the slices.
//   3. collect:  per (query, slice), the database is walked in index order; an order-preserving
//                block compaction (warp ballots) gives every selected code a unique slot in the
//                query's output row: codes < T at lt_off + rank, codes == T at n_lt + eq_off +
//                rank while that rank is below take_eq (the lowest indices, since slices and ranks
//                follow the index order). The slot holds the key (distance << 43) | index.
//   4. finalize: per query, the min(k, n) keys are sorted in shared memory (bitonic network; keys
//                are unique, so the order is exactly (distance, index)) and decoded.
//
// Every step is deterministic (shared-memory atomics only count). Index arithmetic is 64-bit
// (databases up to 2^43 codes). Extra memory: the workspace of subkern_hamming_topk_workspace_size
// (histograms O(nq_chunk * slices * (8 * nbytes + 1)), bounded by query chunking); the candidate
// keys live in the index output itself.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace subkern {
namespace cuda {

// Largest k selected in one pass (the final sort holds next_pow2(k) int64 keys in shared memory).
constexpr int64_t kMaxTopK = 2048;
// Widest code, in bytes (4096 bits).
constexpr int64_t kMaxCodeBytes = 512;
// Low bits of a key holding the database index: keys are (distance << 43) | index.
constexpr int kIndexBits = 43;

// D[i, j] = popcount(a[i] ^ b[j]) for a [na, nbytes], b [nb, nbytes]; out is int32 [na, nb]
// row-major. Returns cudaSuccess, cudaErrorInvalidValue for bad sizes, or the launch error.
cudaError_t hamming_distance_launch(const uint8_t* a, const uint8_t* b, int64_t na, int64_t nb,
                                    int64_t nbytes, int32_t* out, cudaStream_t stream);

// Bytes of workspace hamming_topk_launch needs for these sizes (0 when none). `sm_count` is the
// device's multiprocessor count (it sets the number of database slices); pass the same value to
// hamming_topk_launch.
size_t hamming_topk_workspace_size(int64_t nq, int64_t n, int64_t nbytes, int64_t k, int sm_count);

// The k nearest database codes of every query: out_dist int32 [nq, k] and out_index int64 [nq, k],
// row-major. `workspace` must hold hamming_topk_workspace_size(...) bytes, 16-byte aligned. Needs
// 1 <= k <= kMaxTopK, 1 <= nbytes <= kMaxCodeBytes, n < 2^43. Launches asynchronously on `stream`.
cudaError_t hamming_topk_launch(const uint8_t* queries, const uint8_t* database, int64_t nq,
                                int64_t n, int64_t nbytes, int64_t k, int32_t* out_dist,
                                int64_t* out_index, void* workspace, size_t workspace_bytes,
                                int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace subkern
