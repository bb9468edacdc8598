// CUDA kernels for Hamming distances and exact Hamming top-k (see hamming.cuh for the algorithm).
#include "cuda/hamming.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace subkern {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kKeyMax = INT64_MAX;  // "no candidate"; above every real key
constexpr int64_t kIndexMask = (int64_t{1} << kIndexBits) - 1;
constexpr int32_t kMissingDistance = INT32_MAX;
constexpr int64_t kMissingIndex = -1;

// Threads of the database scans (hist, collect) and of the per-query select kernel.
constexpr int kScanThreads = 256;
constexpr int kScanWarps = kScanThreads / kWarpSize;
constexpr int kSelectThreads = 256;
// Dynamic shared memory one hist block may use (below the 48 KiB available without opt-in).
constexpr size_t kHistSharedBudget = 46 * 1024;
// Upper bound on the top-k workspace; larger query sets are processed in chunks.
constexpr size_t kWorkspaceBudget = size_t{128} << 20;
// Largest grid y dimension.
constexpr int64_t kMaxGridY = 65535;
// A slice holds at most 2^31 codes, so per-slice histogram counts fit uint32.
constexpr int64_t kMaxSliceLen = int64_t{1} << 31;

// ---------------------------------------------------------------------------------------------
// Words and popcounts. A code is read as nbytes / sizeof(Word) words; Word is uint64_t or uint32_t
// when the width and both base pointers allow it, else uint8_t. In shared memory and registers a
// word is held zero-extended in a Slot (uint64_t for 8-byte words, uint32_t otherwise).
// ---------------------------------------------------------------------------------------------

template <typename Word>
struct SlotOf {
  using type = uint32_t;
};
template <>
struct SlotOf<uint64_t> {
  using type = uint64_t;
};

__device__ __forceinline__ int popcount(uint32_t x) { return __popc(x); }
__device__ __forceinline__ int popcount(uint64_t x) {
  return __popcll(static_cast<unsigned long long>(x));
}

__host__ __device__ constexpr size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// min/max usable in device code without --expt-relaxed-constexpr.
template <typename T>
__host__ __device__ __forceinline__ T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
__host__ __device__ __forceinline__ T max_of(T a, T b) {
  return a < b ? b : a;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Bytes per word usable for both code arrays: 8, 4 or 1.
int word_bytes_for(const void* a, const void* b, int64_t nbytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a);
  const auto pb = reinterpret_cast<uintptr_t>(b);
  for (int w : {8, 4}) {
    if (nbytes % w == 0 && pa % w == 0 && pb % w == 0) return w;
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------
// hamming_distance: one 64 x 64 output tile per block of 256 threads, each thread a 4 x 4
// micro-tile (rows ty + 16 i, columns tx + 16 j). The K loop walks the words in chunks of
// kDistChunk, staged in shared memory (rows padded by one slot against bank conflicts).
// ---------------------------------------------------------------------------------------------

constexpr int kDistTile = 64;
constexpr int kDistChunk = 8;
constexpr int kDistThreads = 256;

template <typename Word>
__global__ void __launch_bounds__(kDistThreads)
    distance_kernel(const Word* __restrict__ a, const Word* __restrict__ b, int64_t na, int64_t nb,
                    int nwords, int64_t tiles_m, int32_t* __restrict__ out) {
  using Slot = typename SlotOf<Word>::type;
  __shared__ Slot as[kDistTile][kDistChunk + 1];
  __shared__ Slot bs[kDistTile][kDistChunk + 1];
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kDistTile;

  for (int64_t tm = blockIdx.y; tm < tiles_m; tm += gridDim.y) {  // block-uniform loop
    const int64_t row0 = tm * kDistTile;
    int acc[4][4] = {};
    for (int w0 = 0; w0 < nwords; w0 += kDistChunk) {
      for (int e = threadIdx.x; e < kDistTile * kDistChunk; e += kDistThreads) {
        const int r = e / kDistChunk;
        const int c = e % kDistChunk;
        const int w = w0 + c;
        const int64_t ra = row0 + r;
        const int64_t rb = col0 + r;
        // Words past the code and rows past the matrices read as 0 (their outputs are dropped).
        as[r][c] = (ra < na && w < nwords) ? static_cast<Slot>(a[ra * nwords + w]) : Slot{0};
        bs[r][c] = (rb < nb && w < nwords) ? static_cast<Slot>(b[rb * nwords + w]) : Slot{0};
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kDistChunk; ++c) {
        Slot av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          av[i] = as[ty + 16 * i][c];
          bv[i] = bs[tx + 16 * i][c];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += popcount(av[i] ^ bv[j]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t c = col0 + tx + 16 * j;
        if (r < na && c < nb) out[r * nb + c] = acc[i][j];
      }
    }
  }
}

template <typename Word>
cudaError_t launch_distance(const uint8_t* a, const uint8_t* b, int64_t na, int64_t nb,
                            int64_t nbytes, int32_t* out, cudaStream_t stream) {
  const int nwords = static_cast<int>(nbytes / static_cast<int64_t>(sizeof(Word)));
  const int64_t tiles_m = ceil_div(na, kDistTile);
  const int64_t tiles_n = ceil_div(nb, kDistTile);
  if (tiles_n > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles_n),
                  static_cast<unsigned>(std::min<int64_t>(tiles_m, kMaxGridY)));
  distance_kernel<Word><<<grid, kDistThreads, 0, stream>>>(
      reinterpret_cast<const Word*>(a), reinterpret_cast<const Word*>(b), na, nb, nwords, tiles_m,
      out);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Top-k, step 0: shared helpers of the database scans.
// ---------------------------------------------------------------------------------------------

// Per query: the threshold distance and how many codes of each kind it selects.
struct QueryInfo {
  int64_t n_lt;     // codes with distance < threshold (all selected; < k unless n < k)
  int64_t take_eq;  // codes with distance == threshold to select (lowest indices first)
  int32_t threshold;  // nbins (above every distance) when the database has fewer than k codes
  int32_t unused;
};

// Per (query, slice): counts of both kinds in the slice and their exclusive prefix over slices.
struct SliceInfo {
  int64_t lt_count;
  int64_t eq_count;
  int64_t lt_offset;
  int64_t eq_offset;
};

// Copy QT query codes (rows q0 .. q0 + QT - 1; zeros past nq) into shared memory.
template <typename Word, int QT>
__device__ __forceinline__ void load_queries(const Word* __restrict__ queries, int64_t nq,
                                             int nwords, int64_t q0,
                                             typename SlotOf<Word>::type* qs) {
  using Slot = typename SlotOf<Word>::type;
  for (int i = threadIdx.x; i < QT * nwords; i += blockDim.x) {
    const int qq = i / nwords;
    const int w = i - qq * nwords;
    const int64_t q = q0 + qq;
    qs[i] = q < nq ? static_cast<Slot>(queries[q * nwords + w]) : Slot{0};
  }
}

// dist[qq] = popcount(row ^ query qq) for the QT queries in shared memory (broadcast reads).
template <typename Word, int QT>
__device__ __forceinline__ void code_distances(const Word* __restrict__ row,
                                               const typename SlotOf<Word>::type* qs, int nwords,
                                               int (&dist)[QT]) {
  using Slot = typename SlotOf<Word>::type;
#pragma unroll
  for (int qq = 0; qq < QT; ++qq) dist[qq] = 0;
  for (int w = 0; w < nwords; ++w) {
    const Slot x = static_cast<Slot>(row[w]);
#pragma unroll
    for (int qq = 0; qq < QT; ++qq) dist[qq] += popcount(x ^ qs[qq * nwords + w]);
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k, step 1 (grid: slices x query tiles): hist[q][s][d] = #{j in slice s : dist(q, j) = d}.
// ---------------------------------------------------------------------------------------------

template <typename Word, int QT>
__global__ void __launch_bounds__(kScanThreads)
    topk_hist_kernel(const Word* __restrict__ queries, const Word* __restrict__ database,
                     int64_t nq, int64_t n, int nwords, int nbins, int64_t slice_len,
                     int64_t slices, uint32_t* __restrict__ hist) {
  using Slot = typename SlotOf<Word>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  Slot* qs = reinterpret_cast<Slot*>(smem);
  uint32_t* counts = reinterpret_cast<uint32_t*>(smem + align16(QT * nwords * sizeof(Slot)));

  const int64_t s = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * QT;
  load_queries<Word, QT>(queries, nq, nwords, q0, qs);
  for (int i = threadIdx.x; i < QT * nbins; i += blockDim.x) counts[i] = 0;
  __syncthreads();

  const int64_t start = s * slice_len;
  const int64_t stop = min_of(start + slice_len, n);
  for (int64_t j = start + threadIdx.x; j < stop; j += blockDim.x) {
    int dist[QT];
    code_distances<Word, QT>(database + j * nwords, qs, nwords, dist);
#pragma unroll
    for (int qq = 0; qq < QT; ++qq) atomicAdd(&counts[qq * nbins + dist[qq]], 1u);
  }
  __syncthreads();

  for (int i = threadIdx.x; i < QT * nbins; i += blockDim.x) {
    const int qq = i / nbins;
    const int d = i - qq * nbins;
    const int64_t q = q0 + qq;
    if (q < nq) hist[(q * slices + s) * nbins + d] = counts[i];
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k, step 2 (one block per query): threshold, per-slice counts and offsets.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) v += __shfl_xor_sync(kFullMask, v, delta);
  return v;
}

// In place exclusive prefix sum of a[0 .. len) by one thread.
__device__ __forceinline__ void serial_exclusive_scan(unsigned long long* a, int len) {
  unsigned long long run = 0;
  for (int i = 0; i < len; ++i) {
    const unsigned long long v = a[i];
    a[i] = run;
    run += v;
  }
}

__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(const uint32_t* __restrict__ hist, int64_t slices, int nbins, int64_t k,
                       SliceInfo* __restrict__ slice_info, QueryInfo* __restrict__ query_info) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned long long* total = reinterpret_cast<unsigned long long*>(smem);  // [nbins]
  __shared__ unsigned long long part_a[kSelectThreads];
  __shared__ unsigned long long part_b[kSelectThreads];
  __shared__ int threshold_shared;

  const int tid = threadIdx.x;
  const int64_t q = blockIdx.x;
  const uint32_t* h = hist + q * slices * nbins;
  const unsigned long long kk = static_cast<unsigned long long>(k);

  // (a) Histogram of the whole database: total[d] = sum over slices (reads coalesced over d).
  for (int d = tid; d < nbins; d += kSelectThreads) {
    unsigned long long sum = 0;
    for (int64_t s = 0; s < slices; ++s) sum += h[s * nbins + d];
    total[d] = sum;
  }
  __syncthreads();

  // (b) Threshold: the smallest t with #{dist <= t} >= k. Thread i sums bins [i*per, (i+1)*per);
  // thread 0 then walks the partial sums and, inside the chunk that reaches k, the bins.
  const int per = (nbins + kSelectThreads - 1) / kSelectThreads;
  {
    const int lo = min_of(tid * per, nbins);
    const int hi = min_of(lo + per, nbins);
    unsigned long long sum = 0;
    for (int d = lo; d < hi; ++d) sum += total[d];
    part_a[tid] = sum;
  }
  __syncthreads();
  if (tid == 0) {
    unsigned long long below = 0;  // #{dist < t}
    int t = nbins;                 // no threshold: fewer than k codes, all are selected
    for (int c = 0; c < kSelectThreads && t == nbins; ++c) {
      if (below + part_a[c] < kk) {
        below += part_a[c];
        continue;
      }
      const int hi = min_of(c * per + per, nbins);
      for (int d = c * per; d < hi; ++d) {
        if (below + total[d] >= kk) {
          t = d;
          break;
        }
        below += total[d];
      }
    }
    QueryInfo info;
    info.n_lt = static_cast<int64_t>(below);
    info.take_eq = t < nbins ? k - static_cast<int64_t>(below) : 0;
    info.threshold = t;
    info.unused = 0;
    query_info[q] = info;
    threshold_shared = t;
  }
  __syncthreads();
  const int t = threshold_shared;

  // (c) Per slice: #{dist < t} (one warp per slice, lanes over the bins) and #{dist == t}.
  SliceInfo* info = slice_info + q * slices;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  for (int64_t s = warp; s < slices; s += kSelectThreads / kWarpSize) {
    const uint32_t* hs = h + s * nbins;
    unsigned long long lt = 0;
    for (int d = lane; d < t; d += kWarpSize) lt += hs[d];  // t <= nbins
    lt = warp_sum(lt);
    if (lane == 0) {
      info[s].lt_count = static_cast<int64_t>(lt);
      info[s].eq_count = t < nbins ? static_cast<int64_t>(hs[t]) : 0;
    }
  }
  __syncthreads();

  // (d) Exclusive prefix sums over the slices, chunked like (b).
  const int64_t sper = (slices + kSelectThreads - 1) / kSelectThreads;
  const int64_t s_lo = min_of<int64_t>(tid * sper, slices);
  const int64_t s_hi = min_of<int64_t>(s_lo + sper, slices);
  {
    unsigned long long a = 0, b = 0;
    for (int64_t s = s_lo; s < s_hi; ++s) {
      a += static_cast<unsigned long long>(info[s].lt_count);
      b += static_cast<unsigned long long>(info[s].eq_count);
    }
    part_a[tid] = a;
    part_b[tid] = b;
  }
  __syncthreads();
  if (tid == 0) {
    serial_exclusive_scan(part_a, kSelectThreads);
    serial_exclusive_scan(part_b, kSelectThreads);
  }
  __syncthreads();
  {
    unsigned long long a = part_a[tid], b = part_b[tid];
    for (int64_t s = s_lo; s < s_hi; ++s) {
      info[s].lt_offset = static_cast<int64_t>(a);
      info[s].eq_offset = static_cast<int64_t>(b);
      a += static_cast<unsigned long long>(info[s].lt_count);
      b += static_cast<unsigned long long>(info[s].eq_count);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k, step 3 (grid: slices x query tiles): write the selected keys, in index order, to their
// slots of the query's output row (keys_out = the int64 index output, [nq, k]).
// ---------------------------------------------------------------------------------------------

template <typename Word, int QT>
__global__ void __launch_bounds__(kScanThreads)
    topk_collect_kernel(const Word* __restrict__ queries, const Word* __restrict__ database,
                        int64_t nq, int64_t n, int nwords, int64_t slice_len, int64_t slices,
                        const SliceInfo* __restrict__ slice_info,
                        const QueryInfo* __restrict__ query_info, int64_t k,
                        int64_t* __restrict__ keys_out) {
  using Slot = typename SlotOf<Word>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  Slot* qs = reinterpret_cast<Slot*>(smem);
  __shared__ int thr[QT];
  __shared__ int64_t lt_base[QT], eq_base[QT];  // output slot of the slice's first code of a kind
  __shared__ int64_t lt_want[QT], eq_want[QT];  // codes of each kind this slice contributes
  __shared__ int64_t lt_seen[QT], eq_seen[QT];  // codes of each kind met so far in this slice
  __shared__ uint32_t warp_counts[2 * QT][kScanWarps];
  __shared__ int done;

  const int64_t s = blockIdx.x;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * QT;
  load_queries<Word, QT>(queries, nq, nwords, q0, qs);
  if (threadIdx.x < QT) {
    const int qq = threadIdx.x;
    const int64_t q = q0 + qq;
    if (q < nq) {
      const QueryInfo qi = query_info[q];
      const SliceInfo si = slice_info[q * slices + s];
      thr[qq] = qi.threshold;
      lt_base[qq] = si.lt_offset;
      lt_want[qq] = si.lt_count;
      eq_base[qq] = qi.n_lt + si.eq_offset;
      // The slice's ties have global ranks eq_offset .. eq_offset + eq_count - 1 among all ties;
      // those below take_eq are selected.
      eq_want[qq] = max_of<int64_t>(0, min_of(qi.take_eq - si.eq_offset, si.eq_count));
    } else {
      thr[qq] = -1;  // no distance is < -1 or == -1: nothing selected
      lt_base[qq] = eq_base[qq] = 0;
      lt_want[qq] = eq_want[qq] = 0;
    }
    lt_seen[qq] = eq_seen[qq] = 0;
  }
  __syncthreads();

  bool needed = false;
#pragma unroll
  for (int qq = 0; qq < QT; ++qq) needed |= lt_want[qq] > 0 || eq_want[qq] > 0;
  if (!needed) return;  // block-uniform: every thread read the same shared values

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t start = s * slice_len;
  const int64_t stop = min_of(start + slice_len, n);
  for (int64_t base = start; base < stop; base += kScanThreads) {  // block-uniform loop
    const int64_t j = base + threadIdx.x;
    const bool valid = j < stop;
    int dist[QT];
    if (valid) {
      code_distances<Word, QT>(database + j * nwords, qs, nwords, dist);
    } else {
#pragma unroll
      for (int qq = 0; qq < QT; ++qq) dist[qq] = 0;
    }
    bool is_lt[QT], is_eq[QT];
    unsigned lt_mask[QT], eq_mask[QT];
#pragma unroll
    for (int qq = 0; qq < QT; ++qq) {
      is_lt[qq] = valid && dist[qq] < thr[qq];
      is_eq[qq] = valid && dist[qq] == thr[qq];
      lt_mask[qq] = __ballot_sync(kFullMask, is_lt[qq]);
      eq_mask[qq] = __ballot_sync(kFullMask, is_eq[qq]);
      if (lane == 0) {
        warp_counts[2 * qq][warp] = __popc(lt_mask[qq]);
        warp_counts[2 * qq + 1][warp] = __popc(eq_mask[qq]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int qq = 0; qq < QT; ++qq) {
      if (!is_lt[qq] && !is_eq[qq]) continue;
      // Rank of this code among the codes of its kind in this tile: lower warps, then lower lanes.
      int64_t rank_lt = __popc(lt_mask[qq] & lanes_below);
      int64_t rank_eq = __popc(eq_mask[qq] & lanes_below);
      for (int w = 0; w < warp; ++w) {
        rank_lt += warp_counts[2 * qq][w];
        rank_eq += warp_counts[2 * qq + 1][w];
      }
      const int64_t key = (static_cast<int64_t>(dist[qq]) << kIndexBits) | j;
      int64_t* row = keys_out + (q0 + qq) * k;
      if (is_lt[qq]) {
        row[lt_base[qq] + lt_seen[qq] + rank_lt] = key;
      } else {
        const int64_t rank = eq_seen[qq] + rank_eq;
        if (rank < eq_want[qq]) row[eq_base[qq] + rank] = key;
      }
    }
    __syncthreads();  // all ranks are read before the counters advance
    if (threadIdx.x == 0) {
      int finished = 1;
#pragma unroll
      for (int qq = 0; qq < QT; ++qq) {
        int64_t tile_lt = 0, tile_eq = 0;
        for (int w = 0; w < kScanWarps; ++w) {
          tile_lt += warp_counts[2 * qq][w];
          tile_eq += warp_counts[2 * qq + 1][w];
        }
        lt_seen[qq] += tile_lt;
        eq_seen[qq] += tile_eq;
        finished &= (lt_seen[qq] >= lt_want[qq] && eq_seen[qq] >= eq_want[qq]) ? 1 : 0;
      }
      done = finished;
    }
    __syncthreads();
    if (done) break;  // block-uniform
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k, step 4 (one block per query): sort the k_valid = min(k, n) keys of the row (bitonic
// network over p = next_pow2(k_valid) slots, padded with kKeyMax) and decode them in place.
// ---------------------------------------------------------------------------------------------

__global__ void topk_finalize_kernel(int64_t* __restrict__ index_io,
                                     int32_t* __restrict__ out_dist, int64_t k, int64_t k_valid,
                                     int p) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* keys = reinterpret_cast<int64_t*>(smem);
  const int64_t q = blockIdx.x;
  int64_t* row = index_io + q * k;
  int32_t* drow = out_dist + q * k;

  for (int i = threadIdx.x; i < p; i += blockDim.x) keys[i] = i < k_valid ? row[i] : kKeyMax;
  __syncthreads();
  for (int size = 2; size <= p; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < p / 2; i += blockDim.x) {
        // i-th pair (lo, lo + stride) of this step: insert a 0 bit at position log2(stride).
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const int64_t x = keys[lo];
        const int64_t y = keys[hi];
        if ((x > y) == ascending) {
          keys[lo] = y;
          keys[hi] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    if (i < k_valid) {
      const int64_t key = keys[i];
      drow[i] = static_cast<int32_t>(key >> kIndexBits);
      row[i] = key & kIndexMask;
    } else {
      drow[i] = kMissingDistance;
      row[i] = kMissingIndex;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k planning (identical for hamming_topk_workspace_size and hamming_topk_launch).
// ---------------------------------------------------------------------------------------------

struct TopkPlan {
  int qt = 1;             // queries per hist/collect block: 1, 2, 4 or 8
  int nbins = 0;          // 8 * nbytes + 1
  int64_t slices = 1;     // database slices
  int64_t slice_len = 0;  // codes per slice (the last may be shorter)
  int64_t chunk_q = 0;    // queries per chunk
  size_t hist_bytes = 0, slice_bytes = 0, query_bytes = 0, total_bytes = 0;
};

TopkPlan make_plan(int64_t nq, int64_t n, int64_t nbytes, int sm_count) {
  TopkPlan plan;
  plan.nbins = static_cast<int>(8 * nbytes + 1);
  // Shared memory of a hist block per query: the query's words (at most 4 bytes per code byte,
  // for byte words held in 32-bit slots) and its uint32 histogram.
  const size_t per_query_shared = align16(4 * static_cast<size_t>(nbytes)) + 4 * plan.nbins;
  int qt = 8;
  while (qt > 1 && qt * per_query_shared > kHistSharedBudget) qt /= 2;
  while (qt > 1 && qt / 2 >= nq) qt /= 2;  // no idle query rows for small nq
  plan.qt = qt;

  // Enough (slices x query tiles) blocks to fill the GPU a few times over, slices of at least
  // 1024 codes, and at most 2^21 histogram bins per query (the select step reads them all).
  const int64_t q_tiles = ceil_div(nq, qt);
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(std::max(sm_count, 1)), q_tiles);
  const int64_t cap =
      std::max<int64_t>(1, std::min<int64_t>(1024, (int64_t{1} << 21) / plan.nbins));
  int64_t slices = std::min({wanted, cap, std::max<int64_t>(1, n / 1024)});
  slices = std::max({slices, ceil_div(n, kMaxSliceLen), int64_t{1}});
  plan.slice_len = ceil_div(n, slices);
  plan.slices = ceil_div(n, plan.slice_len);  // no empty slice

  const size_t per_query = static_cast<size_t>(plan.slices) * plan.nbins * sizeof(uint32_t) +
                           static_cast<size_t>(plan.slices) * sizeof(SliceInfo) + sizeof(QueryInfo);
  int64_t chunk = static_cast<int64_t>(std::max<size_t>(1, kWorkspaceBudget / per_query));
  chunk = std::min({chunk, nq, kMaxGridY * qt});
  plan.chunk_q = chunk;
  plan.hist_bytes =
      align16(static_cast<size_t>(chunk) * plan.slices * plan.nbins * sizeof(uint32_t));
  plan.slice_bytes = align16(static_cast<size_t>(chunk) * plan.slices * sizeof(SliceInfo));
  plan.query_bytes = align16(static_cast<size_t>(chunk) * sizeof(QueryInfo));
  plan.total_bytes = plan.hist_bytes + plan.slice_bytes + plan.query_bytes;
  return plan;
}

bool valid_topk_sizes(int64_t nq, int64_t n, int64_t nbytes, int64_t k) {
  return nq >= 0 && n >= 0 && n < (int64_t{1} << kIndexBits) && nbytes >= 1 &&
         nbytes <= kMaxCodeBytes && k >= 1 && k <= kMaxTopK;
}

cudaError_t launch_finalize(int64_t* out_index, int32_t* out_dist, int64_t nq_chunk, int64_t k,
                            int64_t k_valid, cudaStream_t stream) {
  const int p = static_cast<int>(next_pow2(std::max<int64_t>(k_valid, 1)));
  const int threads = std::min(1024, std::max(kWarpSize, p / 2));
  topk_finalize_kernel<<<static_cast<unsigned>(nq_chunk), threads, p * sizeof(int64_t), stream>>>(
      out_index, out_dist, k, k_valid, p);
  return cudaGetLastError();
}

template <typename Word, int QT>
cudaError_t run_topk_chunk(const uint8_t* queries, const uint8_t* database, int64_t nq_chunk,
                           int64_t n, int64_t nbytes, int64_t k, int32_t* out_dist,
                           int64_t* out_index, const TopkPlan& plan, unsigned char* workspace,
                           cudaStream_t stream) {
  using Slot = typename SlotOf<Word>::type;
  const int nwords = static_cast<int>(nbytes / static_cast<int64_t>(sizeof(Word)));
  const Word* q = reinterpret_cast<const Word*>(queries);
  const Word* db = reinterpret_cast<const Word*>(database);
  auto* hist = reinterpret_cast<uint32_t*>(workspace);
  auto* slice_info = reinterpret_cast<SliceInfo*>(workspace + plan.hist_bytes);
  auto* query_info = reinterpret_cast<QueryInfo*>(workspace + plan.hist_bytes + plan.slice_bytes);

  const dim3 scan_grid(static_cast<unsigned>(plan.slices),
                       static_cast<unsigned>(ceil_div(nq_chunk, QT)));
  const size_t query_shared = align16(static_cast<size_t>(QT) * nwords * sizeof(Slot));

  topk_hist_kernel<Word, QT><<<scan_grid, kScanThreads,
                               query_shared + static_cast<size_t>(QT) * plan.nbins * 4, stream>>>(
      q, db, nq_chunk, n, nwords, plan.nbins, plan.slice_len, plan.slices, hist);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  topk_select_kernel<<<static_cast<unsigned>(nq_chunk), kSelectThreads,
                       static_cast<size_t>(plan.nbins) * sizeof(unsigned long long), stream>>>(
      hist, plan.slices, plan.nbins, k, slice_info, query_info);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  topk_collect_kernel<Word, QT><<<scan_grid, kScanThreads, query_shared, stream>>>(
      q, db, nq_chunk, n, nwords, plan.slice_len, plan.slices, slice_info, query_info, k,
      out_index);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  return launch_finalize(out_index, out_dist, nq_chunk, k, std::min(k, n), stream);
}

template <typename Word>
cudaError_t run_topk_chunk_qt(int qt, const uint8_t* queries, const uint8_t* database,
                              int64_t nq_chunk, int64_t n, int64_t nbytes, int64_t k,
                              int32_t* out_dist, int64_t* out_index, const TopkPlan& plan,
                              unsigned char* workspace, cudaStream_t stream) {
  switch (qt) {
    case 8:
      return run_topk_chunk<Word, 8>(queries, database, nq_chunk, n, nbytes, k, out_dist,
                                     out_index, plan, workspace, stream);
    case 4:
      return run_topk_chunk<Word, 4>(queries, database, nq_chunk, n, nbytes, k, out_dist,
                                     out_index, plan, workspace, stream);
    case 2:
      return run_topk_chunk<Word, 2>(queries, database, nq_chunk, n, nbytes, k, out_dist,
                                     out_index, plan, workspace, stream);
    default:
      return run_topk_chunk<Word, 1>(queries, database, nq_chunk, n, nbytes, k, out_dist,
                                     out_index, plan, workspace, stream);
  }
}

}  // namespace

cudaError_t hamming_distance_launch(const uint8_t* a, const uint8_t* b, int64_t na, int64_t nb,
                                    int64_t nbytes, int32_t* out, cudaStream_t stream) {
  if (na < 0 || nb < 0 || nbytes < 1 || nbytes > kMaxCodeBytes) return cudaErrorInvalidValue;
  if (na == 0 || nb == 0) return cudaSuccess;
  if (a == nullptr || b == nullptr || out == nullptr) return cudaErrorInvalidValue;
  switch (word_bytes_for(a, b, nbytes)) {
    case 8:
      return launch_distance<uint64_t>(a, b, na, nb, nbytes, out, stream);
    case 4:
      return launch_distance<uint32_t>(a, b, na, nb, nbytes, out, stream);
    default:
      return launch_distance<uint8_t>(a, b, na, nb, nbytes, out, stream);
  }
}

size_t hamming_topk_workspace_size(int64_t nq, int64_t n, int64_t nbytes, int64_t k,
                                   int sm_count) {
  if (!valid_topk_sizes(nq, n, nbytes, k) || nq == 0 || n == 0) return 0;
  return make_plan(nq, n, nbytes, sm_count).total_bytes;
}

cudaError_t hamming_topk_launch(const uint8_t* queries, const uint8_t* database, int64_t nq,
                                int64_t n, int64_t nbytes, int64_t k, int32_t* out_dist,
                                int64_t* out_index, void* workspace, size_t workspace_bytes,
                                int sm_count, cudaStream_t stream) {
  if (!valid_topk_sizes(nq, n, nbytes, k)) return cudaErrorInvalidValue;
  if (nq == 0) return cudaSuccess;
  if (out_dist == nullptr || out_index == nullptr) return cudaErrorInvalidValue;
  if (n == 0) {  // every slot is missing
    for (int64_t q0 = 0; q0 < nq; q0 += INT32_MAX) {
      const int64_t chunk = std::min<int64_t>(INT32_MAX, nq - q0);
      const cudaError_t err = launch_finalize(out_index + q0 * k, out_dist + q0 * k, chunk, k,
                                              0, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  if (queries == nullptr || database == nullptr) return cudaErrorInvalidValue;
  const TopkPlan plan = make_plan(nq, n, nbytes, sm_count);
  if (workspace == nullptr || workspace_bytes < plan.total_bytes ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  auto* ws = static_cast<unsigned char*>(workspace);
  const int word = word_bytes_for(queries, database, nbytes);
  for (int64_t q0 = 0; q0 < nq; q0 += plan.chunk_q) {
    const int64_t chunk = std::min(plan.chunk_q, nq - q0);
    const uint8_t* q = queries + q0 * nbytes;
    int32_t* od = out_dist + q0 * k;
    int64_t* oi = out_index + q0 * k;
    cudaError_t err;
    switch (word) {
      case 8:
        err = run_topk_chunk_qt<uint64_t>(plan.qt, q, database, chunk, n, nbytes, k, od, oi, plan,
                                          ws, stream);
        break;
      case 4:
        err = run_topk_chunk_qt<uint32_t>(plan.qt, q, database, chunk, n, nbytes, k, od, oi, plan,
                                          ws, stream);
        break;
      default:
        err = run_topk_chunk_qt<uint8_t>(plan.qt, q, database, chunk, n, nbytes, k, od, oi, plan,
                                         ws, stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace subkern
