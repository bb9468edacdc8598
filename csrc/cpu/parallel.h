// Fork-join parallelism for the CPU kernels: a persistent worker pool.
//
// The kernels use run_tasks() instead of at::parallel_for: torch's OpenMP build of
// at::parallel_for is an inline template that would need -fopenmp here and a second OpenMP
// runtime next to torch's.
#pragma once

#include <cstdint>
#include <functional>

namespace subkern::cpu {

// Runs fn(0) .. fn(ntasks - 1) and returns when all have finished.
//
// The tasks run on a process-wide pool of worker threads, created lazily on first use (and grown
// up to ntasks - 1 workers, at most hardware threads - 1 and 255, when a call asks for more) and
// kept for later calls; the calling thread takes tasks too. Tasks are handed out one at a time from a shared counter, so a
// task may run on any thread: callers must make each task's result depend only on its index (then
// results do not depend on the thread count). Idle workers spin briefly, then sleep on a condition
// variable.
//
// Tasks run on the calling thread alone, in index order, when: ntasks <= 1; the pool is busy with
// another caller's tasks (concurrent callers from several threads do not wait for each other); the
// call is nested inside a task; or no worker thread can be created. In a child process created by
// fork() the pool starts afresh (the parent's workers do not exist there).
//
// Every task runs even when others throw; afterwards the exception of the lowest-index task that
// threw is rethrown on the calling thread.
void run_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn);

// Worker threads the pool holds now (0 before the first parallel call); for tests.
int64_t pool_size();

}  // namespace subkern::cpu
