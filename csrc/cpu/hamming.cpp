// C++ CPU kernels of the Hamming-distance ops (schemas are defined in subkern/ops/binary.py):
//
//   hamming_distance(a uint8 [na, B], b uint8 [nb, B]) -> int32 [na, nb]
//       D[i, j] = sum_{bytes t} popcount(a[i, t] XOR b[j, t])
//   hamming_topk(queries uint8 [nq, B], database uint8 [n, B], k) -> (int32 [nq, k], int64 [nq, k])
//       for every query the k database codes of smallest key (D[i, j], j), ascending; slots past
//       the database size hold (INT32_MAX, -1).
//
// Design
// ------
// * Layout. Codes are zero-padded to W = ceil(B / 8) 64-bit words (zero bytes add nothing to a
//   XOR popcount), so any width 1 .. 512 bytes (and wider) works. Queries are padded once per call
//   into [nq, W] words. The database is processed in tiles of T codes (~32 KiB, L1-resident) that
//   are transposed to a word-major layout: for each group of 8 codes and each word w, word w of
//   those 8 codes lies in 64 contiguous bytes (one 512-bit register). 64-bit codes are already in
//   that layout and are read in place. Every query of a thread's chunk runs against a tile before
//   the next one is built, so each database byte is read from memory once per thread.
// * Micro-kernel (AVX-512 VPOPCNTDQ): Q = 4 queries x V = 4 groups (32 codes) of accumulators in
//   registers; per word: 4 loads, 4 query broadcasts, 16 x (VPXORQ, VPOPCNTQ, VPADDQ), i.e.
//   3 vector uops per 8 code-word pairs. Tiles are transposed with masked 64-byte loads and an
//   in-register 8 x 8 transpose. The AVX2 path counts bits with the nibble look-up table
//   (VPSHUFB) into byte counters summed into 64-bit lanes with VPSADBW; the portable path uses
//   scalar popcounts. The level comes from subkern::cpu::active_isa() at every call; vector code
//   is compiled with GCC/Clang target attributes only (no -march), so the binary runs on any
//   x86-64 CPU, and non-x86 builds compile the portable path alone.
// * Top-k with exact threshold pruning (see TopK below): each (query, database slice) has a
//   threshold thr such that only codes with distance < thr can still enter its top-k. The
//   micro-kernel reduces a query's 32 distances with a lane-wise minimum and compares it with thr
//   in one vector instruction; only blocks with a survivor leave the vector loop, and then only
//   the surviving lanes (bit scan over the compare masks) reach the scalar top-k update.
// * Threads: at::get_num_threads() std::thread workers, spawned per call (calls too small to
//   amortise a thread start run on the calling thread). The tasks form a grid of query chunks
//   (>= 32 queries each, amortising the tile transposition) x database slices; the per-slice
//   lists are merged by key. Every list is the exact top-k of its slice by (distance, index), so
//   results do not depend on the number of threads. at::parallel_for is not used: with torch's
//   OpenMP backend its inline template needs this extension built with -fopenmp, which would link
//   a second OpenMP runtime into the process.
// * All index arithmetic is int64_t: databases past 2^31 codes work.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/parallel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SUBKERN_X86 1
#include <immintrin.h>
#else
#define SUBKERN_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SK_NOINLINE __attribute__((noinline))
#define SK_INLINE inline __attribute__((always_inline))
#define SK_LIKELY(x) __builtin_expect(!!(x), 1)
#define SK_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define SK_NOINLINE
#define SK_INLINE inline
#define SK_LIKELY(x) (x)
#define SK_UNLIKELY(x) (x)
#endif

namespace subkern::cpu {
namespace {

using cpu::Isa;

// Codes per tile group (one 512-bit register of 64-bit words) and groups per micro-kernel step.
constexpr int64_t kGroup = 8;
constexpr int64_t kGroupsPerStep = 4;
constexpr int64_t kStepCodes = kGroup * kGroupsPerStep;  // tiles are padded to a multiple of this
// Target size of one transposed database tile (L1-resident while all queries run against it).
constexpr int64_t kTileBytes = 32 * 1024;
// Calls with fewer word-pairs than this run on the calling thread (a thread start costs ~20 us).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 19;
constexpr int64_t kNotFull = INT64_MAX;  // threshold of a heap that is not full yet
// Top-k: a thread's query chunk has at least this many queries when there are enough of them
// (more threads then split the database instead).
constexpr int64_t kMinChunkQueries = 32;

int64_t words_for(int64_t nbytes) { return (nbytes + 7) / 8; }

// Codes of a tile: a multiple of kStepCodes such that the tile is about kTileBytes.
int64_t tile_codes(int64_t W) {
  int64_t t = kTileBytes / (8 * W);
  t = (t / kStepCodes) * kStepCodes;
  return std::max(t, kStepCodes);
}

// Loads bytes [0, len) of src (len in 1..8) into a 64-bit word whose other bytes are zero.
SK_INLINE uint64_t load_partial_word(const uint8_t* src, int64_t len) {
  uint64_t v = 0;
  switch (len) {
    case 8: std::memcpy(&v, src, 8); break;
    case 7: std::memcpy(&v, src, 7); break;
    case 6: std::memcpy(&v, src, 6); break;
    case 5: std::memcpy(&v, src, 5); break;
    case 4: std::memcpy(&v, src, 4); break;
    case 3: std::memcpy(&v, src, 3); break;
    case 2: std::memcpy(&v, src, 2); break;
    default: v = src[0]; break;
  }
  return v;  // on big-endian hosts the byte order differs, which a popcount does not see
}

// Pads codes [n, B] into words [n, W] (row-major), the layout used for queries.
void pad_rows(const uint8_t* src, int64_t n, int64_t B, int64_t W, uint64_t* dst) {
  const int64_t full = B / 8, rem = B % 8;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = src + i * B;
    uint64_t* out = dst + i * W;
    for (int64_t w = 0; w < full; ++w) out[w] = load_partial_word(row + 8 * w, 8);
    if (rem) out[full] = load_partial_word(row + 8 * full, rem);
  }
}

// Transposes database codes [j0, j0 + count) into a word-major tile of `padded` codes:
// tile[(g * W + w) * 8 + lane] = word w of code j0 + 8 g + lane; codes past `count` are zero.
void build_tile(const uint8_t* db, int64_t B, int64_t W, int64_t j0, int64_t count, int64_t padded,
                uint64_t* tile) {
  if (count < padded) std::memset(tile, 0, sizeof(uint64_t) * padded * W);
  const int64_t full = B / 8, rem = B % 8;
  const uint8_t* src = db + j0 * B;
  if (W == 1) {
    if (rem == 0) {
      std::memcpy(tile, src, sizeof(uint64_t) * count);
    } else {
      for (int64_t c = 0; c < count; ++c) tile[c] = load_partial_word(src + c * B, rem);
    }
    return;
  }
  for (int64_t c = 0; c < count; ++c) {
    const uint8_t* row = src + c * B;
    uint64_t* out = tile + (c / kGroup) * W * kGroup + (c % kGroup);
    for (int64_t w = 0; w < full; ++w) out[w * kGroup] = load_partial_word(row + 8 * w, 8);
    if (rem) out[full * kGroup] = load_partial_word(row + 8 * full, rem);
  }
}

// ------------------------------------------------------------------------------------------------
// Top-k state of one query in one database slice. Codes are offered in increasing index order,
// keys are (distance << shift) | index, and `thr` is an exact pruning threshold: a code can enter
// only if its distance is < thr (a code of distance >= thr is worse than `cap` codes kept already,
// since its index is larger). Two representations:
//
// * heap (small k): a max-heap of at most `cap` keys; thr = distance of the worst key once full.
// * counting (k >= 32, when a histogram of the distances 0 .. 8B is no larger than the key
//   buffer): keys are appended to a buffer of 2 * cap entries (in index order) and
//   hist[d] counts the appended codes of distance d. thr is kept equal to the smallest t with
//   #{appended codes of distance <= t} >= cap, and `below` = #{appended codes of distance < thr}
//   (< cap). All codes of the slice with distance < thr have been appended, so the top-cap keys
//   are those of distance < thr plus the first (cap - below) appended ones of distance == thr. A
//   full buffer is compacted to exactly those cap keys (order kept). Appending is O(1) and the
//   compaction O(cap) per cap appends, against O(log k) per insertion for the heap.
// ------------------------------------------------------------------------------------------------

struct TopK {
  uint64_t* keys = nullptr;  // heap: max-heap (keys[0] worst); counting: buffer in index order
  int32_t* hist = nullptr;   // counting mode only: hist[d] for d in 0 .. 8B
  int64_t size = 0;
  int64_t cap = 0;           // min(k, slice length) >= 1
  int64_t thr = kNotFull;    // a code enters only if its distance < thr
  int64_t below = 0;         // counting mode: appended codes with distance < thr
};

// Whether a slice with `cap` kept codes and distances up to max_dist uses the counting mode: for
// k >= 32 when the histogram (int32) takes no more memory than the 2 * cap keys.
bool use_counting(int64_t cap, int64_t max_dist) { return cap >= 32 && max_dist + 1 <= 4 * cap; }

void heap_insert(TopK& h, uint64_t key, int shift) {
  uint64_t* keys = h.keys;
  if (h.size < h.cap) {  // sift up
    int64_t pos = h.size++;
    while (pos > 0) {
      const int64_t parent = (pos - 1) >> 1;
      if (keys[parent] >= key) break;
      keys[pos] = keys[parent];
      pos = parent;
    }
    keys[pos] = key;
    if (h.size == h.cap) h.thr = static_cast<int64_t>(keys[0] >> shift);
    return;
  }
  // Full and key < keys[0] (its distance is < thr): replace the root and sift down.
  const int64_t n = h.size;
  int64_t pos = 0;
  for (;;) {
    int64_t child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && keys[child + 1] > keys[child]) ++child;
    if (keys[child] <= key) break;
    keys[pos] = keys[child];
    pos = child;
  }
  keys[pos] = key;
  h.thr = static_cast<int64_t>(keys[0] >> shift);
}

// Counting mode: keeps the keys of distance < thr and the first (cap - below) of distance == thr.
void counting_compact(TopK& h, int shift) {
  int64_t ties = h.cap - h.below;
  int64_t out = 0;
  const uint64_t thr = static_cast<uint64_t>(h.thr);
  for (int64_t i = 0; i < h.size; ++i) {
    const uint64_t d = h.keys[i] >> shift;
    if (d < thr || (d == thr && ties-- > 0)) h.keys[out++] = h.keys[i];
  }
  h.size = out;
}

void counting_insert(TopK& h, uint64_t key, uint64_t dist, int shift) {
  if (h.size == 2 * h.cap) counting_compact(h, shift);
  h.keys[h.size++] = key;
  ++h.hist[dist];
  if (++h.below >= h.cap) {
    do {
      --h.thr;
      h.below -= h.hist[h.thr];
    } while (h.below >= h.cap);
  }
}

// Offers the codes base + i for the set bits i of `lanes` (ascending) with distances dist[i] to h.
// `lanes` flags the codes whose distance was below h.thr when the vector kernel compared them;
// thr only decreases, so each one is checked again here.
SK_NOINLINE void offer(TopK& h, const uint64_t* dist, uint64_t lanes, int64_t base, int shift) {
  const bool counting = h.hist != nullptr;
  while (lanes != 0) {
    const int i = __builtin_ctzll(lanes);
    lanes &= lanes - 1;
    const uint64_t d = dist[i];
    if (static_cast<int64_t>(d) >= h.thr) continue;
    const uint64_t key = (d << shift) | static_cast<uint64_t>(base + i);
    if (counting) {
      counting_insert(h, key, d, shift);
    } else {
      heap_insert(h, key, shift);
    }
  }
}

// Bit mask of the first `count` lanes (count may exceed 64).
SK_INLINE uint64_t first_lanes(int64_t count) {
  return count >= 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1;
}

// The kept keys of h (at most cap, any order) once its slice has been scanned.
void finish(TopK& h, int shift) {
  if (h.hist != nullptr && h.size > h.cap) counting_compact(h, shift);
}

// Everything a scan of one tile needs.
struct TileJob {
  const uint64_t* tile;  // word-major, ngroups * W * 8 words
  int64_t ngroups;       // multiple of kGroupsPerStep
  int64_t W;
  const uint64_t* qwords;  // [nq, W] padded queries of the chunk
  int64_t nq;
  int64_t base;   // database index of the tile's first code
  int64_t count;  // valid codes in the tile
  // top-k mode
  TopK* heaps;  // one per query of the chunk
  int shift;
  // distance mode
  int32_t* out;  // &D[first query of the chunk, base]
  int64_t ldo;   // row stride of out
};

// ------------------------------------------------------------------------------------------------
// Portable kernels.
// ------------------------------------------------------------------------------------------------

SK_INLINE uint64_t popcount64(uint64_t x) {
#if defined(__POPCNT__) || !SUBKERN_X86
  return static_cast<uint64_t>(__builtin_popcountll(x));
#else
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return (x * 0x0101010101010101ULL) >> 56;
#endif
}

// dist[i] = distance of query words q to code 8 * g0 + i of the tile, i < kStepCodes.
SK_INLINE void portable_step(const TileJob& job, int64_t g0, const uint64_t* q, uint64_t* dist) {
  const int64_t W = job.W;
  for (int64_t i = 0; i < kStepCodes; ++i) dist[i] = 0;
  for (int64_t v = 0; v < kGroupsPerStep; ++v) {
    const uint64_t* grp = job.tile + (g0 + v) * W * kGroup;
    for (int64_t w = 0; w < W; ++w) {
      const uint64_t qw = q[w];
      for (int64_t l = 0; l < kGroup; ++l) {
        dist[v * kGroup + l] += popcount64(qw ^ grp[w * kGroup + l]);
      }
    }
  }
}

void topk_tile_portable(const TileJob& job) {
  uint64_t dist[kStepCodes];
  for (int64_t g0 = 0; g0 < job.ngroups; g0 += kGroupsPerStep) {
    const int64_t first = g0 * kGroup;
    const int64_t count = std::min<int64_t>(kStepCodes, job.count - first);
    for (int64_t q = 0; q < job.nq; ++q) {
      portable_step(job, g0, job.qwords + q * job.W, dist);
      TopK& h = job.heaps[q];
      const uint64_t thr = static_cast<uint64_t>(h.thr);
      uint64_t lanes = 0;
      for (int64_t i = 0; i < kStepCodes; ++i) lanes |= uint64_t(dist[i] < thr) << i;
      lanes &= first_lanes(count);
      if (lanes != 0) offer(h, dist, lanes, job.base + first, job.shift);
    }
  }
}

void distance_tile_portable(const TileJob& job) {
  uint64_t dist[kStepCodes];
  for (int64_t g0 = 0; g0 < job.ngroups; g0 += kGroupsPerStep) {
    const int64_t first = g0 * kGroup;
    const int64_t count = std::min<int64_t>(kStepCodes, job.count - first);
    for (int64_t q = 0; q < job.nq; ++q) {
      portable_step(job, g0, job.qwords + q * job.W, dist);
      int32_t* row = job.out + q * job.ldo + first;
      for (int64_t i = 0; i < count; ++i) row[i] = static_cast<int32_t>(dist[i]);
    }
  }
}

#if SUBKERN_X86
// ------------------------------------------------------------------------------------------------
// AVX-512 VPOPCNTDQ kernels: one zmm = word w of the 8 codes of a group.
// ------------------------------------------------------------------------------------------------
#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,popcnt")))

// acc[q][v] = distances of the 8 codes of group g0 + v to query q (64-bit lanes).
// WT > 0: compile-time word count; WT == 0: job.W at run time.
template <int WT, int Q>
SK_AVX512 SK_INLINE void avx512_accumulate(const TileJob& job, int64_t g0, const uint64_t* q,
                                           __m512i (&acc)[Q][kGroupsPerStep]) {
  constexpr int V = kGroupsPerStep;
  const int64_t W = WT > 0 ? WT : job.W;
  const uint64_t* grp = job.tile + g0 * W * kGroup;
  for (int i = 0; i < Q; ++i) {
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_si512();
  }
#pragma GCC unroll 4
  for (int64_t w = 0; w < W; ++w) {
    __m512i d[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) d[v] = _mm512_loadu_si512(grp + (v * W + w) * kGroup);
#pragma GCC unroll 8
    for (int i = 0; i < Q; ++i) {
      const __m512i qb = _mm512_set1_epi64(static_cast<long long>(q[i * W + w]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        acc[i][v] = _mm512_add_epi64(acc[i][v], _mm512_popcnt_epi64(_mm512_xor_si512(d[v], qb)));
      }
    }
  }
}

template <int WT, int Q>
SK_AVX512 void avx512_topk_queries(const TileJob& job, int64_t q0) {
  constexpr int V = kGroupsPerStep;
  static_assert(V == 4, "the survivor test below takes the minimum of 4 vectors");
  const int64_t W = WT > 0 ? WT : job.W;
  const uint64_t* q = job.qwords + q0 * W;
  TopK* heaps = job.heaps + q0;
  for (int64_t g0 = 0; g0 < job.ngroups; g0 += V) {
    __m512i acc[Q][V];
    avx512_accumulate<WT, Q>(job, g0, q, acc);
#pragma GCC unroll 8
    for (int i = 0; i < Q; ++i) {
      __m512i m = _mm512_min_epu64(_mm512_min_epu64(acc[i][0], acc[i][1]),
                                   _mm512_min_epu64(acc[i][2], acc[i][3]));
      const __m512i thr = _mm512_set1_epi64(heaps[i].thr);
      if (SK_UNLIKELY(_mm512_cmplt_epu64_mask(m, thr) != 0)) {
        alignas(64) uint64_t dist[kStepCodes];
        uint64_t lanes = 0;
        for (int v = 0; v < V; ++v) {
          _mm512_store_si512(dist + v * kGroup, acc[i][v]);
          lanes |= uint64_t(_mm512_cmplt_epu64_mask(acc[i][v], thr)) << (v * kGroup);
        }
        const int64_t first = g0 * kGroup;
        lanes &= first_lanes(job.count - first);
        if (lanes != 0) offer(heaps[i], dist, lanes, job.base + first, job.shift);
      }
    }
  }
}

template <int WT, int Q>
SK_AVX512 void avx512_distance_queries(const TileJob& job, int64_t q0) {
  constexpr int V = kGroupsPerStep;
  const int64_t W = WT > 0 ? WT : job.W;
  const uint64_t* q = job.qwords + q0 * W;
  for (int64_t g0 = 0; g0 < job.ngroups; g0 += V) {
    __m512i acc[Q][V];
    avx512_accumulate<WT, Q>(job, g0, q, acc);
    const int64_t first = g0 * kGroup;
#pragma GCC unroll 8
    for (int i = 0; i < Q; ++i) {
      int32_t* row = job.out + (q0 + i) * job.ldo + first;
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const int64_t valid = job.count - first - v * kGroup;
        const __m256i d32 = _mm512_cvtepi64_epi32(acc[i][v]);
        if (SK_LIKELY(valid >= kGroup)) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + v * kGroup), d32);
        } else if (valid > 0) {
          _mm256_mask_storeu_epi32(row + v * kGroup, static_cast<__mmask8>((1u << valid) - 1),
                                   d32);
        }
      }
    }
  }
}

// In-register transpose of an 8 x 8 matrix of 64-bit words: r[i][j] becomes r[j][i].
SK_AVX512 SK_INLINE void transpose8x8(__m512i (&r)[8]) {
  __m512i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);      // r_i[0] r_i+1[0] r_i[2] r_i+1[2] ...
    t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);  // r_i[1] r_i+1[1] r_i[3] r_i+1[3] ...
  }
  const __m512i even = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i odd = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  __m512i u[8];
  for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
    u[4 * h + 0] = _mm512_permutex2var_epi64(t[4 * h], even, t[4 * h + 2]);     // [0] | [4]
    u[4 * h + 1] = _mm512_permutex2var_epi64(t[4 * h + 1], even, t[4 * h + 3]);  // [1] | [5]
    u[4 * h + 2] = _mm512_permutex2var_epi64(t[4 * h], odd, t[4 * h + 2]);      // [2] | [6]
    u[4 * h + 3] = _mm512_permutex2var_epi64(t[4 * h + 1], odd, t[4 * h + 3]);   // [3] | [7]
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i64x2(u[j], u[4 + j], 0x44);      // 256-bit low halves: column j
    r[j + 4] = _mm512_shuffle_i64x2(u[j], u[4 + j], 0xEE);  // high halves: column j + 4
  }
}

// build_tile with AVX-512: each block of 8 codes x 8 words (64 bytes, zero-padded with masked
// loads) is transposed in registers; 1-, 2- and 4-byte codes are widened with VPMOVZX.
SK_AVX512 void build_tile_avx512(const uint8_t* db, int64_t B, int64_t W, int64_t j0,
                                 int64_t count, int64_t padded, uint64_t* tile) {
  const int64_t groups = count / kGroup;  // full groups; a partial last one goes the scalar way
  const uint8_t* src = db + j0 * B;
  if (W == 1 && (B == 1 || B == 2 || B == 4)) {
    if (count < padded) std::memset(tile, 0, sizeof(uint64_t) * padded);
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = src + g * kGroup * B;
      __m512i v;
      if (B == 1) {
        v = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
      } else if (B == 2) {
        v = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      } else {
        v = _mm512_cvtepu32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      }
      _mm512_storeu_si512(tile + g * kGroup, v);
    }
    for (int64_t c = groups * kGroup; c < count; ++c) tile[c] = load_partial_word(src + c * B, B);
    return;
  }
  if (W == 1) return build_tile(db, B, W, j0, count, padded, tile);
  if (count < padded) {
    std::memset(tile + groups * W * kGroup, 0, sizeof(uint64_t) * (padded - groups * kGroup) * W);
  }
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rows = src + g * kGroup * B;
    uint64_t* out = tile + g * W * kGroup;
    for (int64_t w0 = 0; w0 < W; w0 += 8) {
      const int64_t bytes = std::min<int64_t>(64, B - 8 * w0);
      const __mmask64 m = bytes == 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
      __m512i r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm512_maskz_loadu_epi8(m, rows + i * B + 8 * w0);
      transpose8x8(r);
      const int64_t nw = std::min<int64_t>(8, W - w0);
      if (nw == 8) {
        for (int j = 0; j < 8; ++j) _mm512_storeu_si512(out + (w0 + j) * kGroup, r[j]);
      } else {
        for (int j = 0; j < 8; ++j) {
          if (j < nw) _mm512_storeu_si512(out + (w0 + j) * kGroup, r[j]);
        }
      }
    }
  }
  // The partial last group (count % 8 codes), word by word.
  for (int64_t c = groups * kGroup; c < count; ++c) {
    const uint8_t* row = src + c * B;
    uint64_t* out = tile + (c / kGroup) * W * kGroup + (c % kGroup);
    for (int64_t w = 0; w < W; ++w) {
      out[w * kGroup] = load_partial_word(row + 8 * w, std::min<int64_t>(8, B - 8 * w));
    }
  }
}

template <int WT>
void avx512_topk_tile_w(const TileJob& job) {
  int64_t q0 = 0;
  for (; q0 + 4 <= job.nq; q0 += 4) avx512_topk_queries<WT, 4>(job, q0);
  for (; q0 < job.nq; ++q0) avx512_topk_queries<WT, 1>(job, q0);
}

template <int WT>
void avx512_distance_tile_w(const TileJob& job) {
  int64_t q0 = 0;
  for (; q0 + 4 <= job.nq; q0 += 4) avx512_distance_queries<WT, 4>(job, q0);
  for (; q0 < job.nq; ++q0) avx512_distance_queries<WT, 1>(job, q0);
}

void topk_tile_avx512(const TileJob& job) {
  switch (job.W) {
    case 1: return avx512_topk_tile_w<1>(job);
    case 2: return avx512_topk_tile_w<2>(job);
    case 3: return avx512_topk_tile_w<3>(job);
    case 4: return avx512_topk_tile_w<4>(job);
    default: return avx512_topk_tile_w<0>(job);
  }
}

void distance_tile_avx512(const TileJob& job) {
  switch (job.W) {
    case 1: return avx512_distance_tile_w<1>(job);
    case 2: return avx512_distance_tile_w<2>(job);
    case 3: return avx512_distance_tile_w<3>(job);
    case 4: return avx512_distance_tile_w<4>(job);
    default: return avx512_distance_tile_w<0>(job);
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 kernels: a group of 8 codes is two ymm registers (4 codes each); bits are counted per byte
// with the nibble table (VPSHUFB) and the byte counts summed into 64-bit lanes with VPSADBW.
// ------------------------------------------------------------------------------------------------
#define SK_AVX2 __attribute__((target("avx2,popcnt")))

// Byte counters hold at most 8 per word, so they are flushed every 31 words (31 * 8 < 256).
constexpr int64_t kAvx2Flush = 31;

// acc[q][h] = distances of codes 4h .. 4h + 3 of group g to query q (64-bit lanes).
template <int WT, int Q>
SK_AVX2 SK_INLINE void avx2_accumulate(const TileJob& job, int64_t g, const uint64_t* q,
                                       __m256i (&acc)[Q][2]) {
  const int64_t W = WT > 0 ? WT : job.W;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const uint64_t* grp = job.tile + g * W * kGroup;
  for (int i = 0; i < Q; ++i) acc[i][0] = acc[i][1] = zero;
  for (int64_t w0 = 0; w0 < W; w0 += kAvx2Flush) {
    const int64_t w1 = std::min<int64_t>(W, w0 + kAvx2Flush);
    __m256i bytes[Q][2];
    for (int i = 0; i < Q; ++i) bytes[i][0] = bytes[i][1] = zero;
#pragma GCC unroll 4
    for (int64_t w = w0; w < w1; ++w) {
      const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + w * kGroup));
      const __m256i d1 =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + w * kGroup + 4));
#pragma GCC unroll 4
      for (int i = 0; i < Q; ++i) {
        const __m256i qb = _mm256_set1_epi64x(static_cast<long long>(q[i * W + w]));
        const __m256i x0 = _mm256_xor_si256(d0, qb);
        const __m256i x1 = _mm256_xor_si256(d1, qb);
        const __m256i c0 = _mm256_add_epi8(
            _mm256_shuffle_epi8(lut, _mm256_and_si256(x0, low)),
            _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x0, 4), low)));
        const __m256i c1 = _mm256_add_epi8(
            _mm256_shuffle_epi8(lut, _mm256_and_si256(x1, low)),
            _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x1, 4), low)));
        bytes[i][0] = _mm256_add_epi8(bytes[i][0], c0);
        bytes[i][1] = _mm256_add_epi8(bytes[i][1], c1);
      }
    }
    for (int i = 0; i < Q; ++i) {
      acc[i][0] = _mm256_add_epi64(acc[i][0], _mm256_sad_epu8(bytes[i][0], zero));
      acc[i][1] = _mm256_add_epi64(acc[i][1], _mm256_sad_epu8(bytes[i][1], zero));
    }
  }
}

template <int WT, int Q>
SK_AVX2 void avx2_topk_queries(const TileJob& job, int64_t q0) {
  const int64_t W = WT > 0 ? WT : job.W;
  const uint64_t* q = job.qwords + q0 * W;
  TopK* heaps = job.heaps + q0;
  const int64_t ngroups = (job.count + kGroup - 1) / kGroup;
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i acc[Q][2];
    avx2_accumulate<WT, Q>(job, g, q, acc);
    for (int i = 0; i < Q; ++i) {
      const __m256i thr = _mm256_set1_epi64x(heaps[i].thr);
      const __m256i lt = _mm256_or_si256(_mm256_cmpgt_epi64(thr, acc[i][0]),
                                         _mm256_cmpgt_epi64(thr, acc[i][1]));
      if (SK_UNLIKELY(!_mm256_testz_si256(lt, lt))) {
        alignas(32) uint64_t dist[kGroup];
        _mm256_store_si256(reinterpret_cast<__m256i*>(dist), acc[i][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(dist + 4), acc[i][1]);
        const int64_t first = g * kGroup;
        uint64_t lanes = uint64_t(_mm256_movemask_pd(_mm256_castsi256_pd(
                             _mm256_cmpgt_epi64(thr, acc[i][0])))) |
                         uint64_t(_mm256_movemask_pd(_mm256_castsi256_pd(
                             _mm256_cmpgt_epi64(thr, acc[i][1])))) << 4;
        lanes &= first_lanes(job.count - first);
        if (lanes != 0) offer(heaps[i], dist, lanes, job.base + first, job.shift);
      }
    }
  }
}

template <int WT, int Q>
SK_AVX2 void avx2_distance_queries(const TileJob& job, int64_t q0) {
  const int64_t W = WT > 0 ? WT : job.W;
  const uint64_t* q = job.qwords + q0 * W;
  const int64_t ngroups = (job.count + kGroup - 1) / kGroup;
  // Gathers the low 32 bits of the four 64-bit lanes into the low 128 bits.
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int64_t g = 0; g < ngroups; ++g) {
    __m256i acc[Q][2];
    avx2_accumulate<WT, Q>(job, g, q, acc);
    const int64_t first = g * kGroup;
    const int64_t valid = std::min<int64_t>(kGroup, job.count - first);
    for (int i = 0; i < Q; ++i) {
      const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc[i][0], pick));
      const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(acc[i][1], pick));
      int32_t* row = job.out + (q0 + i) * job.ldo + first;
      if (SK_LIKELY(valid == kGroup)) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row), lo);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 4), hi);
      } else {
        alignas(32) int32_t tmp[kGroup];
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp), lo);
        _mm_store_si128(reinterpret_cast<__m128i*>(tmp + 4), hi);
        for (int64_t l = 0; l < valid; ++l) row[l] = tmp[l];
      }
    }
  }
}

template <int WT>
void avx2_topk_tile_w(const TileJob& job) {
  int64_t q0 = 0;
  for (; q0 + 2 <= job.nq; q0 += 2) avx2_topk_queries<WT, 2>(job, q0);
  for (; q0 < job.nq; ++q0) avx2_topk_queries<WT, 1>(job, q0);
}

template <int WT>
void avx2_distance_tile_w(const TileJob& job) {
  int64_t q0 = 0;
  for (; q0 + 2 <= job.nq; q0 += 2) avx2_distance_queries<WT, 2>(job, q0);
  for (; q0 < job.nq; ++q0) avx2_distance_queries<WT, 1>(job, q0);
}

void topk_tile_avx2(const TileJob& job) {
  switch (job.W) {
    case 1: return avx2_topk_tile_w<1>(job);
    case 2: return avx2_topk_tile_w<2>(job);
    case 4: return avx2_topk_tile_w<4>(job);
    default: return avx2_topk_tile_w<0>(job);
  }
}

void distance_tile_avx2(const TileJob& job) {
  switch (job.W) {
    case 1: return avx2_distance_tile_w<1>(job);
    case 2: return avx2_distance_tile_w<2>(job);
    case 4: return avx2_distance_tile_w<4>(job);
    default: return avx2_distance_tile_w<0>(job);
  }
}
#endif  // SUBKERN_X86

using BuildFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint64_t*);
using TileFn = void (*)(const TileJob&);

// The kernels of one instruction-set level.
struct Kernels {
  BuildFn build;
  TileFn topk;
  TileFn distance;
};

Kernels kernels_for(Isa isa) {
#if SUBKERN_X86
  if (isa == Isa::Avx512Vpopcnt) return {build_tile_avx512, topk_tile_avx512, distance_tile_avx512};
  if (isa == Isa::Avx2) return {build_tile, topk_tile_avx2, distance_tile_avx2};
#endif
  (void)isa;
  return {build_tile, topk_tile_portable, distance_tile_portable};
}

// ------------------------------------------------------------------------------------------------
// Threads and the database scan.
// ------------------------------------------------------------------------------------------------

using subkern::cpu::run_tasks;

// Number of threads for a*b*c word-pairs of work: torch's setting, fewer for small calls.
int64_t threads_for(int64_t a, int64_t b, int64_t c) {
  const int64_t requested = std::max<int64_t>(1, at::get_num_threads());
  const double work = static_cast<double>(a) * static_cast<double>(b) * static_cast<double>(c);
  const double enough = static_cast<double>(requested * kMinWorkPerThread);
  if (work >= enough) return requested;
  return std::max<int64_t>(1, static_cast<int64_t>(work) / kMinWorkPerThread);
}

// A 64-byte aligned buffer of n 64-bit words.
class AlignedWords {
 public:
  explicit AlignedWords(int64_t n) : storage_(static_cast<size_t>(n + 8)) {
    auto addr = reinterpret_cast<uintptr_t>(storage_.data());
    ptr_ = reinterpret_cast<uint64_t*>((addr + 63) & ~uintptr_t(63));
  }
  uint64_t* get() { return ptr_; }

 private:
  std::vector<uint64_t> storage_;
  uint64_t* ptr_;
};

// Scans database codes [j0, j1) tile by tile with the given per-tile kernel; `job` holds the
// query side (qwords, nq, heaps or out), the rest is filled in here.
void scan_database(const uint8_t* db, int64_t B, int64_t j0, int64_t j1, TileJob job,
                   BuildFn build, TileFn fn) {
  const int64_t W = job.W;
  const int64_t T = tile_codes(W);
  const bool direct = B == 8;  // 64-bit codes are already word-major
  AlignedWords buffer(T * W);
  int32_t* out0 = job.out;
  for (int64_t start = j0; start < j1; start += T) {
    const int64_t count = std::min(T, j1 - start);
    const int64_t padded = (count + kStepCodes - 1) / kStepCodes * kStepCodes;
    if (direct && count == padded) {
      job.tile = reinterpret_cast<const uint64_t*>(db + start * B);
    } else {
      build(db, B, W, start, count, padded, buffer.get());
      job.tile = buffer.get();
    }
    job.ngroups = padded / kGroup;
    job.base = start;
    job.count = count;
    if (out0 != nullptr) job.out = out0 + (start - j0);
    fn(job);
  }
}

// Bits needed for distances up to 8 * B: keys are (distance << shift) | index.
int key_shift(int64_t B) {
  int bits = 1;
  while ((int64_t(1) << bits) <= 8 * B) ++bits;
  return 64 - bits - 1;  // keys stay below 2^63
}

// Sorts the keys kept for one query and writes its k output slots.
void write_result(uint64_t* keys, int64_t size, int64_t k, int shift, int32_t* dist,
                  int64_t* idx) {
  std::sort(keys, keys + size);
  const uint64_t mask = (uint64_t(1) << shift) - 1;
  for (int64_t i = 0; i < size; ++i) {
    dist[i] = static_cast<int32_t>(keys[i] >> shift);
    idx[i] = static_cast<int64_t>(keys[i] & mask);
  }
  for (int64_t i = size; i < k; ++i) {
    dist[i] = INT32_MAX;
    idx[i] = -1;
  }
}

void check_codes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "subkern: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kByte, "subkern: ", name,
              " must have dtype torch.uint8 (packed binary codes), got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "subkern: ", name, " must be 2-D [n, nbytes], got ", t.dim(), "-D");
  TORCH_CHECK(t.layout() == at::kStrided, "subkern: ", name, " must be a dense tensor");
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  check_codes(a, na);
  check_codes(b, nb);
  TORCH_CHECK(a.size(1) == b.size(1), "subkern: ", na, " and ", nb,
              " must have the same code width, got ", a.size(1), " and ", b.size(1), " bytes");
}

// ------------------------------------------------------------------------------------------------
// The ops.
// ------------------------------------------------------------------------------------------------

at::Tensor hamming_distance_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in, "a", "b");
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t na = a.size(0), nb = b.size(0), B = a.size(1);
  at::Tensor out = at::empty({na, nb}, a.options().dtype(at::kInt));
  if (na == 0 || nb == 0) return out;
  if (B == 0) return out.zero_();
  const int64_t W = words_for(B);
  std::vector<uint64_t> qwords(static_cast<size_t>(na * W));
  pad_rows(a.data_ptr<uint8_t>(), na, B, W, qwords.data());
  const uint8_t* db = b.data_ptr<uint8_t>();
  int32_t* o = out.data_ptr<int32_t>();
  const Kernels kern = kernels_for(active_isa());

  // Split rows of a when there are enough of them, otherwise columns (codes of b).
  const int64_t nthreads = threads_for(na, nb, W);
  const bool split_rows = na >= 8 * nthreads;
  run_tasks(nthreads, [&](int64_t t) {
    TileJob job{};
    job.W = W;
    job.ldo = nb;
    if (split_rows) {
      const int64_t r0 = na * t / nthreads, r1 = na * (t + 1) / nthreads;
      job.qwords = qwords.data() + r0 * W;
      job.nq = r1 - r0;
      job.out = o + r0 * nb;
      if (job.nq > 0) scan_database(db, B, 0, nb, job, kern.build, kern.distance);
    } else {
      const int64_t c0 = nb * t / nthreads, c1 = nb * (t + 1) / nthreads;
      job.qwords = qwords.data();
      job.nq = na;
      job.out = o + c0;
      if (c1 > c0) scan_database(db, B, c0, c1, job, kern.build, kern.distance);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cpu(const at::Tensor& q_in,
                                                    const at::Tensor& db_in, int64_t k) {
  check_pair(q_in, db_in, "queries", "database");
  TORCH_CHECK(k > 0, "subkern: k must be positive, got ", k);
  const at::Tensor queries = q_in.contiguous();
  const at::Tensor database = db_in.contiguous();
  const int64_t nq = queries.size(0), n = database.size(0), B = queries.size(1);
  const int shift = key_shift(B);
  const int64_t max_dist = 8 * B;
  TORCH_CHECK(n <= (int64_t(1) << shift), "subkern: hamming_topk supports databases of at most 2^",
              shift, " codes of ", B, " bytes, got ", n);
  at::Tensor out_dist = at::empty({nq, k}, queries.options().dtype(at::kInt));
  at::Tensor out_idx = at::empty({nq, k}, queries.options().dtype(at::kLong));
  int32_t* od = out_dist.data_ptr<int32_t>();
  int64_t* oi = out_idx.data_ptr<int64_t>();
  if (nq == 0) return {out_dist, out_idx};
  if (n == 0 || B == 0) {
    // No codes: every slot is missing. Zero-width codes: all distances are 0, so the first
    // min(k, n) indices in order.
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t s = 0; s < k; ++s) {
        const bool present = s < n;
        od[i * k + s] = present ? 0 : INT32_MAX;
        oi[i * k + s] = present ? s : -1;
      }
    }
    return {out_dist, out_idx};
  }
  const int64_t W = words_for(B);
  std::vector<uint64_t> qwords(static_cast<size_t>(nq * W));
  pad_rows(queries.data_ptr<uint8_t>(), nq, B, W, qwords.data());
  const uint8_t* db = database.data_ptr<uint8_t>();
  const Kernels kern = kernels_for(active_isa());

  // Tasks form a grid of query chunks x database slices (nchunks * nslices = threads). Chunks
  // of at least kMinChunkQueries queries amortise the tile transposition; the remaining threads
  // split the database, and the slices' lists are merged by key afterwards.
  const int64_t nthreads = threads_for(nq, n, W);
  int64_t nchunks = 1;
  for (int64_t d = 1; d <= nthreads; ++d) {
    if (nthreads % d == 0 && d * kMinChunkQueries <= nq) nchunks = d;
  }
  const int64_t nslices = std::min(nthreads / nchunks, n);
  auto chunk_begin = [&](int64_t c) { return nq * c / nchunks; };

  struct Part {  // one task's lists: one TopK per query of its chunk, for its slice
    std::vector<uint64_t> keys;
    std::vector<TopK> heaps;
  };
  std::vector<Part> parts(static_cast<size_t>(nchunks * nslices));
  run_tasks(nchunks * nslices, [&](int64_t t) {
    const int64_t c = t / nslices, s = t % nslices;
    const int64_t q0 = chunk_begin(c), q1 = chunk_begin(c + 1);
    const int64_t j0 = n * s / nslices, j1 = n * (s + 1) / nslices;
    const int64_t cnt = q1 - q0;
    if (cnt == 0 || j1 == j0) return;
    const int64_t cap = std::min(k, j1 - j0);
    const bool counting = use_counting(cap, max_dist);
    const int64_t slots = counting ? 2 * cap : cap;
    std::vector<uint64_t> keys(static_cast<size_t>(cnt * slots));
    std::vector<int32_t> hist(counting ? static_cast<size_t>(cnt * (max_dist + 1)) : 0);
    std::vector<TopK> heaps(static_cast<size_t>(cnt));
    for (int64_t i = 0; i < cnt; ++i) {
      heaps[i].keys = keys.data() + i * slots;
      heaps[i].cap = cap;
      if (counting) {
        heaps[i].hist = hist.data() + i * (max_dist + 1);
        heaps[i].thr = max_dist + 1;
      }
    }
    TileJob job{};
    job.W = W;
    job.qwords = qwords.data() + q0 * W;
    job.nq = cnt;
    job.heaps = heaps.data();
    job.shift = shift;
    scan_database(db, B, j0, j1, job, kern.build, kern.topk);
    for (TopK& h : heaps) finish(h, shift);
    if (nslices == 1) {
      for (int64_t i = 0; i < cnt; ++i) {
        write_result(heaps[i].keys, heaps[i].size, k, shift, od + (q0 + i) * k, oi + (q0 + i) * k);
      }
    } else {
      for (TopK& h : heaps) h.hist = nullptr;  // `hist` dies with this task
      parts[t].keys = std::move(keys);  // moving keeps the buffer the heaps point into
      parts[t].heaps = std::move(heaps);
    }
  });
  if (nslices > 1) {
    // The k smallest keys of the union of the slices' lists are the global top-k.
    const int64_t nmerge =
        std::min(nthreads, 1 + nq * nslices * std::min(k, n) / kMinWorkPerThread);
    run_tasks(nmerge, [&](int64_t t) {
      std::vector<uint64_t> merged;
      for (int64_t i = nq * t / nmerge; i < nq * (t + 1) / nmerge; ++i) {
        int64_t c = 0;
        while (chunk_begin(c + 1) <= i) ++c;
        merged.clear();
        for (int64_t s = 0; s < nslices; ++s) {
          const Part& p = parts[c * nslices + s];
          if (p.heaps.empty()) continue;
          const TopK& h = p.heaps[i - chunk_begin(c)];
          merged.insert(merged.end(), h.keys, h.keys + h.size);
        }
        int64_t size = static_cast<int64_t>(merged.size());
        if (size > k) {
          std::nth_element(merged.begin(), merged.begin() + k, merged.end());
          size = k;
        }
        write_result(merged.data(), size, k, shift, od + i * k, oi + i * k);
      }
    });
  }
  return {out_dist, out_idx};
}

}  // namespace
}  // namespace subkern::cpu

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("hamming_distance", &subkern::cpu::hamming_distance_cpu);
  m.impl("hamming_topk", &subkern::cpu::hamming_topk_cpu);
}
