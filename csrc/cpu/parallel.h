// Minimal fork-join parallelism for the CPU kernels.
//
// The kernels start std::thread workers per call instead of using at::parallel_for: torch's
// OpenMP build of at::parallel_for is an inline template that would need -fopenmp here and a
// second OpenMP runtime next to torch's.
#pragma once

#include <cstdint>
#include <functional>

namespace subkern::cpu {

// Runs fn(0) .. fn(ntasks - 1), one std::thread per task beyond the first (which runs on the
// calling thread). If the system refuses more threads, the remaining tasks run on the calling
// thread. Rethrows the first exception of any task after all tasks have finished.
void run_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn);

}  // namespace subkern::cpu
