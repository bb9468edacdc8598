// CUDA kernels of subkern::topk_mask, topk_threshold and topk_mask_batched for the torch
// dispatcher (schemas in subkern/ops/topk_mask.py). This file checks the inputs, makes them
// contiguous, allocates outputs and workspace with torch (caching allocator, current stream),
// builds the segment table of csrc/cuda/topk_mask.cuh and calls its torch-free launcher. The
// batched op selects all layers of one dtype in one launch per step. Compiled only when torch has
// CUDA (setup.py, SUBKERN_WITH_CUDA=1).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <vector>

#include "cuda/topk_mask.cuh"

namespace {

namespace sc = subkern::cuda;

sc::ScoreType score_type(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return sc::ScoreType::Float32;
    case at::kDouble: return sc::ScoreType::Float64;
    case at::kHalf: return sc::ScoreType::Float16;
    case at::kBFloat16: return sc::ScoreType::BFloat16;
    default:
      TORCH_CHECK(false, "subkern.", op, " (CUDA): scores must be float16, bfloat16, float32 or "
                  "float64, got ", t.scalar_type());
  }
  return sc::ScoreType::Float32;
}

void check(const at::Tensor& scores, double k, const char* op) {
  TORCH_CHECK(scores.is_cuda(), "subkern.", op, " (CUDA): scores must be a CUDA tensor, got ",
              scores.device());
  TORCH_CHECK(k > 0.0 && k <= 1.0, "subkern.", op, ": k must be in (0, 1], got ", k);
  score_type(scores, op);
}

int64_t kept_count(int64_t n, double k) {
  return n - static_cast<int64_t>(std::floor((1.0 - k) * static_cast<double>(n)));
}

// Runs the selection (and the masks when outs is non-empty) of contiguous, non-empty tensors of
// one dtype on one device; returns the workspace, whose first 2 * nseg int64 are [T, ties] per
// segment.
at::Tensor launch(const std::vector<at::Tensor>& xs, const std::vector<double>& ks,
                  const std::vector<at::Tensor>& outs, const char* op) {
  const int64_t nseg = static_cast<int64_t>(xs.size());
  std::vector<int64_t> meta(static_cast<size_t>(sc::topk_mask_meta_size(nseg)), 0);
  int64_t tiles = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    const at::Tensor& x = xs[s];
    meta[s] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x.data_ptr()));
    meta[nseg + s] = outs.empty() ? 0
                                  : static_cast<int64_t>(
                                        reinterpret_cast<uintptr_t>(outs[s].data_ptr()));
    meta[2 * nseg + s] = x.numel();
    meta[3 * nseg + s] = kept_count(x.numel(), ks[s]);
    meta[4 * nseg + s] = tiles;
    tiles += sc::topk_mask_tiles(x.numel());
  }
  meta[5 * nseg] = tiles;
  const at::Tensor host = at::from_blob(meta.data(), {static_cast<int64_t>(meta.size())},
                                        at::TensorOptions().dtype(at::kLong));
  const at::Tensor device_meta = host.to(xs[0].device());  // synchronous copy: meta may go now
  const size_t bytes = sc::topk_mask_workspace_size(nseg, tiles);
  at::Tensor workspace = at::empty({static_cast<int64_t>((bytes + 7) / 8)},
                                   xs[0].options().dtype(at::kLong));
  const cudaError_t err = sc::topk_mask_launch(
      score_type(xs[0], op), device_meta.data_ptr<int64_t>(), meta.data(), nseg,
      workspace.data_ptr(), bytes, !outs.empty(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "subkern.", op, " (CUDA): kernel launch failed: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
  return workspace;
}

at::Tensor topk_mask_cuda(const at::Tensor& scores, double k) {
  check(scores, k, "topk_mask");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  at::Tensor out = at::empty(scores.sizes(), x.options());
  if (x.numel() == 0) return out;
  launch({x}, {k}, {out}, "topk_mask");
  return out;
}

at::Tensor topk_threshold_cuda(const at::Tensor& scores, double k) {
  check(scores, k, "topk_threshold");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  if (x.numel() == 0) return at::full({}, INFINITY, x.options());
  const at::Tensor key = launch({x}, {k}, {}, "topk_threshold")[0];
  // key = |s| bits + 1 (0 = NaN), of the fp32 bits for fp16/bf16/fp32 and of the fp64 bits
  at::Tensor value = x.scalar_type() == at::kDouble
                         ? (key - 1).view({1}).view(at::kDouble)[0]
                         : (key - 1).to(at::kInt).view({1}).view(at::kFloat)[0];
  value = at::where(key == 0, at::full({}, NAN, value.options()), value);
  return value.to(x.scalar_type());
}

std::vector<at::Tensor> topk_mask_batched_cuda(at::TensorList scores, at::ArrayRef<double> ks) {
  TORCH_CHECK(ks.size() == scores.size(), "subkern.topk_mask_batched: got ", scores.size(),
              " score tensors but ", ks.size(), " values of k");
  std::vector<at::Tensor> outs;
  if (scores.empty()) return outs;
  const c10::cuda::CUDAGuard guard(scores[0].device());
  // group the non-empty tensors by dtype: one launch sequence per group
  std::map<int, std::vector<size_t>> groups;
  std::vector<at::Tensor> xs;
  for (size_t i = 0; i < scores.size(); ++i) {
    check(scores[i], ks[i], "topk_mask_batched");
    TORCH_CHECK(scores[i].device() == scores[0].device(),
                "subkern.topk_mask_batched (CUDA): all score tensors must be on one device");
    xs.push_back(scores[i].contiguous());
    outs.push_back(at::empty(scores[i].sizes(), xs.back().options()));
    if (xs.back().numel() > 0) groups[static_cast<int>(scores[i].scalar_type())].push_back(i);
  }
  for (const auto& entry : groups) {
    std::vector<at::Tensor> gx, go;
    std::vector<double> gk;
    for (size_t i : entry.second) {
      gx.push_back(xs[i]);
      go.push_back(outs[i]);
      gk.push_back(ks[i]);
    }
    launch(gx, gk, go, "topk_mask_batched");
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(subkern, CUDA, m) {
  m.impl("topk_mask", &topk_mask_cuda);
  m.impl("topk_threshold", &topk_threshold_cuda);
  m.impl("topk_mask_batched", &topk_mask_batched_cuda);
}
