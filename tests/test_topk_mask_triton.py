"""The Triton top-k masking kernels against the reference (on CPU through TRITON_INTERPRET=1,
set by conftest.py; compiled on a GPU). Sizes stay small: the interpreter runs every program in
Python."""

from __future__ import annotations

import pytest
import torch
from test_topk_mask import make_scores, same_threshold

from subkern import backend as _backend
from subkern.ops import topk_mask as tm
from subkern.ops import topk_mask_reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _backend.unavailable_reason("triton", torch.device(DEVICE)) is not None,
    reason=str(_backend.unavailable_reason("triton", torch.device(DEVICE))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("kind", ["randn", "equal", "quantised", "special"])
def test_triton_matches_reference(dtype, kind):
    with _backend.use_backend("triton"):
        for n, k in ((1, 0.5), (7, 0.3), (1000, 1e-4), (2500, 0.5), (2500, 1.0)):
            s = make_scores(kind, n, dtype, seed=n).to(DEVICE)
            got = tm.topk_mask(s, k)
            assert got.dtype == dtype and got.shape == s.shape
            assert torch.equal(got.cpu(), ref.topk_mask(s.cpu(), k)), (n, k)
            assert same_threshold(tm.topk_threshold(s, k).cpu(),
                                  ref.topk_threshold(s.cpu(), k)), (n, k)


def test_triton_ties_across_blocks_and_layouts():
    # ties spread over several 1024-entry blocks: the per-block exclusive scan decides
    s = torch.full((5000,), 2.0)
    s[::7] = -3.0
    s = s.view(50, 100).t().to(DEVICE)  # non-contiguous
    with _backend.use_backend("triton"):
        for k in (0.1, 0.3, 0.77):
            assert torch.equal(tm.topk_mask(s, k).cpu(), ref.topk_mask(s.cpu().contiguous(), k))


def test_triton_batched_empty_and_gradient():
    a = make_scores("randn", 300, torch.float64).view(10, 30).to(DEVICE).requires_grad_(True)
    b = torch.empty(0, device=DEVICE)
    with _backend.use_backend("triton"):
        ma, mb = tm.topk_mask_batched([a, b], [0.25, 0.5])
    assert torch.equal(ma.detach().cpu(), ref.topk_mask(a.detach().cpu(), 0.25))
    assert mb.shape == (0,)
    ma.sum().backward()
    assert torch.equal(a.grad, torch.sign(a.detach()))
