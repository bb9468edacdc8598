"""Edge-popup layers against an independent reference formulation: outputs, straight-through
score gradients, frozen weights, init statistics, from_dense / to_dense, state_dict."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subkern.nn import (
    INIT_MODES,
    NonAffineBatchNorm2d,
    SubnetConv2d,
    SubnetLinear,
    init_scores_,
    init_weight_,
    kept_fraction,
    set_k_,
)
from subkern.nn import subnet as subnet_mod
from subkern.ops import topk_mask_reference as ref


@pytest.fixture(params=["default", "reference"])
def impl(request, monkeypatch):
    """Run each layer test on the ops the layers use by default (the fused ``subkern.ops.masked``
    when importable) and on the in-module reference formulation (the fallback)."""
    if request.param == "reference":
        monkeypatch.setattr(subnet_mod, "_masked_linear", subnet_mod.reference_masked_linear)
        monkeypatch.setattr(subnet_mod, "_masked_conv2d", subnet_mod.reference_masked_conv2d)
    return request.param


def _expected_linear(layer: SubnetLinear, x: torch.Tensor, grad_out: torch.Tensor):
    """Reference: y = x (W*M)^T + b; dL/dS = (g^T x) * W * sign(S); dL/dx = g (W*M)."""
    mask = ref.topk_mask(layer.scores.detach().abs(), layer.k)
    w_eff = layer.weight.detach() * mask
    y = F.linear(x, w_eff, None if layer.bias is None else layer.bias.detach())
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w_eff = g2.t() @ x2
    grad_scores = grad_w_eff * layer.weight.detach() * torch.sign(layer.scores.detach())
    grad_x = grad_out @ w_eff
    return y, grad_scores, grad_x


@pytest.mark.parametrize("rows", [1, 5, 123])
@pytest.mark.parametrize("k", [0.01, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(rows, k, bias, impl):
    torch.manual_seed(rows)
    layer = SubnetLinear(37, 19, bias=bias, k=k, init="kaiming_normal")
    x = torch.randn(rows, 37, requires_grad=True)
    g = torch.randn(rows, 19)
    y = layer(x)
    y.backward(g)
    y_ref, gs_ref, gx_ref = _expected_linear(layer, x.detach(), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.scores.grad, gs_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    if bias:
        assert layer.bias.grad is None and not layer.bias.requires_grad


def test_linear_batched_noncontiguous_and_empty_inputs(impl):
    torch.manual_seed(0)
    layer = SubnetLinear(12, 7, k=0.4)
    x = torch.randn(3, 12, 4).transpose(1, 2)          # [3, 4, 12], not contiguous
    assert not x.is_contiguous()
    g = torch.randn(3, 4, 7)
    y = layer(x)
    y.backward(g)
    y_ref, gs_ref, _ = _expected_linear(layer, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.scores.grad, gs_ref, rtol=1e-4, atol=1e-5)
    empty = layer(torch.randn(0, 12))
    assert empty.shape == (0, 7)


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (2, 1, 1, 3)])
@pytest.mark.parametrize("k", [0.05, 0.5, 1.0])
def test_conv_matches_reference(stride, padding, dilation, groups, k, impl):
    torch.manual_seed(1)
    layer = SubnetConv2d(6, 9, 3, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=True, k=k, init="signed_constant")
    x = torch.randn(2, 6, 11, 10, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    mask = ref.topk_mask(layer.scores.detach().abs(), k)
    w = layer.weight.detach()
    args = (stride, padding, dilation, groups)
    y_ref = F.conv2d(x.detach(), w * mask, layer.bias.detach(), *args)
    grad_w_eff = torch.nn.grad.conv2d_weight(x.detach(), w.shape, g, *args)
    grad_x = torch.nn.grad.conv2d_input(x.shape, w * mask, g, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.scores.grad,
                               grad_w_eff * w * torch.sign(layer.scores.detach()),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-4, atol=1e-5)
    assert layer.weight.grad is None


@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), (1, "reflect"),
                                                  (1, "circular")])
def test_conv_padding_variants_match_dense(padding, padding_mode):
    torch.manual_seed(2)
    dense = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=padding_mode, bias=False)
    layer = SubnetConv2d.from_dense(dense, k=0.6)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-5, atol=1e-5)


def test_mask_keeps_kept_count_and_breaks_ties_by_index():
    layer = SubnetLinear(10, 10, k=0.35)
    with torch.no_grad():
        layer.scores.fill_(0.5)                       # all tied
    mask = layer.mask().flatten()
    kept = ref.kept_count(100, 0.35)
    assert layer.num_kept() == kept == 100 - math.floor(0.65 * 100)
    assert mask[:kept].eq(1).all() and mask[kept:].eq(0).all()
    with torch.no_grad():
        layer.scores.copy_(torch.arange(100.0).view(10, 10) - 50.0)   # |s| decides, not s
    mask = layer.mask().flatten()
    assert mask.sum() == kept
    magnitude = (torch.arange(100.0) - 50.0).abs()
    assert magnitude[mask.bool()].min() >= magnitude[~mask.bool()].max()


def test_scores_are_the_only_trainable_tensors_and_train():
    torch.manual_seed(3)
    layer = SubnetLinear(20, 5, k=0.5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["scores"]
    before = layer.mask().clone()
    opt = torch.optim.SGD([layer.scores], lr=10.0)
    x, target = torch.randn(64, 20), torch.randint(0, 5, (64,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(layer(x), target).backward()
        opt.step()
    assert not torch.equal(before, layer.mask())     # the subnetwork changed


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001, float("nan"), float("inf")])
def test_bad_k_is_rejected(bad):
    with pytest.raises(ValueError, match="fraction"):
        SubnetLinear(4, 4, k=bad)
    layer = SubnetConv2d(2, 2, 3)
    with pytest.raises(ValueError):
        layer.k = bad
    with pytest.raises(TypeError):
        SubnetLinear(4, 4, k="0.5")
    with pytest.raises(ValueError, match="unknown init"):
        SubnetLinear(4, 4, init="xavier")


# ---------------------------------------------------------------------------------------------
# init modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_fan", [False, True])
@pytest.mark.parametrize("init", INIT_MODES)
def test_init_statistics(init, scale_fan):
    k = 0.25
    weight = torch.empty(256, 64, 3, 3)                # fan_in = 576
    init_weight_(weight, init, k=k, scale_fan=scale_fan, generator=torch.Generator().manual_seed(0))
    fan = 576 * (k if scale_fan else 1.0)
    std = math.sqrt(2.0) / math.sqrt(fan)
    if init == "signed_constant":
        assert torch.allclose(weight.abs(), torch.full_like(weight, std))
        assert abs((weight > 0).float().mean().item() - 0.5) < 0.01
    elif init == "unsigned_constant":
        assert torch.allclose(weight, torch.full_like(weight, std))
    else:
        assert abs(weight.mean().item()) < 0.02 * std
        assert abs(weight.std().item() / std - 1.0) < 0.01
        if init == "kaiming_uniform":
            assert weight.abs().max() <= math.sqrt(3.0) * std + 1e-7
            assert weight.abs().max() > 0.99 * math.sqrt(3.0) * std


def test_init_is_reproducible_with_a_generator_and_scores_follow_the_official_bound():
    a = init_weight_(torch.empty(8, 16), "signed_constant",
                     generator=torch.Generator().manual_seed(5))
    b = init_weight_(torch.empty(8, 16), "signed_constant",
                     generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    scores = init_scores_(torch.empty(512, 100), torch.Generator().manual_seed(0))
    bound = 1.0 / math.sqrt(100)
    assert scores.abs().max() <= bound and scores.abs().max() > 0.99 * bound
    same = SubnetLinear(16, 8, generator=torch.Generator().manual_seed(7))
    again = SubnetLinear(16, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(same.weight, again.weight) and torch.equal(same.scores, again.scores)
    with pytest.raises(ValueError):
        init_weight_(torch.empty(4), "kaiming_normal")


def test_nonaffine_batchnorm_has_no_parameters():
    bn = NonAffineBatchNorm2d(8)
    assert list(bn.parameters()) == [] and bn.running_mean.shape == (8,)
    x = torch.randn(16, 8, 4, 4) * 3 + 2
    y = bn(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# from_dense / to_dense / state_dict
# ---------------------------------------------------------------------------------------------


def test_from_dense_keeps_weights_and_k1_equals_dense():
    torch.manual_seed(4)
    dense = nn.Linear(10, 6)
    sub = SubnetLinear.from_dense(dense, k=1.0)
    assert torch.equal(sub.weight, dense.weight) and torch.equal(sub.bias, dense.bias)
    x = torch.randn(3, 10)
    torch.testing.assert_close(sub(x), dense(x))
    fresh = SubnetLinear.from_dense(dense, k=0.5, init="signed_constant")
    assert not torch.equal(fresh.weight, dense.weight)
    assert torch.allclose(fresh.weight.abs(), torch.full_like(fresh.weight, math.sqrt(2 / 10)))
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1, bias=False)
    sub_conv = SubnetConv2d.from_dense(conv, k=1.0)
    xi = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(sub_conv(xi), conv(xi))


def test_to_dense_is_the_masked_layer():
    torch.manual_seed(5)
    for layer, x in ((SubnetLinear(9, 4, bias=True, k=0.3), torch.randn(5, 9)),
                     (SubnetConv2d(4, 6, 3, padding=1, stride=2, bias=True, k=0.2),
                      torch.randn(2, 4, 8, 8))):
        dense = layer.to_dense()
        assert type(dense) in (nn.Linear, nn.Conv2d)
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
        assert int((dense.weight != 0).sum()) == layer.num_kept()


def test_state_dict_round_trip_restores_weights_scores_and_k():
    torch.manual_seed(6)
    model = nn.Sequential(SubnetConv2d(3, 4, 3, k=0.3), nn.Flatten(),
                          SubnetLinear(4 * 6 * 6, 2, k=0.7, init="kaiming_uniform"))
    state = model.state_dict()
    clone = nn.Sequential(SubnetConv2d(3, 4, 3, k=0.9), nn.Flatten(),
                          SubnetLinear(4 * 6 * 6, 2, k=0.9))
    clone.load_state_dict(state)
    assert clone[0].k == 0.3 and clone[2].k == 0.7 and clone[2].init == "kaiming_uniform"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x))
    assert not clone[0].weight.requires_grad and clone[0].scores.requires_grad
    set_k_(clone, 0.5)
    assert clone[0].k == clone[2].k == 0.5
    assert abs(kept_fraction(clone) - 0.5) < 0.01


def test_nan_scores_are_never_kept_and_degenerate_shapes_are_refused():
    torch.manual_seed(8)
    layer = SubnetLinear(6, 4, k=0.5)
    with torch.no_grad():
        layer.scores[0, :3] = float("nan")
    mask = layer.mask()
    assert mask[0, :3].eq(0).all() and mask.sum() == layer.num_kept()
    assert layer(torch.randn(3, 6)).isfinite().all()
    with pytest.raises(ValueError, match="fan"), warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # torch: "zero-element tensors"
        SubnetLinear(0, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    torch.manual_seed(9)
    layer = SubnetConv2d(2, 3, 3, padding=1, k=0.4, dtype=dtype)
    x = torch.randn(1, 2, 5, 5, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = F.conv2d(x, layer.weight * ref.topk_mask(layer.scores.detach().abs(), 0.4),
                        padding=1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-10
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
