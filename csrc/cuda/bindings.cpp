// CUDA kernels of subkern::hamming_distance and subkern::hamming_topk for the torch dispatcher.
//
// The schemas are defined in Python (subkern/ops/binary.py); this file only implements them for
// CUDA tensors: it checks the inputs, makes them contiguous, allocates the outputs and the
// workspace with torch (caching allocator, current stream) and calls the torch-free launchers of
// csrc/cuda/hamming.cu. Compiled only when torch has CUDA (setup.py, SUBKERN_WITH_CUDA=1).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/hamming.cuh"

namespace {

void check_codes(const at::Tensor& codes, const char* name) {
  TORCH_CHECK(codes.is_cuda(), "subkern (CUDA): ", name, " must be a CUDA tensor, got device ",
              codes.device());
  TORCH_CHECK(codes.scalar_type() == at::kByte, "subkern (CUDA): ", name,
              " must have dtype torch.uint8 (packed binary codes), got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, "subkern (CUDA): ", name, " must be 2-D [n, nbytes], got ",
              codes.dim(), " dimensions");
  TORCH_CHECK(codes.size(1) >= 1 && codes.size(1) <= subkern::cuda::kMaxCodeBytes,
              "subkern (CUDA): ", name, " codes must be 1 to ", subkern::cuda::kMaxCodeBytes,
              " bytes wide, got ", codes.size(1));
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* name_a,
                const char* name_b) {
  check_codes(a, name_a);
  check_codes(b, name_b);
  TORCH_CHECK(a.size(1) == b.size(1), "subkern (CUDA): ", name_a, " and ", name_b,
              " must have the same code width, got ", a.size(1), " and ", b.size(1), " bytes");
  TORCH_CHECK(a.device() == b.device(), "subkern (CUDA): ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "subkern (CUDA): the ", op, " kernel failed to launch: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

at::Tensor hamming_distance_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_pair(a, b, "a", "b");
  const c10::cuda::CUDAGuard device_guard(a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  const int64_t na = ac.size(0);
  const int64_t nb = bc.size(0);
  at::Tensor out = at::empty({na, nb}, ac.options().dtype(at::kInt));
  if (na == 0 || nb == 0) return out;
  check_launch(subkern::cuda::hamming_distance_launch(
                   ac.data_ptr<uint8_t>(), bc.data_ptr<uint8_t>(), na, nb, ac.size(1),
                   out.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()),
               "hamming_distance");
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& queries,
                                                     const at::Tensor& database, int64_t k) {
  check_pair(queries, database, "queries", "database");
  TORCH_CHECK(k > 0, "subkern (CUDA): k must be positive, got ", k);
  TORCH_CHECK(k <= subkern::cuda::kMaxTopK, "subkern (CUDA): hamming_topk selects at most k=",
              subkern::cuda::kMaxTopK, " on CUDA (got k=", k,
              "); use the reference backend for larger k");
  TORCH_CHECK(database.size(0) < (int64_t{1} << subkern::cuda::kIndexBits),
              "subkern (CUDA): hamming_topk supports databases below 2^",
              subkern::cuda::kIndexBits, " codes, got ", database.size(0));
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const at::Tensor qc = queries.contiguous();
  const at::Tensor dc = database.contiguous();
  const int64_t nq = qc.size(0);
  const int64_t n = dc.size(0);
  const int64_t nbytes = qc.size(1);
  at::Tensor out_dist = at::empty({nq, k}, qc.options().dtype(at::kInt));
  at::Tensor out_index = at::empty({nq, k}, qc.options().dtype(at::kLong));
  if (nq == 0) return std::make_tuple(out_dist, out_index);

  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const size_t workspace_bytes =
      subkern::cuda::hamming_topk_workspace_size(nq, n, nbytes, k, sm_count);
  // The caching allocator returns blocks aligned far beyond the 16 bytes the launcher needs.
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_bytes)}, qc.options().dtype(at::kByte));
  check_launch(subkern::cuda::hamming_topk_launch(
                   qc.data_ptr<uint8_t>(), dc.data_ptr<uint8_t>(), nq, n, nbytes, k,
                   out_dist.data_ptr<int32_t>(), out_index.data_ptr<int64_t>(),
                   workspace_bytes > 0 ? workspace.data_ptr() : nullptr, workspace_bytes,
                   sm_count, at::cuda::getCurrentCUDAStream()),
               "hamming_topk");
  return std::make_tuple(out_dist, out_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(subkern, CUDA, m) {
  m.impl("hamming_distance", &hamming_distance_cuda);
  m.impl("hamming_topk", &hamming_topk_cuda);
}
