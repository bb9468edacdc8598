// C++ CPU kernels of edge-popup's top-k score masking (schemas in subkern/ops/topk_mask.py):
//
//   topk_mask(scores, k) -> mask          0/1 in scores' dtype and shape
//   topk_threshold(scores, k) -> 0-d      the smallest kept |score|
//   topk_mask_batched(scores[], k[]) -> masks[]
//
// Semantics (subkern/ops/topk_mask_reference.py): with n = numel, the kept count is
// keep = n - floor((1 - k) n) (edge-popup's GetSubnet); entries are ranked by (|s| descending,
// flat index ascending), NaN below every number, and the first `keep` are kept.
//
// Algorithm: radix select on order-preserving integer keys, no sort.
// * Key. For |s| as IEEE bits with the sign cleared, unsigned integer order equals the order of
//   the magnitudes (+0 < denormals < normals < +inf); NaN patterns lie above +inf. The key is
//   bits + 1 for numbers and 0 for NaN, so key order = ranking order and key 0 = NaN. fp32, fp16
//   and bf16 use the fp32 bits (the conversion to fp32 is exact and monotone), 31 significant
//   bits; fp64 uses its own 63 bits.
// * Select. The threshold key T is the keep-th largest key. It is found digit by digit from the
//   top, 16 bits per pass (31 bits: 16 + 15, 63 bits: 16 + 16 + 16 + 15; 11 bits per pass for
//   tensors below 2^19 entries): a histogram of the current digit over the entries whose higher
//   digits equal T's known prefix; walking the buckets from the top gives T's digit and how many
//   entries rank above its bucket. Pass 1 reads all entries, pass 2 reads all entries and gathers
//   the keys of the surviving bucket (candidates); later passes read only the candidates. At the
//   end `ties` = keep - #{key > T} >= 1.
// * Mask. mask = key > T, or key == T for the first `ties` such entries in flat order. Threads
//   write chunks in parallel keeping every tie and counting them per chunk; an exclusive scan of
//   the chunk counts then tells each chunk how many of its ties are allowed, and only chunks with
//   too many re-scan to clear the excess. The result is independent of the thread count.
// * Threads: at::get_num_threads() std::thread workers (as csrc/cpu/hamming.cpp), fewer for small
//   tensors. The batched op runs small layers concurrently (one thread each) and large layers one
//   after the other with all threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

namespace subkern::cpu {
namespace {

// Bits resolved per histogram pass: 16 for large tensors (31-bit keys in 2 passes), 11 below
// kWideDigitMin entries, where zeroing and scanning 65536 buckets would cost more than the data.
constexpr int kWideDigitBits = 16;
constexpr int kNarrowDigitBits = 11;
constexpr int64_t kWideDigitMin = int64_t(1) << 19;
// Entries per thread below which a call uses fewer threads (a thread start costs ~20 us).
constexpr int64_t kMinPerThread = int64_t(1) << 16;
// Batched op: layers at least this large run one after the other with all threads.
constexpr int64_t kLargeLayer = int64_t(1) << 18;

using subkern::cpu::run_tasks;

int64_t threads_for(int64_t n, int64_t max_threads) {
  return std::max<int64_t>(1, std::min<int64_t>(max_threads, n / kMinPerThread));
}

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

// Digit bounds of pass p: bits [shift, hi) of the key.
inline int pass_shift(int key_bits, int digit_bits, int p) {
  return std::max(key_bits - digit_bits * (p + 1), 0);
}

template <typename Key>
struct Selection {
  Key threshold;  // the keep-th largest key
  int64_t ties;   // entries with key == threshold to keep (in flat order), >= 1
};

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

// Histogram of digit (key >> shift) & dmask over x[0, n) added to h (no prefix filter: pass 0).
// Scores cluster in few top digits (the exponent), so consecutive increments often hit the same
// bucket and would wait for each other's store; small histograms (narrow digits, n < 2^19 so the
// counts fit 32 bits) are therefore split into 4 interleaved copies, summed at the end.
template <typename scalar_t>
void hist_chunk(const scalar_t* __restrict__ x, int64_t n, int shift,
                typename KeyOf<scalar_t>::Key dmask, int64_t* __restrict__ h) {
  using K = KeyOf<scalar_t>;
  const int64_t nb = static_cast<int64_t>(dmask) + 1;
  if (nb > (int64_t(1) << kNarrowDigitBits) || n >= (int64_t(1) << 31)) {
    for (int64_t i = 0; i < n; ++i) ++h[(K::key(x[i]) >> shift) & dmask];
    return;
  }
  constexpr int64_t kMaxBins = int64_t(1) << kNarrowDigitBits;
  uint32_t sub[4][kMaxBins];
  for (auto& row : sub) std::fill(row, row + nb, 0u);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++sub[0][(K::key(x[i]) >> shift) & dmask];
    ++sub[1][(K::key(x[i + 1]) >> shift) & dmask];
    ++sub[2][(K::key(x[i + 2]) >> shift) & dmask];
    ++sub[3][(K::key(x[i + 3]) >> shift) & dmask];
  }
  for (; i < n; ++i) ++sub[0][(K::key(x[i]) >> shift) & dmask];
  for (int64_t b = 0; b < nb; ++b) {
    h[b] += static_cast<int64_t>(sub[0][b]) + sub[1][b] + sub[2][b] + sub[3][b];
  }
}

// Radix select of the keep-th largest key of x[0, n), 1 <= keep <= n, with `nthreads` threads.
template <typename scalar_t>
Selection<typename KeyOf<scalar_t>::Key> radix_select(const scalar_t* x, int64_t n, int64_t keep,
                                                      int64_t nthreads) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  constexpr int kBits = K::kBits;
  const int digit_bits = n >= kWideDigitMin ? kWideDigitBits : kNarrowDigitBits;
  const int npass = (kBits + digit_bits - 1) / digit_bits;
  nthreads = std::max<int64_t>(1, std::min(nthreads, threads_for(n, nthreads)));
  auto chunk = [&](int64_t t, int64_t total) {
    return std::make_pair(total * t / nthreads, total * (t + 1) / nthreads);
  };

  Key prefix = 0;
  int64_t remaining = keep;
  std::vector<std::vector<int64_t>> hists(nthreads);
  // Per-thread candidate keys (entries whose digits so far equal prefix's).
  std::vector<std::vector<Key>> cand(nthreads);
  bool have_cand = false;
  int hi = kBits;
  for (int p = 0; p < npass; ++p) {
    const int shift = pass_shift(kBits, digit_bits, p);
    const int width = hi - shift;
    const int64_t nb = int64_t(1) << width;
    const Key dmask = static_cast<Key>(nb - 1);
    const Key want = prefix >> hi;  // higher digits already fixed
    const bool gather = (p == 1);
    run_tasks(nthreads, [&](int64_t t) {
      auto& h = hists[t];
      h.assign(nb, 0);
      if (p == 0) {
        const auto [i0, i1] = chunk(t, n);
        hist_chunk<scalar_t>(x + i0, i1 - i0, shift, dmask, h.data());
      } else if (!have_cand) {
        // pass 1: filter the entries of the chosen top bucket, histogram and gather them
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

// out[i] = (key(x[i]) >= T) for i < n; returns #{key == T}. A separate function with restrict
// pointers and values in locals, so that the loop vectorises.
template <typename scalar_t>
int64_t mask_chunk(const scalar_t* __restrict__ x, int64_t n, typename KeyOf<scalar_t>::Key T,
                   scalar_t* __restrict__ out) {
  using K = KeyOf<scalar_t>;
  const scalar_t one = static_cast<scalar_t>(1), zero = static_cast<scalar_t>(0);
  int64_t eq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const auto key = K::key(x[i]);
    eq += (key == T);
    out[i] = key >= T ? one : zero;
  }
  return eq;
}

// Writes the mask of x[0, n) given the selection (see the file comment).
template <typename scalar_t>
void write_mask(const scalar_t* x, int64_t n, const Selection<typename KeyOf<scalar_t>::Key>& sel,
                scalar_t* out, int64_t nthreads) {
  using K = KeyOf<scalar_t>;
  using Key = typename K::Key;
  nthreads = std::max<int64_t>(1, std::min(nthreads, threads_for(n, nthreads)));
  const Key T = sel.threshold;
  const scalar_t zero = static_cast<scalar_t>(0);
  std::vector<int64_t> ties(nthreads, 0);
  run_tasks(nthreads, [&](int64_t t) {
    const int64_t i0 = n * t / nthreads, i1 = n * (t + 1) / nthreads;
    ties[t] = mask_chunk<scalar_t>(x + i0, i1 - i0, T, out + i0);
  });
  // Exclusive scan: chunk t may keep min(ties[t], max(0, sel.ties - before)) of its ties.
  int64_t before = 0;
  std::vector<int64_t> allowed(nthreads, 0);
  bool fix = false;
  for (int64_t t = 0; t < nthreads; ++t) {
    allowed[t] = std::min(ties[t], std::max<int64_t>(0, sel.ties - before));
    before += ties[t];
    fix = fix || allowed[t] < ties[t];
  }
  if (!fix) return;
  run_tasks(nthreads, [&](int64_t t) {
    if (allowed[t] == ties[t]) return;
    const int64_t i0 = n * t / nthreads, i1 = n * (t + 1) / nthreads;
    int64_t left = allowed[t];
    for (int64_t i = i0; i < i1; ++i) {
      if (K::key(x[i]) == T) {
        if (left > 0) {
          --left;
        } else {
          out[i] = zero;
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

// Mask of one tensor with `nthreads` threads into `out` (contiguous, same dtype and numel).
void mask_into(const at::Tensor& scores, double k, at::Tensor& out, int64_t nthreads) {
  const at::Tensor x = scores.contiguous();
  const int64_t n = x.numel();
  if (n == 0) return;
  const int64_t keep = kept_count(n, k);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_mask", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (keep <= 0) {
      std::fill(o, o + n, static_cast<scalar_t>(0));
      return;
    }
    if (keep >= n) {
      std::fill(o, o + n, static_cast<scalar_t>(1));
      return;
    }
    const scalar_t* px = x.data_ptr<scalar_t>();
    const auto sel = radix_select<scalar_t>(px, n, keep, nthreads);
    write_mask<scalar_t>(px, n, sel, o, nthreads);
  });
}

at::Tensor topk_mask_cpu(const at::Tensor& scores, double k) {
  check_scores(scores, k, "topk_mask");
  at::Tensor out = at::empty(scores.sizes(), scores.options().memory_format(
                                                 at::MemoryFormat::Contiguous));
  mask_into(scores, k, out, std::max<int64_t>(1, at::get_num_threads()));
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
    const auto sel = radix_select<scalar_t>(x.data_ptr<scalar_t>(), n, keep,
                                            std::max<int64_t>(1, at::get_num_threads()));
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
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // Large layers: one after the other, each with all threads.
  std::vector<size_t> small;
  for (size_t i = 0; i < scores.size(); ++i) {
    if (scores[i].numel() >= kLargeLayer) {
      mask_into(scores[i], ks[i], outs[i], nthreads);
    } else {
      small.push_back(i);
    }
  }
  // Small layers: a shared queue served by the threads, one thread per layer.
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(nthreads, static_cast<int64_t>(small.size()));
  run_tasks(workers, [&](int64_t) {
    for (size_t j = next.fetch_add(1); j < small.size(); j = next.fetch_add(1)) {
      mask_into(scores[small[j]], ks[small[j]], outs[small[j]], 1);
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(subkern, CPU, m) {
  m.impl("topk_mask", &topk_mask_cpu);
  m.impl("topk_threshold", &topk_threshold_cpu);
  m.impl("topk_mask_batched", &topk_mask_batched_cpu);
}

}  // namespace subkern::cpu
