"""STR low rank: the soft threshold on singular values (formula, STR gradients, gradcheck),
SVD construction, learned rank reduction, compress() equivalence, the FastGRNN cell and bad
input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from subkern.nn.lowrank import (
    FactorizedLinear,
    STRFastGRNN,
    STRFastGRNNCell,
    STRLowRankLinear,
    soft_threshold_singular_values,
)


def _layer(in_f=6, out_f=5, rank=None, s_init=-10.0, dtype=torch.float64) -> STRLowRankLinear:
    torch.manual_seed(0)
    return STRLowRankLinear(in_f, out_f, rank, s_init=s_init, dtype=dtype)


def test_forward_is_u_diag_soft_sigma_vt():
    layer = _layer(s_init=-1.0)
    with torch.no_grad():
        layer.sigma.copy_(torch.tensor([2.0, -0.5, 0.1, 0.3, -0.2]))
    g = 1 / (1 + math.exp(1.0))
    soft = torch.tensor([2.0 - g, -(0.5 - g), 0.0, 0.3 - g, 0.0], dtype=torch.float64)
    torch.testing.assert_close(layer.singular_values(), soft)
    weight = layer.U @ torch.diag(soft) @ layer.V.T
    torch.testing.assert_close(layer.weight_matrix(), weight)
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.bias)
    assert layer.effective_rank() == 3


def test_gradients_are_strs():
    layer = _layer(s_init=-1.2)
    with torch.no_grad():
        layer.sigma.copy_(torch.tensor([1.0, -0.8, 0.1, 0.05, -0.6]))
    upstream = torch.randn(5, dtype=torch.float64)
    (layer.singular_values() * upstream).sum().backward()
    g = torch.sigmoid(torch.tensor(-1.2, dtype=torch.float64))
    alive = (layer.sigma.detach().abs() > g).double()
    torch.testing.assert_close(layer.sigma.grad, upstream * alive)
    expected_s = (-torch.sign(layer.sigma.detach()) * g * (1 - g) * alive * upstream).sum()
    torch.testing.assert_close(layer.s.grad, expected_s)


def test_gradcheck_fp64():
    layer = _layer(s_init=-2.0)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, U, V, sigma, s, b):
        return torch.nn.functional.linear(
            torch.nn.functional.linear(x, V.T) * soft_threshold_singular_values(sigma, s), U, b)

    params = (layer.U, layer.V, layer.sigma, layer.s, layer.bias)
    assert torch.autograd.gradcheck(fn, (x, *params))
    out = layer(x)
    torch.testing.assert_close(out, fn(x, *params))


def test_from_dense_is_the_svd_and_truncation_is_optimal():
    torch.manual_seed(1)
    dense = nn.Linear(7, 4).double()
    full = STRLowRankLinear.from_dense(dense, s_init=-100.0)   # threshold ~0
    torch.testing.assert_close(full.weight_matrix(), dense.weight.detach())
    torch.testing.assert_close(full.bias.detach(), dense.bias.detach())
    x = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(full(x), dense(x))
    two = STRLowRankLinear.from_dense(dense, rank=2, s_init=-100.0)
    sv = torch.linalg.svdvals(dense.weight.detach())
    error = torch.linalg.matrix_norm(two.weight_matrix() - dense.weight.detach())
    torch.testing.assert_close(error, sv[2:].norm())             # Eckart-Young
    assert full.U.dtype == torch.float64


@settings(max_examples=25, deadline=None)
@given(in_f=st.integers(1, 9), out_f=st.integers(1, 9), s=st.floats(-6, 1),
       batch=st.integers(0, 4))
def test_compress_computes_the_same_function(in_f, out_f, s, batch):
    torch.manual_seed(in_f * 10 + out_f)
    layer = STRLowRankLinear(in_f, out_f, s_init=s, dtype=torch.float64)
    small = layer.compress()
    assert isinstance(small, FactorizedLinear) and small.rank == layer.effective_rank()
    x = torch.randn(batch, in_f, dtype=torch.float64)
    torch.testing.assert_close(small(x), layer(x))
    torch.testing.assert_close(small.weight_matrix(), layer.weight_matrix().detach())


def test_rank_zero_compress_gives_the_bias():
    layer = _layer(s_init=50.0)                   # threshold ~1 > every singular value
    layer.sigma.data.clamp_(max=0.9)
    assert layer.effective_rank() == 0
    small = layer.compress()
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(small(x), layer.bias.detach().expand(3, 5))
    torch.testing.assert_close(layer(x), small(x))


def test_training_with_threshold_decay_lowers_the_rank():
    """Fit a rank-2 map with a full-rank layer: decay on s and sigma removes the other ranks."""
    torch.manual_seed(0)
    target = torch.randn(12, 2) @ torch.randn(2, 12) / 3
    layer = STRLowRankLinear(12, 12, bias=False, s_init=-4.0)
    opt = torch.optim.Adam([{"params": [layer.U, layer.V]},
                            {"params": [layer.sigma], "weight_decay": 0.05},
                            {"params": [layer.s], "weight_decay": 0.5}], lr=0.02)
    x = torch.randn(256, 12)
    for _ in range(300):
        loss = ((layer(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.effective_rank() <= 4
    assert float(loss.detach()) < 0.05 * float((x @ target.T).pow(2).mean())


def test_state_dict_round_trip():
    a = _layer(rank=3)
    b = STRLowRankLinear(6, 5, 3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))


def test_fastgrnn_cell_matches_the_equations_and_compresses():
    torch.manual_seed(0)
    cell = STRFastGRNNCell(5, 7, s_init=-1.5).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    h = torch.randn(3, 7, dtype=torch.float64)
    pre = x @ cell.W.weight_matrix().T + h @ cell.U.weight_matrix().T
    z = torch.sigmoid(pre + cell.bias_z)
    cand = torch.tanh(pre + cell.bias_h)
    expected = (torch.sigmoid(cell.zeta) * (1 - z) + torch.sigmoid(cell.nu)) * cand + z * h
    torch.testing.assert_close(cell(x, h), expected)
    ranks = cell.ranks()
    assert ranks["W"] <= 5 and ranks["U"] <= 7
    small = cell.compress()
    assert small.ranks() == ranks and isinstance(small.U, FactorizedLinear)
    torch.testing.assert_close(small(x, h), cell(x, h))

    rnn = STRFastGRNN(5, 7, s_init=-1.5).double()
    seq = torch.randn(2, 4, 5, dtype=torch.float64)
    outputs, last = rnn(seq)
    assert outputs.shape == (2, 4, 7)
    torch.testing.assert_close(outputs[:, -1], last)
    h1 = rnn.cell(seq[:, 0])
    torch.testing.assert_close(outputs[:, 0], h1)
    torch.testing.assert_close(rnn.compress()(seq)[1], last)
    empty, h0 = rnn(seq[:, :0])
    assert empty.shape == (2, 0, 7) and torch.equal(h0, torch.zeros(2, 7, dtype=torch.float64))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="rank"):
        STRLowRankLinear(4, 3, rank=4)
    with pytest.raises(ValueError, match="in_features"):
        STRLowRankLinear(0, 3)
    with pytest.raises(ValueError, match="s_init"):
        STRLowRankLinear(4, 3, s_init=math.inf)
    with pytest.raises(TypeError, match="nn.Linear"):
        STRLowRankLinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="in_features=4"):
        STRLowRankLinear(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="in_features=4"):
        FactorizedLinear(4, 3, 1)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, time, 5\]"):
        STRFastGRNN(5, 3)(torch.randn(2, 5))
