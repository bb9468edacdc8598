#include "cpu/parallel.h"

#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace subkern::cpu {

void run_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  if (ntasks <= 1) {
    if (ntasks == 1) fn(0);
    return;
  }
  std::vector<std::exception_ptr> errors(ntasks);
  auto guarded = [&](int64_t t) {
    try {
      fn(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(ntasks - 1);
  int64_t started = 1;
  try {
    for (; started < ntasks; ++started) workers.emplace_back(guarded, started);
  } catch (const std::system_error&) {
    // No more threads available: the tasks not started yet run here.
  }
  guarded(0);
  for (int64_t t = started; t < ntasks; ++t) guarded(t);
  for (auto& th : workers) th.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace subkern::cpu
