// Shared pieces of the top-k selection (csrc/cpu/topk_mask.cpp) for the other CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace subkern::cpu {

// Runs fn(0) .. fn(ntasks - 1) on ATen's intra-op (OpenMP) thread pool, one contiguous block of
// tasks per thread (through TensorIterator::for_each, whose parallel_for is compiled inside
// libtorch). These are the threads the GEMMs use, so nothing competes with workers that keep
// spinning after a GEMM. Runs serially inside a parallel region or for ntasks <= 1. Rethrows the
// first exception of a task.
void intraop_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn);

// Threads an elementwise pass over n entries should use (1 below 2^16 entries per thread).
int64_t pass_threads(int64_t n);

// out (bool, contiguous, numel of scores) = edge-popup's top-k mask of scores (any float dtype,
// contiguous): true for the keep = n - floor((1 - k) n) largest |s|, ties to the lower flat index,
// NaN lowest.
void topk_mask_bool_into(const at::Tensor& scores, double k, at::Tensor& out);

// Selection fused with the masked layers' effective weight: mask as topk_mask_bool_into,
// weff = weight * mask (a multiplication, as the reference's `weight * mask`) and
// wsign = weight * sign(scores) where scores are nonzero numbers, NaN where a score is +-0 or NaN
// (sign 0: the backward then forms (G * W) * sign(S) from weight and scores), all contiguous with
// weight's numel; weight (contiguous) has the dtype of scores. One threaded pass over scores and
// weight after the selection (AVX-512 for float32).
void topk_mask_apply_into(const at::Tensor& scores, double k, const at::Tensor& weight,
                          at::Tensor& mask, at::Tensor& weff, at::Tensor& wsign);

}  // namespace subkern::cpu
