"""The CUDA and Triton top-k masking kernels on a GPU against the torch reference (run on CPU).

Marked ``gpu``: skipped cleanly where there is no CUDA device (conftest). The ``cuda`` backend
needs ``subkern._C`` built with its CUDA kernels; without them its tests skip and say why.
"""

from __future__ import annotations

import pytest
import torch
from test_topk_mask import make_scores, same_threshold

from subkern import _ext
from subkern import backend as _backend
from subkern.ops import topk_mask as tm
from subkern.ops import topk_mask_reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["cuda", "triton"])
def backend(request) -> str:
    if request.param == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip(f"subkern._C has no CUDA kernels: {_ext.load_error() or 'built without CUDA'}")
    why = _backend.unavailable_reason(request.param, torch.device("cuda"), "topk_mask")
    if why is not None:
        pytest.skip(why)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("kind", ["randn", "equal", "quantised", "special"])
def test_gpu_matches_reference(backend, dtype, kind):
    with _backend.use_backend(backend):
        for n in (1, 7, 1000, 4096, 4097, 9408, 100_000):
            s = make_scores(kind, n, dtype, seed=n)
            for k in (1e-4, 0.3, 0.5, 1.0):
                got = tm.topk_mask(s.cuda(), k)
                assert got.dtype == dtype and got.is_cuda
                assert torch.equal(got.cpu(), ref.topk_mask(s, k)), (n, k)
                assert same_threshold(tm.topk_threshold(s.cuda(), k).cpu(),
                                      ref.topk_threshold(s, k)), (n, k)


def test_gpu_largest_layer_with_ties(backend):
    s = ((torch.randn(512, 512, 3, 3) * 16).round() / 16)
    with _backend.use_backend(backend):
        for k in (0.3, 0.5):
            assert torch.equal(tm.topk_mask(s.cuda(), k).cpu(), ref.topk_mask(s, k))
    t = torch.full((300_000,), 0.5)
    with _backend.use_backend(backend):
        got = tm.topk_mask(t.cuda(), 0.3).cpu()
    keep = ref.kept_count(t.numel(), 0.3)
    assert got[:keep].eq(1).all() and got[keep:].eq(0).all()


def test_gpu_batched_equals_per_tensor_and_gradient(backend):
    layers = [make_scores("randn", 9408, torch.float32, 1).view(64, 3, 7, 7),
              make_scores("quantised", 300_000, torch.float32, 2),
              make_scores("special", 1000, torch.float16, 3),
              make_scores("equal", 7, torch.float64),
              torch.empty(0),
              make_scores("randn", 5000, torch.bfloat16)]
    ks = [0.3, 0.5, 1e-4, 1.0, 0.5, 0.2]
    cuda_layers = [s.cuda().requires_grad_(True) for s in layers]
    with _backend.use_backend(backend):
        got = tm.topk_mask_batched(cuda_layers, ks)
    for s, k, g in zip(layers, ks, got, strict=True):
        assert torch.equal(g.detach().cpu(), ref.topk_mask(s, k))
    sum(g.sum() for g in got).backward()
    for s in cuda_layers:
        assert torch.equal(s.grad, torch.sign(s.detach()))


def test_gpu_non_contiguous(backend):
    s = torch.randn(64, 300, device="cuda").t()
    with _backend.use_backend(backend):
        assert torch.equal(tm.topk_mask(s, 0.4).cpu(), ref.topk_mask(s.cpu().contiguous(), 0.4))


def test_gpu_opcheck_and_compile():
    s = torch.randn(40, 30, device="cuda", dtype=torch.float64)
    torch.library.opcheck(torch.ops.subkern.topk_mask.default, (s, 0.4))
    torch.library.opcheck(torch.ops.subkern.topk_mask_batched.default, ([s, s[:3]], [0.4, 0.9]))
    compiled = torch.compile(lambda x: tm.topk_mask(x, 0.3) * x, fullgraph=True)
    assert torch.equal(compiled(s), ref.topk_mask(s.cpu(), 0.3).cuda() * s)
