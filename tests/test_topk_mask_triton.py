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


def _batch_case():
    """Ragged tensors of several dtypes: 1-element, empty, ties, NaN/inf, non-contiguous."""
    gen = torch.Generator().manual_seed(3)
    ties = torch.full((2100,), 2.0)  # ties over three 1024-entry blocks
    ties[::5] = -4.0
    special = torch.randn(1500, generator=gen)
    special[::9] = float("nan")
    special[::13] = float("inf")
    special[1::17] = -0.0
    tensors = [
        torch.randn(1, generator=gen),
        torch.empty(0),
        ties,
        torch.randn(30, 40, generator=gen).t(),  # non-contiguous
        special,
        torch.randint(-3, 4, (700,), generator=gen).float(),
        torch.randn(5, 0),
        torch.randn(333, generator=gen, dtype=torch.float64),
        torch.randn(1030, generator=gen).half(),
    ]
    ks = [0.5, 0.3, 0.37, 0.25, 0.6, 0.91, 0.5, 1e-3, 1.0]
    return tensors, ks


def test_triton_batched_one_launch_per_pass_matches_reference(monkeypatch):
    from subkern.kernels import topk_mask as triton_topk

    tensors, ks = _batch_case()
    launches = []
    real = triton_topk._select_segments

    def counting(flat, sizes, keeps, out):
        launches.append(len(sizes))
        return real(flat, sizes, keeps, out)

    monkeypatch.setattr(triton_topk, "_select_segments", counting)
    with _backend.use_backend("triton"):
        got = tm.topk_mask_batched([t.to(DEVICE) for t in tensors], ks)
    # one segmented selection per dtype (float32, float64, float16), not one per tensor
    assert sorted(launches) == [1, 1, 5]
    for g, t, k in zip(got, tensors, ks, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous()
        assert torch.equal(g.cpu(), ref.topk_mask(t.contiguous(), k)), (tuple(t.shape), k)


def test_triton_batched_tiny_k_and_gradients():
    # k so small that 1 - k rounds to 1: nothing kept (kept_count 0), next to normal tensors
    a = torch.randn(50, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    b = torch.randn(7, 3, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    with _backend.use_backend("triton"):
        ma, mb = tm.topk_mask_batched([a, b], [1e-17, 0.4])
    assert not ma.detach().any()
    assert torch.equal(mb.detach().cpu(), ref.topk_mask(b.detach().cpu(), 0.4))
    (ma.sum() + 2 * mb.sum()).backward()
    assert torch.equal(a.grad, torch.sign(a.detach()))
    assert torch.equal(b.grad, 2 * torch.sign(b.detach()))
