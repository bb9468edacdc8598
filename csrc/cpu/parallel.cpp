#include "cpu/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SUBKERN_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define SUBKERN_CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define SUBKERN_CPU_RELAX() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace subkern::cpu {
namespace {

constexpr int64_t kMaxWorkers = 255;
// How long an idle worker (or a caller waiting for its workers) spins before it sleeps: long
// enough to cover the gap between back-to-back kernel calls, short enough not to burn a core.
constexpr std::chrono::microseconds kSpin{50};

// One run_tasks call: lives on the caller's stack until every assigned worker has left it.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t ntasks;
  std::vector<std::exception_ptr> errors;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> busy_workers{0};  // assigned workers that have not finished yet
  std::mutex mu;
  std::condition_variable done_cv;

  // Claims and runs tasks until none is left.
  void work() {
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < ntasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      try {
        (*fn)(t);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    }
  }
};

thread_local bool tl_inside_pool = false;  // on a worker, or on a caller running its tasks

struct Worker {
  std::atomic<uint64_t> seq{0};  // bumped once per job handed to this worker
  Job* job = nullptr;            // written before seq (release), read after it (acquire)
  std::mutex mu;
  std::condition_variable cv;
  std::thread thread;
};

class Pool {
 public:
  // The calling thread owns the pool while it holds `call_mu_`.
  std::mutex call_mu_;

  // Makes sure at least `want` workers exist: fewer when threads cannot be created, and never
  // more than the hardware runs at once next to the caller (more tasks than threads are then
  // shared out by the task counter, so no task is lost).
  int64_t ensure(int64_t want) {
    const int64_t hw = static_cast<int64_t>(std::thread::hardware_concurrency());
    const int64_t cap = std::min<int64_t>(kMaxWorkers, std::max<int64_t>(1, hw - 1));
    want = std::min(want, cap);
    while (static_cast<int64_t>(workers_.size()) < want) {
      auto w = std::make_unique<Worker>();
      Worker* raw = w.get();
      try {
        w->thread = std::thread([raw] { loop(raw); });
      } catch (const std::system_error&) {
        break;  // no more threads: use the ones we have
      }
      workers_.push_back(std::move(w));
    }
    return static_cast<int64_t>(workers_.size());
  }

  void run(Job& job, int64_t nworkers) {
    job.busy_workers.store(nworkers, std::memory_order_relaxed);
    for (int64_t i = 0; i < nworkers; ++i) {
      Worker& w = *workers_[i];
      {
        std::lock_guard<std::mutex> lock(w.mu);
        w.job = &job;
        w.seq.fetch_add(1, std::memory_order_release);
      }
      w.cv.notify_one();
    }
    job.work();
    // Wait for the workers to leave the job (they may still be running their last task).
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (job.busy_workers.load(std::memory_order_acquire) != 0 &&
           std::chrono::steady_clock::now() < until) {
      SUBKERN_CPU_RELAX();
    }
    if (job.busy_workers.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lock(job.mu);
      job.done_cv.wait(lock, [&] { return job.busy_workers.load(std::memory_order_acquire) == 0; });
    }
  }

  int64_t size() const { return static_cast<int64_t>(workers_.size()); }

 private:
  std::vector<std::unique_ptr<Worker>> workers_;

  static void loop(Worker* w) {
    tl_inside_pool = true;
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly for the next job, then sleep until the caller bumps seq.
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (w->seq.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until) {
        SUBKERN_CPU_RELAX();
      }
      Job* job;
      {
        std::unique_lock<std::mutex> lock(w->mu);
        w->cv.wait(lock, [&] { return w->seq.load(std::memory_order_acquire) != seen; });
        seen = w->seq.load(std::memory_order_acquire);
        job = w->job;
      }
      job->work();
      // Leave the job under its mutex: the caller takes that mutex after it has seen
      // busy_workers == 0 and before it destroys the job, so `job` stays valid until the
      // unlock here, the last touch of it.
      std::lock_guard<std::mutex> lock(job->mu);
      if (job->busy_workers.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        job->done_cv.notify_all();
      }
    }
  }
};

// The pool is never destroyed (its workers block forever at exit); a forked child drops the
// parent's pool (whose threads and lock states are meaningless there) and makes its own.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;
std::mutex g_create_mu;

void reset_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool* pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, &reset_pool_in_child); });
  std::lock_guard<std::mutex> lock(g_create_mu);
  p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
  return p;
}

void run_inline(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  std::exception_ptr first;
  for (int64_t t = 0; t < ntasks; ++t) {
    try {
      fn(t);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace

void run_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 1 || tl_inside_pool) {
    run_inline(ntasks, fn);
    return;
  }
  Pool* p = pool();
  std::unique_lock<std::mutex> owner(p->call_mu_, std::try_to_lock);
  if (!owner.owns_lock()) {  // another thread's tasks are running: do not wait for them
    run_inline(ntasks, fn);
    return;
  }
  const int64_t nworkers = std::min(p->ensure(ntasks - 1), ntasks - 1);
  if (nworkers == 0) {
    owner.unlock();
    run_inline(ntasks, fn);
    return;
  }
  Job job;
  job.fn = &fn;
  job.ntasks = ntasks;
  job.errors.resize(static_cast<size_t>(ntasks));
  tl_inside_pool = true;
  p->run(job, nworkers);
  tl_inside_pool = false;
  {
    std::lock_guard<std::mutex> lock(job.mu);  // the last worker has let go of the job
  }
  for (auto& e : job.errors) {
    if (e) std::rethrow_exception(e);
  }
}

int64_t pool_size() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  return p == nullptr ? 0 : p->size();
}

}  // namespace subkern::cpu
