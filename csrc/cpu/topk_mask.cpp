// C++ CPU kernels of edge-popup's top-k score masking (schemas in subkern/ops/topk_mask.py):
//
//   topk_mask(scores, k) -> mask          0/1 in scores' dtype and shape
//   topk_mask_bool(scores, k) -> mask     the same mask as a bool tensor (for the masked layers)
//   topk_threshold(scores, k) -> 0-d      the smallest kept |score|
//   topk_mask_batched(scores[], k[]) -> masks[]
//
// Semantics (subkern/ops/topk_mask_reference.py): with n = numel, the kept count is
// keep = n - floor((1 - k) n) (edge-popup's GetSubnet); entries are ranked by (|s| descending,
// flat index ascending), NaN below every number, and the first `keep` are kept.
//
// Algorithm: selection on order-preserving integer keys, no sort.
// * Key. For |s| as IEEE bits with the sign cleared, unsigned integer order equals the order of
//   the magnitudes (+0 < denormals < normals < +inf); NaN patterns lie above +inf. The key is
//   bits + 1 for numbers and 0 for NaN, so key order = ranking order and key 0 = NaN. fp32, fp16
//   and bf16 use the fp32 bits (the conversion to fp32 is exact and monotone), 31 significant
//   bits; fp64 uses its own 63 bits.
// * Select: the threshold key T is the keep-th largest key and ties = keep - #{key > T} >= 1.
//   1. Bracket from a sample (a Floyd-Rivest style step): the keys of m evenly spaced entries
//      (m = 8192 for large tensors) give, by two nth_element calls on the sample, keys lo <= hi
//      such that the keep-th largest key lies in [lo, hi] with overwhelming probability (the
//      sample rank of the target +- 4 standard deviations). One pass over the tensor (AVX-512:
//      16 keys per step, compress-store of the candidates) counts above = #{key > hi} and gathers
//      the candidate keys in [lo, hi] (a few percent of n). If above < keep <= above + #cand the
//      threshold is the (keep - above)-th largest candidate, found the same way on the candidates
//      (sample, count, compact in place) until few are left, then by nth_element.
//   2. Whatever the sample says, the result is exact: if the bracket misses (adversarial layouts,
//      many equal scores overflowing the candidate buffer) the kernel falls back to a radix
//      select (histograms of 16-bit digits of the key, 11-bit for small tensors).
// * Mask. mask = key > T, or key == T for the first `ties` such entries in flat order. Threads
//   write chunks in parallel keeping every tie and counting them per chunk; an exclusive scan of
//   the chunk counts then tells each chunk how many of its ties are allowed, and only chunks with
//   too many re-scan to clear the excess. The result is independent of the thread count.
// * Threads: ATen's intra-op (OpenMP) pool through intraop_tasks (the GEMM threads of the masked
//   layers: a separate pool of std::threads would compete with their spinning workers), one
//   chunk per thread, a single thread below 2^16 entries per thread. The batched op runs small
//   layers concurrently (one thread each) and large layers one after the other with all threads.
#include "cpu/topk_select.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "cpu/cpu_features.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace subkern::cpu {

void intraop_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 0) return;
  if (ntasks == 1 || at::get_num_threads() <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  // One byte per task; the iterator hands each thread a contiguous range of them.
  at::Tensor ids = at::empty({ntasks}, at::TensorOptions().dtype(at::kByte));
  auto iter = at::TensorIteratorConfig()
                  .add_output(ids)
                  .resize_outputs(false)
                  .check_all_same_dtype(false)
                  .build();
  const char* base = static_cast<const char*>(ids.const_data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
        for (int64_t j = 0; j < n1; ++j) {
          const char* row = data[0] + j * strides[1];
          for (int64_t i = 0; i < n0; ++i) fn((row + i * strides[0]) - base);
        }
      },
      /*grain_size=*/1);
}

namespace {

// Ties at the threshold key found by each chunk (in flat order) -> how many of them each chunk
// may keep so that `kept_ties` are kept in all, the first ones in flat order (exclusive scan:
// allowed[t] = min(ties[t], max(0, kept_ties - ties before chunk t))). Returns whether some
// chunk must clear ties it marked.
bool allowed_ties(const std::vector<int64_t>& ties, int64_t kept_ties,
                  std::vector<int64_t>& allowed) {
  allowed.assign(ties.size(), 0);
  int64_t before = 0;
  bool fix = false;
  for (size_t t = 0; t < ties.size(); ++t) {
    allowed[t] = std::min(ties[t], std::max<int64_t>(0, kept_ties - before));
    before += ties[t];
    fix = fix || allowed[t] < ties[t];
  }
  return fix;
}

// Entries per thread below which a pass uses fewer threads.
constexpr int64_t kMinPerThread = int64_t(1) << 16;
// Batched op: layers at least this large run one after the other with all threads.
constexpr int64_t kLargeLayer = int64_t(1) << 18;
// Tensors below this size are selected from a copy of all keys (no sample).
constexpr int64_t kBracketMin = int64_t(1) << 14;
// Candidate sets up to this size are finished with nth_element.
constexpr int64_t kDirect = int64_t(1) << 12;
// Sample sizes: of the tensor and of a candidate set.
constexpr int64_t kSample = 2048;
constexpr int64_t kCandSample = 1024;
// Consecutive entries per sample place.
constexpr int64_t kSampleRun = 16;
// Software prefetch distance of the streaming passes, in float32 entries (2 KB ahead: the
// hardware prefetcher alone left the bracket pass at a third of the memory bandwidth).
constexpr int64_t kPrefetchAhead = 512;

// Radix fallback: bits resolved per histogram pass (16 for large tensors, else 11).
constexpr int kWideDigitBits = 16;
constexpr int kNarrowDigitBits = 11;
constexpr int64_t kWideDigitMin = int64_t(1) << 19;

}  // namespace

int64_t pass_threads(int64_t n) {
  const int64_t max_threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(max_threads, n / kMinPerThread));
}

namespace {

// Key traits: Key is the unsigned key type, kBits its significant bits.
template <typename scalar_t>
struct KeyOf {
  using Key = uint32_t;
  static constexpr int kBits = 31;
  static inline Key key(scalar_t x) {
    const float f = static_cast<float>(x);
    uint32_t b;
    std::memcpy(&b, &f, sizeof(b));
    b &= 0x7FFFFFFFu;
    // branch-free (vectorisable): b + 1 for numbers, 0 for NaN
    return (b + 1u) & (0u - static_cast<uint32_t>(b <= 0x7F800000u));
  }
  // |s| of a key (key 0 = NaN).
  static inline scalar_t value(Key k) {
    if (k == 0) return static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
    const uint32_t b = k - 1u;
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return static_cast<scalar_t>(f);
  }
};

template <>
struct KeyOf<double> {
  using Key = uint64_t;
  static constexpr int kBits = 63;
  static inline Key key(double x) {
    uint64_t b;
    std::memcpy(&b, &x, sizeof(b));
    b &= 0x7FFFFFFFFFFFFFFFull;
    return (b + 1ull) & (0ull - static_cast<uint64_t>(b <= 0x7FF0000000000000ull));
  }
  static inline double value(Key k) {
    if (k == 0) return std::numeric_limits<double>::quiet_NaN();
    const uint64_t b = k - 1u;
    double f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  }
};

template <typename Key>
struct Selection {
  Key threshold;  // the keep-th largest key
  int64_t ties;   // entries with key == threshold to keep (in flat order), >= 1
};

// ------------------------------------------------------------------------------------------
// Radix select (the fallback)
// ------------------------------------------------------------------------------------------

inline int pass_shift(int key_bits, int digit_bits, int p) {
  return std::max(key_bits - digit_bits * (p + 1), 0);
}

// Picks the digit of the bucket holding the `remaining`-th largest entry from the histogram;
// subtracts the entries of the higher buckets from `remaining`.
inline int64_t pick_bucket(const std::vector<int64_t>& hist, int64_t& remaining) {
  int64_t above = 0;
  for (int64_t b = static_cast<int64_t>(hist.size()) - 1; b >= 0; --b) {
    if (above + hist[b] >= remaining) {
      remaining -= above;
      return b;
    }
    above += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "topk_mask: histogram holds fewer entries than the kept count");
  return 0;
}

// Radix select of the keep-th largest key of x[0, n), 1 <= keep <= n: a histogram of the top
// digit over all entries, then of the next digit over the entries whose higher digits equal the
// threshold's known prefix (pass 1 also gathers these keys, later passes read only them).
template <typename scalar_t>
Selection<typename KeyOf<scalar_t>::Key> radix_select(const scalar_t* x, int64_t n, int64_t keep) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  constexpr int kBits = K::kBits;
  const int digit_bits = n >= kWideDigitMin ? kWideDigitBits : kNarrowDigitBits;
  const int npass = (kBits + digit_bits - 1) / digit_bits;
  const int64_t nthreads = pass_threads(n);
  auto chunk = [&](int64_t t, int64_t total) {
    return std::make_pair(total * t / nthreads, total * (t + 1) / nthreads);
  };
  Key prefix = 0;
  int64_t remaining = keep;
  std::vector<std::vector<int64_t>> hists(nthreads);
  std::vector<std::vector<Key>> cand(nthreads);
  bool have_cand = false;
  int hi = kBits;
  for (int p = 0; p < npass; ++p) {
    const int shift = pass_shift(kBits, digit_bits, p);
    const int64_t nb = int64_t(1) << (hi - shift);
    const Key dmask = static_cast<Key>(nb - 1);
    const Key want = prefix >> hi;  // higher digits already fixed
    const bool gather = (p == 1);
    intraop_tasks(nthreads, [&](int64_t t) {
      auto& h = hists[t];
      h.assign(nb, 0);
      if (p == 0) {
        const auto [i0, i1] = chunk(t, n);
        for (int64_t i = i0; i < i1; ++i) ++h[(K::key(x[i]) >> shift) & dmask];
      } else if (!have_cand) {
        const auto [i0, i1] = chunk(t, n);
        auto& c = cand[t];
        c.clear();
        for (int64_t i = i0; i < i1; ++i) {
          const Key key = K::key(x[i]);
          if ((key >> hi) == want) {
            ++h[(key >> shift) & dmask];
            if (gather) c.push_back(key);
          }
        }
      } else {
        auto& c = cand[t];
        size_t out = 0;
        for (const Key key : c) {
          if ((key >> hi) == want) {
            ++h[(key >> shift) & dmask];
            c[out++] = key;
          }
        }
        c.resize(out);
      }
    });
    if (gather) have_cand = true;
    std::vector<int64_t> total(nb, 0);
    for (const auto& h : hists) {
      for (int64_t b = 0; b < nb; ++b) total[b] += h[b];
    }
    const int64_t digit = pick_bucket(total, remaining);
    prefix |= static_cast<Key>(digit) << shift;
    hi = shift;
  }
  return {prefix, remaining};
}

// ------------------------------------------------------------------------------------------
// Sample-bracket select
// ------------------------------------------------------------------------------------------

// From a sample of the keys of a set of n entries, a bracket [lo, hi] expected to hold the
// keep-th largest key of the set: the sample's order statistics 4 standard deviations of the
// sample rank either side of the target (hi = max when that reaches the top, lo = 0 the bottom).
// Reorders `sample`.
template <typename Key>
void choose_bracket(std::vector<Key>& sample, int64_t n, int64_t keep, Key& lo, Key& hi) {
  const auto m = static_cast<int64_t>(sample.size());
  const double q = static_cast<double>(keep) / static_cast<double>(n);
  const double pos = q * static_cast<double>(m) - 1.0;  // 0-based rank in descending order
  const double d = 4.0 * std::sqrt(static_cast<double>(m) * q * (1.0 - q)) + 2.0;
  const auto hi_idx = static_cast<int64_t>(std::floor(pos - d));
  const auto lo_idx = static_cast<int64_t>(std::ceil(pos + d));
  const auto desc = std::greater<Key>();
  int64_t start = 0;
  if (hi_idx < 0) {
    hi = std::numeric_limits<Key>::max();
  } else {
    std::nth_element(sample.begin(), sample.begin() + hi_idx, sample.end(), desc);
    hi = sample[hi_idx];
    start = hi_idx + 1;
  }
  if (lo_idx >= m) {
    lo = 0;
  } else {
    std::nth_element(sample.begin() + start, sample.begin() + lo_idx, sample.end(), desc);
    lo = sample[lo_idx];
  }
}

// Bracket step on a candidate set: above = #{key > hi}; the keys in [lo, hi] copied to out in
// order; returns their count. out may not alias keys. Portable version.
template <typename Key>
int64_t bracket_keys(const Key* __restrict__ keys, int64_t c, Key lo, Key hi,
                     Key* __restrict__ out, int64_t& above) {
  int64_t a = 0, nc = 0;
  for (int64_t i = 0; i < c; ++i) {
    const Key key = keys[i];
    a += key > hi;
    out[nc] = key;
    nc += (key >= lo) & (key <= hi);
  }
  above = a;
  return nc;
}

#if defined(__x86_64__)
// AVX-512 version for 32-bit keys (out needs 16 entries of slack).
__attribute__((target("avx512f,popcnt"))) int64_t bracket_keys_avx512(
    const uint32_t* keys, int64_t c, uint32_t lo, uint32_t hi, uint32_t* out, int64_t& above) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
  int64_t a = 0, nc = 0, i = 0;
  for (; i + 16 <= c; i += 16) {
    const __m512i key = _mm512_loadu_si512(keys + i);
    a += __builtin_popcount(static_cast<unsigned>(_mm512_cmpgt_epu32_mask(key, vhi)));
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(key, vlo), key, vhi);
    _mm512_storeu_si512(out + nc, _mm512_maskz_compress_epi32(in, key));
    nc += __builtin_popcount(static_cast<unsigned>(in));
  }
  int64_t a_tail = 0;
  nc += bracket_keys<uint32_t>(keys + i, c - i, lo, hi, out + nc, a_tail);
  above = a + a_tail;
  return nc;
}
#endif

template <typename Key>
int64_t bracket_keys_dispatch(const Key* keys, int64_t c, Key lo, Key hi, Key* out,
                              int64_t& above) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<Key, uint32_t>) {
    if (active_isa() == Isa::Avx512Vpopcnt) return bracket_keys_avx512(keys, c, lo, hi, out, above);
  }
#endif
  return bracket_keys<Key>(keys, c, lo, hi, out, above);
}

// The r-th largest key (1 <= r <= c) of keys[0, c) and ties = r - #{key > it}. keys and spare
// (both of c + 16 entries) are overwritten.
template <typename Key>
Selection<Key> select_keys(Key* keys, Key* spare, int64_t c, int64_t r) {
  while (c > kDirect) {
    const int64_t m = std::min<int64_t>(kCandSample, c / 8);
    std::vector<Key> sample(m);
    for (int64_t j = 0; j < m; ++j) sample[j] = keys[(2 * j + 1) * c / (2 * m)];
    Key lo, hi;
    choose_bracket(sample, c, r, lo, hi);
    int64_t above = 0;
    const int64_t inside = bracket_keys_dispatch<Key>(keys, c, lo, hi, spare, above);
    if (!(above < r && above + inside >= r) || inside == c) break;  // missed: finish directly
    std::swap(keys, spare);
    c = inside;
    r -= above;
  }
  std::nth_element(keys, keys + (r - 1), keys + c, std::greater<Key>());
  const Key t = keys[r - 1];
  int64_t greater = 0;
  for (int64_t i = 0; i < c; ++i) greater += keys[i] > t;
  return {t, r - greater};
}

// One chunk of the bracket pass: above += #{key > hi}; the keys in [lo, hi] appended to cand
// (capacity cap; *overflow set when more are found). Portable version.
template <typename scalar_t>
void bracket_chunk(const scalar_t* __restrict__ x, int64_t n, typename KeyOf<scalar_t>::Key lo,
                   typename KeyOf<scalar_t>::Key hi, typename KeyOf<scalar_t>::Key* cand,
                   int64_t cap, int64_t& above, int64_t& ncand, bool& overflow) {
  using K = KeyOf<scalar_t>;
  int64_t a = 0, nc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto key = K::key(x[i]);
    a += key > hi;
    if (key >= lo && key <= hi) {
      if (nc < cap) cand[nc] = key;
      ++nc;
    }
  }
  above = a;
  overflow = nc > cap;
  ncand = std::min(nc, cap);
}

#if defined(__x86_64__)
// AVX-512 version for float32 (cand needs 16 entries of slack beyond cap). Branch-free: every
// step compress-stores 16 lanes and advances by the number of candidates (a branch on "any
// candidate here" would be mispredicted half of the time); capacity is checked per block.
__attribute__((target("avx512f,popcnt"))) void bracket_chunk_f32_avx512(
    const float* x, int64_t n, uint32_t lo, uint32_t hi, uint32_t* cand, int64_t cap,
    int64_t& above, int64_t& ncand, bool& overflow) {
  constexpr int64_t kBlock = 1024;
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
  int64_t a = 0, nc = 0, i = 0;
  overflow = false;
  while (i + 16 <= n) {
    if (nc + kBlock > cap) {  // the sample was far off: the caller falls back
      overflow = true;
      above = a;
      ncand = nc;
      return;
    }
    const int64_t end = i + std::min<int64_t>(kBlock, (n - i) / 16 * 16);
    for (; i < end; i += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(x + i + kPrefetchAhead), _MM_HINT_T0);
      const __m512i b = _mm512_and_si512(_mm512_loadu_si512(x + i), absmask);
      const __m512i key = _mm512_maskz_add_epi32(_mm512_cmple_epu32_mask(b, inf), b, one);
      a += __builtin_popcount(static_cast<unsigned>(_mm512_cmpgt_epu32_mask(key, vhi)));
      const __mmask16 in =
          _mm512_mask_cmple_epu32_mask(_mm512_cmpge_epu32_mask(key, vlo), key, vhi);
      _mm512_storeu_si512(cand + nc, _mm512_maskz_compress_epi32(in, key));
      nc += __builtin_popcount(static_cast<unsigned>(in));
    }
  }
  int64_t a_tail = 0, nc_tail = 0;
  bracket_chunk<float>(x + i, n - i, lo, hi, cand + nc, cap - nc, a_tail, nc_tail, overflow);
  above = a + a_tail;
  ncand = nc + nc_tail;
}
#endif

template <typename scalar_t>
void bracket_pass_chunk(const scalar_t* x, int64_t n, typename KeyOf<scalar_t>::Key lo,
                        typename KeyOf<scalar_t>::Key hi, typename KeyOf<scalar_t>::Key* cand,
                        int64_t cap, int64_t& above, int64_t& ncand, bool& overflow) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (active_isa() == Isa::Avx512Vpopcnt) {
      bracket_chunk_f32_avx512(x, n, lo, hi, cand, cap, above, ncand, overflow);
      return;
    }
  }
#endif
  bracket_chunk<scalar_t>(x, n, lo, hi, cand, cap, above, ncand, overflow);
}

// The keep-th largest key of x[0, n) (1 <= keep <= n) and its ties (see the file comment).
template <typename scalar_t>
Selection<typename KeyOf<scalar_t>::Key> select_top(const scalar_t* x, int64_t n, int64_t keep) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  if (n < kBracketMin) {
    std::vector<Key> keys(2 * (n + 16));
    for (int64_t i = 0; i < n; ++i) keys[i] = K::key(x[i]);
    return select_keys(keys.data(), keys.data() + n + 16, n, keep);
  }
  // kSampleRun consecutive entries at each of m / kSampleRun evenly spaced places: one cache
  // line per place for float32 (a strided sample would miss the cache once per key)
  const int64_t places = std::min<int64_t>(kSample, n / 16) / kSampleRun;
  const int64_t m = places * kSampleRun;
  std::vector<Key> sample(m);
  for (int64_t j = 0; j < places; ++j) {
    const int64_t at = (2 * j + 1) * (n - kSampleRun) / (2 * places);
    for (int64_t r = 0; r < kSampleRun; ++r) sample[j * kSampleRun + r] = K::key(x[at + r]);
  }
  Key lo, hi;
  choose_bracket(sample, n, keep, lo, hi);

  const int64_t nthreads = pass_threads(n);
  // Expected candidates: ~8 sd of the sample rank = 4 / sqrt(m) of n at most; room for 3x that.
  const auto expect = static_cast<int64_t>(12.0 * static_cast<double>(n) /
                                           std::sqrt(static_cast<double>(m)));
  const int64_t cap = expect / nthreads + 1024;
  const int64_t stride = cap + 16;
  std::unique_ptr<Key[]> buffer(new Key[stride * nthreads]);
  std::vector<int64_t> above(nthreads), ncand(nthreads);
  std::unique_ptr<bool[]> overflow(new bool[nthreads]);
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t i0 = n * t / nthreads, i1 = n * (t + 1) / nthreads;
    bracket_pass_chunk<scalar_t>(x + i0, i1 - i0, lo, hi, buffer.get() + t * stride, cap,
                                 above[t], ncand[t], overflow[t]);
  });
  int64_t total_above = 0, total_cand = 0;
  bool over = false;
  for (int64_t t = 0; t < nthreads; ++t) {
    total_above += above[t];
    total_cand += ncand[t];
    over = over || overflow[t];
  }
  if (over || !(total_above < keep && total_above + total_cand >= keep)) {
    return radix_select<scalar_t>(x, n, keep);  // the sample missed: exact fallback
  }
  // gather the per-thread candidates at the front of the buffer
  int64_t c = ncand[0];
  for (int64_t t = 1; t < nthreads; ++t) {
    std::memmove(buffer.get() + c, buffer.get() + t * stride, sizeof(Key) * ncand[t]);
    c += ncand[t];
  }
  std::unique_ptr<Key[]> spare(new Key[c + 16]);
  return select_keys(buffer.get(), spare.get(), c, keep - total_above);
}

// ------------------------------------------------------------------------------------------
// Mask
// ------------------------------------------------------------------------------------------

// out[i] = (key(x[i]) >= T) for i < n; returns #{key == T}. restrict pointers and values in
// locals, so that the loop vectorises. out_t: scalar_t (0/1) or bool.
template <typename scalar_t, typename out_t>
int64_t mask_chunk(const scalar_t* __restrict__ x, int64_t n, typename KeyOf<scalar_t>::Key T,
                   out_t* __restrict__ out) {
  using K = KeyOf<scalar_t>;
  int64_t eq = 0;
  if constexpr (std::is_same_v<out_t, bool>) {
    auto* o = reinterpret_cast<uint8_t*>(out);
    for (int64_t i = 0; i < n; ++i) {
      const auto key = K::key(x[i]);
      eq += (key == T);
      o[i] = static_cast<uint8_t>(key >= T);
    }
  } else {
    const out_t one = static_cast<out_t>(1), zero = static_cast<out_t>(0);
    for (int64_t i = 0; i < n; ++i) {
      const auto key = K::key(x[i]);
      eq += (key == T);
      out[i] = key >= T ? one : zero;
    }
  }
  return eq;
}

#if defined(__x86_64__)
// AVX-512 mask_chunk for float32 scores (out: float 0/1 or bool).
template <typename out_t>
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) int64_t mask_chunk_f32_avx512(
    const float* x, int64_t n, uint32_t T, out_t* out) {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 fone = _mm512_set1_ps(1.0f);
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(T));
  int64_t eq = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(x + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512i b = _mm512_and_si512(_mm512_loadu_si512(x + i), absmask);
    const __m512i key = _mm512_maskz_add_epi32(_mm512_cmple_epu32_mask(b, inf), b, one);
    const __mmask16 keep = _mm512_cmpge_epu32_mask(key, vt);
    eq += __builtin_popcount(static_cast<unsigned>(_mm512_cmpeq_epi32_mask(key, vt)));
    if constexpr (std::is_same_v<out_t, bool>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_maskz_set1_epi8(keep, 1));
    } else {
      _mm512_storeu_ps(out + i, _mm512_maskz_mov_ps(keep, fone));
    }
  }
  return eq + mask_chunk<float, out_t>(x + i, n - i, T, out + i);
}
#endif

// Writes the mask of x[0, n) given the selection (see the file comment).
template <typename scalar_t, typename out_t>
void write_mask(const scalar_t* x, int64_t n, const Selection<typename KeyOf<scalar_t>::Key>& sel,
                out_t* out) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  const int64_t nthreads = pass_threads(n);
  const Key T = sel.threshold;
  std::vector<int64_t> ties(nthreads, 0);
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t i0 = n * t / nthreads, i1 = n * (t + 1) / nthreads;
#if defined(__x86_64__)
    if constexpr (std::is_same_v<scalar_t, float> &&
                  (std::is_same_v<out_t, float> || std::is_same_v<out_t, bool>)) {
      if (active_isa() == Isa::Avx512Vpopcnt) {
        ties[t] = mask_chunk_f32_avx512<out_t>(x + i0, i1 - i0, T, out + i0);
        return;
      }
    }
#endif
    ties[t] = mask_chunk<scalar_t, out_t>(x + i0, i1 - i0, T, out + i0);
  });
  std::vector<int64_t> allowed;
  if (!allowed_ties(ties, sel.ties, allowed)) return;
  intraop_tasks(nthreads, [&](int64_t t) {
    if (allowed[t] == ties[t]) return;
    const int64_t i0 = n * t / nthreads, i1 = n * (t + 1) / nthreads;
    int64_t left = allowed[t];
    for (int64_t i = i0; i < i1; ++i) {
      if (K::key(x[i]) == T) {
        if (left > 0) {
          --left;
        } else {
          out[i] = static_cast<out_t>(0);
        }
      }
    }
  });
}

int64_t kept_count(int64_t n, double k) {
  return n - static_cast<int64_t>(std::floor((1.0 - k) * static_cast<double>(n)));
}

void check_scores(const at::Tensor& scores, double k, const char* op) {
  TORCH_CHECK(scores.device().is_cpu(), "subkern.", op, " (cpp): scores must be a CPU tensor");
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "subkern.", op, ": scores must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(k > 0.0 && k <= 1.0, "subkern.", op, ": k must be in (0, 1], got ", k);
}

// Mask of one tensor into `out` (contiguous, numel of scores; scores' dtype or bool).
void mask_into(const at::Tensor& scores, double k, at::Tensor& out) {
  const at::Tensor x = scores.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t keep = kept_count(n, k);
  const bool as_bool = out.scalar_type() == at::kBool;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_mask", [&] {
    auto run = [&](auto* o) {
      using out_t = std::remove_pointer_t<decltype(o)>;
      if (keep <= 0 || keep >= n) {  // keep <= 0: k so small that (1 - k) rounds to 1
        std::fill(o, o + n, static_cast<out_t>(keep > 0 ? 1 : 0));
        return;
      }
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      const auto sel = select_top<scalar_t>(px, n, keep);
      write_mask<scalar_t, out_t>(px, n, sel, o);
    };
    if (as_bool) {
      run(out.data_ptr<bool>());
    } else {
      run(out.data_ptr<scalar_t>());
    }
  });
}

at::Tensor topk_mask_cpu(const at::Tensor& scores, double k) {
  check_scores(scores, k, "topk_mask");
  at::Tensor out = at::empty(scores.sizes(), scores.options().memory_format(
                                                 at::MemoryFormat::Contiguous));
  mask_into(scores, k, out);
  return out;
}

at::Tensor topk_mask_bool_cpu(const at::Tensor& scores, double k) {
  check_scores(scores, k, "topk_mask_bool");
  at::Tensor out = at::empty(scores.sizes(), scores.options().dtype(at::kBool).memory_format(
                                                 at::MemoryFormat::Contiguous));
  mask_into(scores, k, out);
  return out;
}

at::Tensor topk_threshold_cpu(const at::Tensor& scores, double k) {
  check_scores(scores, k, "topk_threshold");
  const at::Tensor x = scores.contiguous();
  const int64_t n = x.numel();
  const int64_t keep = kept_count(n, k);
  at::Tensor out = at::empty({}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_threshold",
                                  [&] {
    using K = KeyOf<scalar_t>;
    if (keep <= 0) {
      out.fill_(std::numeric_limits<double>::infinity());
      return;
    }
    const auto sel = select_top<scalar_t>(x.const_data_ptr<scalar_t>(), n, keep);
    *out.data_ptr<scalar_t>() = K::value(sel.threshold);
  });
  return out;
}

std::vector<at::Tensor> topk_mask_batched_cpu(at::TensorList scores, at::ArrayRef<double> ks) {
  TORCH_CHECK(ks.size() == scores.size(), "subkern.topk_mask_batched: got ", scores.size(),
              " score tensors but ", ks.size(), " values of k");
  std::vector<at::Tensor> outs;
  outs.reserve(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    check_scores(scores[i], ks[i], "topk_mask_batched");
    outs.push_back(at::empty(scores[i].sizes(), scores[i].options().memory_format(
                                                    at::MemoryFormat::Contiguous)));
  }
  // Large layers: one after the other, each with all threads.
  std::vector<size_t> small;
  for (size_t i = 0; i < scores.size(); ++i) {
    if (scores[i].numel() >= kLargeLayer) {
      mask_into(scores[i], ks[i], outs[i]);
    } else {
      small.push_back(i);
    }
  }
  // Small layers: a shared queue served by the threads, one thread per layer (inside the
  // parallel region every nested pass runs on its calling thread).
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()),
                                            static_cast<int64_t>(small.size()));
  intraop_tasks(workers, [&](int64_t) {
    for (size_t j = next.fetch_add(1); j < small.size(); j = next.fetch_add(1)) {
      mask_into(scores[small[j]], ks[small[j]], outs[small[j]]);
    }
  });
  return outs;
}

// ------------------------------------------------------------------------------------------
// Selection fused with W_eff = W * M (the masked layers' forward)
// ------------------------------------------------------------------------------------------

// mask[i] = key(s[i]) >= T, weff[i] = w[i] * mask[i], wsign[i] = w[i] * sign(s[i]) where
// sign(s[i]) != 0 and NaN where s[i] is +-0 or NaN (the marker that tells the backward to form
// (G * W) * sign(S) from W and S for that entry); returns #{key == T}. Portable.
template <typename scalar_t>
int64_t mask_apply_chunk(const scalar_t* __restrict s, const scalar_t* __restrict w, int64_t n,
                         typename KeyOf<scalar_t>::Key T, uint8_t* __restrict m,
                         scalar_t* __restrict weff, scalar_t* __restrict wsign) {
  using K = KeyOf<scalar_t>;
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<A>::quiet_NaN());
  int64_t eq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto key = K::key(s[i]);
    eq += (key == T);
    const uint8_t keep = static_cast<uint8_t>(key >= T);
    m[i] = keep;
    const A wi = static_cast<A>(w[i]);
    weff[i] = static_cast<scalar_t>(wi * static_cast<A>(keep));
    const A si = static_cast<A>(s[i]);
    wsign[i] = si > A(0) ? w[i] : (si < A(0) ? static_cast<scalar_t>(-wi) : nan);
  }
  return eq;
}

#if defined(__x86_64__)
// AVX-512 mask_apply_chunk for float32. W_eff and W * sign(S) go out with non-temporal stores
// when 64-byte aligned (the GEMM and the backward read them later, once; a regular store would
// first read every line): about half the time of the pass on a memory-bound core. w * (+-1) is
// w with the sign bit of s xor-ed in (exact, as the multiplication).
__attribute__((target("avx512f,avx512bw,avx512vl,popcnt"))) int64_t
mask_apply_chunk_f32_avx512(const float* s, const float* w, int64_t n, uint32_t T, uint8_t* m,
                            float* weff, float* wsign) {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i signbit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i inf = _mm512_set1_epi32(0x7F800000);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 fone = _mm512_set1_ps(1.0f);
  const __m512 fnan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m512i vt = _mm512_set1_epi32(static_cast<int>(T));
  const bool stream = ((reinterpret_cast<uintptr_t>(weff) | reinterpret_cast<uintptr_t>(wsign)) &
                       63) == 0;
  int64_t eq = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(s + i + kPrefetchAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchAhead), _MM_HINT_T0);
    const __m512i raw = _mm512_loadu_si512(s + i);
    const __m512i b = _mm512_and_si512(raw, absmask);
    const __m512i key = _mm512_maskz_add_epi32(_mm512_cmple_epu32_mask(b, inf), b, one);
    const __mmask16 keep = _mm512_cmpge_epu32_mask(key, vt);
    eq += __builtin_popcount(static_cast<unsigned>(_mm512_cmpeq_epi32_mask(key, vt)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(m + i), _mm_maskz_set1_epi8(keep, 1));
    const __m512 vw = _mm512_loadu_ps(w + i);
    // w * 1.0f or w * 0.0f: the reference's product, bit for bit
    const __m512 prod = _mm512_mul_ps(vw, _mm512_maskz_mov_ps(keep, fone));
    // sign(s) != 0 <=> key > 1 (key 1: s = +-0, key 0: NaN)
    const __mmask16 nonzero = _mm512_cmpgt_epu32_mask(key, one);
    const __m512 flipped = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(vw), _mm512_and_si512(raw, signbit)));
    const __m512 ws = _mm512_mask_mov_ps(fnan, nonzero, flipped);
    if (stream) {  // measured: streaming both beats regular stores for either
      _mm512_stream_ps(weff + i, prod);
      _mm512_stream_ps(wsign + i, ws);
    } else {
      _mm512_storeu_ps(weff + i, prod);
      _mm512_storeu_ps(wsign + i, ws);
    }
  }
  if (stream) _mm_sfence();
  return eq + mask_apply_chunk<float>(s + i, w + i, n - i, T, m + i, weff + i, wsign + i);
}
#endif

template <typename scalar_t>
void mask_apply(const scalar_t* s, const scalar_t* w, int64_t n, int64_t keep, uint8_t* m,
                scalar_t* weff, scalar_t* wsign) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  Selection<Key> sel{0, 0};  // key >= 0 for every entry: everything kept
  if (keep <= 0) {
    sel = {std::numeric_limits<Key>::max(), 0};  // nothing kept (no key reaches the max)
  } else if (keep < n) {
    sel = select_top<scalar_t>(s, n, keep);
  }
  const Key T = sel.threshold;
  const int64_t nthreads = pass_threads(n);
  std::vector<int64_t> ties(nthreads, 0);
  // chunk bounds: multiples of 16 entries (64-byte aligned rows of W_eff for streaming stores)
  auto bound = [&](int64_t t) { return t == nthreads ? n : (n * t / nthreads) & ~int64_t(15); };
  intraop_tasks(nthreads, [&](int64_t t) {
    const int64_t i0 = bound(t), i1 = bound(t + 1);
#if defined(__x86_64__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (active_isa() == Isa::Avx512Vpopcnt) {
        ties[t] = mask_apply_chunk_f32_avx512(s + i0, w + i0, i1 - i0, T, m + i0, weff + i0,
                                              wsign + i0);
        return;
      }
    }
#endif
    ties[t] = mask_apply_chunk<scalar_t>(s + i0, w + i0, i1 - i0, T, m + i0, weff + i0,
                                         wsign + i0);
  });
  if (keep <= 0 || keep >= n) return;  // no ties to settle
  // ties beyond the kept count: cleared in flat order, as write_mask
  std::vector<int64_t> allowed;
  if (!allowed_ties(ties, sel.ties, allowed)) return;
  intraop_tasks(nthreads, [&](int64_t t) {
    if (allowed[t] == ties[t]) return;
    const int64_t i0 = bound(t), i1 = bound(t + 1);
    int64_t left = allowed[t];
    for (int64_t i = i0; i < i1; ++i) {
      if (K::key(s[i]) == T) {
        if (left > 0) {
          --left;
        } else {
          m[i] = 0;
          weff[i] = static_cast<scalar_t>(static_cast<A>(w[i]) * A(0));
        }
      }
    }
  });
}

}  // namespace

void topk_mask_apply_into(const at::Tensor& scores, double k, const at::Tensor& weight,
                          at::Tensor& mask, at::Tensor& weff, at::Tensor& wsign) {
  check_scores(scores, k, "masked_linear_select");
  TORCH_CHECK(weight.scalar_type() == scores.scalar_type() && weight.is_contiguous() &&
                  weight.numel() == scores.numel(),
              "topk_mask_apply_into: weight must be contiguous, of scores' dtype and numel");
  for (const at::Tensor* t : {&weff, &wsign}) {
    TORCH_CHECK(t->scalar_type() == weight.scalar_type() && t->is_contiguous() &&
                    t->numel() == scores.numel(),
                "topk_mask_apply_into: bad output tensors");
  }
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                  mask.numel() == scores.numel(),
              "topk_mask_apply_into: bad output tensors");
  const at::Tensor x = scores.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t keep = kept_count(n, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mask_apply", [&] {
    mask_apply<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), n,
                         keep, reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()),
                         weff.data_ptr<scalar_t>(), wsign.data_ptr<scalar_t>());
  });
}

void topk_mask_bool_into(const at::Tensor& scores, double k, at::Tensor& out) {
  check_scores(scores, k, "topk_mask_bool");
  TORCH_CHECK(out.scalar_type() == at::kBool && out.is_contiguous() &&
                  out.numel() == scores.numel(),
              "topk_mask_bool_into: out must be a contiguous bool tensor of scores' numel");
  mask_into(scores, k, out);
}

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("topk_mask_bool", &topk_mask_bool_cpu);
  m.impl("topk_threshold", &topk_threshold_cpu);
  m.impl("topk_mask_batched", &topk_mask_batched_cpu);
}

}  // namespace subkern::cpu
