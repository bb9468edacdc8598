"""SparseLinear / SparseConv2d: parity with the dense modules in every format and edge case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import subkern  # noqa: F401
from subkern.nn.sparse import (
    SparseConv2d,
    SparseLinear,
    choose_conv_format,
    effective_weight,
)


def _prune_(module: nn.Module, density: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.mul_((torch.rand(module.weight.shape, generator=g) < density).float())
    return module


def _tol(value_dtype):
    return (1e-5, 1e-5) if value_dtype in (None, torch.float32) else (3e-2, 2e-2)


def _expected_linear(lin: nn.Linear, x: torch.Tensor, value_dtype) -> torch.Tensor:
    w = lin.weight if value_dtype is None else lin.weight.to(value_dtype).float()
    return F.linear(x, w, lin.bias)


# ------------------------------------------------------------------------------------------
# SparseLinear
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csr", "bitmap", "dense"])
@pytest.mark.parametrize("value_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inp,out,density,bias", [(1, 1, 1.0, True), (70, 33, 0.2, True),
                                                  (129, 5, 0.05, False), (64, 17, 0.0, True),
                                                  (200, 3, 1.0, False)])
def test_linear_matches_dense(fmt, value_dtype, inp, out, density, bias):
    lin = _prune_(nn.Linear(inp, out, bias=bias), density)
    layer = SparseLinear.from_dense(lin, fmt, value_dtype)
    assert layer.format == fmt
    x = torch.randn(6, inp)
    atol, rtol = _tol(value_dtype)
    torch.testing.assert_close(layer(x), _expected_linear(lin, x, value_dtype), atol=atol,
                               rtol=rtol)
    if value_dtype is None:
        torch.testing.assert_close(layer.to_dense().weight, lin.weight, atol=0, rtol=0)
    assert layer.nnz == (int((lin.weight != 0).sum()) if fmt != "dense" else 0)


@pytest.mark.parametrize("fmt", ["csr", "bitmap", "dense"])
def test_linear_edge_inputs(fmt):
    lin = _prune_(nn.Linear(48, 20), 0.3)
    layer = SparseLinear.from_dense(lin, fmt)
    empty = torch.randn(0, 48)
    assert layer(empty).shape == (0, 20)
    x3 = torch.randn(2, 3, 48)
    torch.testing.assert_close(layer(x3), lin(x3), atol=1e-5, rtol=1e-5)
    xt = torch.randn(48, 7).t()                              # non-contiguous
    assert not xt.is_contiguous()
    torch.testing.assert_close(layer(xt), lin(xt), atol=1e-5, rtol=1e-5)
    xb = torch.randn(4, 48).bfloat16()                       # bf16 activation
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), lin(xb.float()), atol=5e-2, rtol=3e-2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 48\]"):
        layer(torch.randn(4, 47))


def test_linear_from_weight_and_explicit_bias():
    w = torch.randn(9, 30) * (torch.rand(9, 30) < 0.1)
    b = torch.randn(9)
    layer = SparseLinear.from_dense(w, "csr", bias=b)
    x = torch.randn(5, 30)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert SparseLinear.from_dense(w, "csr").bias is None
    assert SparseLinear.from_dense(nn.Linear(30, 9), bias=None).bias is None


def test_linear_auto_format_follows_choose_format():
    from subkern.ops.sparse_linear import choose_format

    for density in (0.0, 0.02, 0.2, 0.9):
        lin = _prune_(nn.Linear(512, 256), density)
        nnz = int((lin.weight != 0).sum())
        for batch in (1, 64):
            layer = SparseLinear.from_dense(lin, batch_hint=batch)
            assert layer.format == choose_format(256, 512, nnz, batch)


def test_linear_state_dict_roundtrip_through_config():
    lin = _prune_(nn.Linear(100, 40), 0.1)
    for fmt in ("csr", "bitmap", "dense"):
        src = SparseLinear.from_dense(lin, fmt, torch.bfloat16)
        dst = SparseLinear(**src.deploy_config())
        dst.load_state_dict(src.state_dict(), strict=True)
        x = torch.randn(3, 100)
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
        assert dst.deploy_config() == src.deploy_config()


def test_linear_int32_indices_and_errors():
    lin = _prune_(nn.Linear(40, 8), 0.3)
    layer = SparseLinear.from_dense(lin, "csr", index_dtype=torch.int32)
    assert layer.col_idx.dtype == torch.int32
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="format"):
        SparseLinear(4, 4, format="blocked")
    with pytest.raises(TypeError, match="value_dtype"):
        SparseLinear(4, 4, value_dtype=torch.float64)
    with pytest.raises(TypeError, match="index_dtype"):
        SparseLinear(4, 4, index_dtype=torch.int64)
    with pytest.raises(ValueError, match="int16 column indices"):
        SparseLinear(70000, 1, index_dtype="int16")
    with pytest.raises(ValueError, match="nnz"):
        SparseLinear(4, 4, nnz=17)
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear.from_dense(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="nn.Module or a tensor"):
        SparseLinear.from_dense([[1.0]])


def test_check_structure_catches_corruption():
    layer = SparseLinear.from_dense(_prune_(nn.Linear(50, 10), 0.3), "csr")
    layer.check_structure()
    bad = SparseLinear(**layer.deploy_config())
    bad.load_state_dict(layer.state_dict())
    bad.row_ptr[3] = bad.row_ptr[4] + 1
    with pytest.raises(ValueError, match="row_ptr"):
        bad.check_structure()
    bad.load_state_dict(layer.state_dict())
    bad.col_idx[0] = 60
    with pytest.raises(ValueError, match="column index"):
        bad.check_structure()
    bm = SparseLinear.from_dense(_prune_(nn.Linear(50, 10), 0.3), "bitmap")
    bm.check_structure()
    bm.bitmap[0, 0] ^= 1
    with pytest.raises(ValueError, match="popcount"):
        bm.check_structure()


def test_effective_weight_duck_typing():
    lin = nn.Linear(12, 6)
    prune.l1_unstructured(lin, "weight", amount=0.75)
    w = effective_weight(lin)
    assert int((w == 0).sum()) == 54
    layer = SparseLinear.from_dense(lin, "csr")
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    str_mod = pytest.importorskip("subkern.nn.str")
    s = str_mod.STRLinear(20, 7, s_init=-2.0)
    layer = SparseLinear.from_dense(s, "bitmap")
    xs = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(layer(xs), s(xs), atol=1e-5, rtol=1e-5)


def test_input_gradient_flows():
    lin = _prune_(nn.Linear(16, 5), 0.4)
    layer = SparseLinear.from_dense(lin, "csr")
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 16), atol=1e-5, rtol=1e-5)


def test_linear_torch_compile_fullgraph():
    layer = SparseLinear.from_dense(_prune_(nn.Linear(32, 8), 0.2), "csr")
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(3, 32)
    torch.testing.assert_close(compiled(x), layer(x))


# ------------------------------------------------------------------------------------------
# SparseConv2d
# ------------------------------------------------------------------------------------------

CONV_CASES = [
    dict(cin=6, cout=9, k=3, padding=1),
    dict(cin=5, cout=7, k=3, stride=2),
    dict(cin=4, cout=6, k=3, dilation=2, padding=2, bias=False),
    dict(cin=6, cout=9, k=3, groups=3, padding=1),
    dict(cin=8, cout=8, k=3, groups=8, padding=1),            # depthwise
    dict(cin=6, cout=10, k=1),
    dict(cin=6, cout=10, k=1, stride=2, bias=False),
    dict(cin=3, cout=4, k=(1, 3), stride=(2, 1), padding=(0, 1)),
    dict(cin=4, cout=5, k=1, padding=1),
]


def _conv(case: dict, density: float) -> nn.Conv2d:
    c = dict(case)
    conv = nn.Conv2d(c.pop("cin"), c.pop("cout"), c.pop("k"), **c)
    return _prune_(conv, density)


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_conv_matches_dense(case, fmt):
    conv = _conv(case, 0.3)
    layer = SparseConv2d.from_dense(conv, fmt)
    for n in (1, 3):
        x = torch.randn(n, conv.in_channels, 11, 10)
        torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
    x0 = torch.randn(0, conv.in_channels, 11, 10)
    assert layer(x0).shape == conv(x0).shape
    torch.testing.assert_close(layer.to_dense().weight, conv.weight, atol=0, rtol=0)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("value_dtype", [None, torch.bfloat16])
def test_conv_extremes_and_half_values(density, value_dtype):
    conv = _conv(dict(cin=4, cout=6, k=3, padding=1), density)
    layer = SparseConv2d.from_dense(conv, "csr", value_dtype)
    x = torch.randn(2, 4, 7, 9)
    w = conv.weight if value_dtype is None else conv.weight.to(value_dtype).float()
    expected = F.conv2d(x, w, conv.bias, padding=1)
    atol, rtol = _tol(value_dtype)
    torch.testing.assert_close(layer(x), expected, atol=atol, rtol=rtol)
    assert layer.density() == pytest.approx(density)


def test_conv_non_contiguous_and_bf16_input():
    conv = _conv(dict(cin=6, cout=5, k=3, padding=1), 0.3)
    layer = SparseConv2d.from_dense(conv, "csr")
    x = torch.randn(2, 6, 8, 8).to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
    xs = torch.randn(2, 6, 16, 8)[:, :, ::2]                 # strided view
    torch.testing.assert_close(layer(xs), conv(xs), atol=1e-5, rtol=1e-5)
    one = SparseConv2d.from_dense(_conv(dict(cin=6, cout=5, k=1, stride=2), 0.3), "csr")
    torch.testing.assert_close(one(xs), one.to_dense()(xs), atol=1e-5, rtol=1e-5)
    xo = torch.randn(2, 6, 16, 8)[:, :, 3:11]                # a view with a storage offset
    for m in (one, SparseConv2d.from_dense(_conv(dict(cin=6, cout=5, k=1), 0.3), "csr")):
        torch.testing.assert_close(m(xo), m.to_dense()(xo), atol=1e-5, rtol=1e-5)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), conv(x.bfloat16().float()), atol=6e-2, rtol=3e-2)


def test_conv_config_roundtrip_and_errors():
    conv = _conv(dict(cin=6, cout=9, k=3, groups=3, padding=1, stride=2), 0.2)
    src = SparseConv2d.from_dense(conv, "csr", torch.float16)
    dst = SparseConv2d(**src.deploy_config())
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(1, 6, 9, 9)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    assert choose_conv_format(8, 9, 0) == "csr"
    assert choose_conv_format(0, 9, 0) == "csr"
    # 1x1 (no im2col): about 20 % density; a 3x3 conv pays the im2col copy over out rows
    assert choose_conv_format(256, 64, int(0.15 * 256 * 64), im2col=False) == "csr"
    assert choose_conv_format(256, 64, int(0.25 * 256 * 64), im2col=False) == "dense"
    assert choose_conv_format(64, 576, int(0.05 * 64 * 576)) == "csr"
    assert choose_conv_format(64, 576, int(0.15 * 64 * 576)) == "dense"
    assert choose_conv_format(512, 4608, int(0.15 * 512 * 4608)) == "csr"
    assert choose_conv_format(128, 1152, int(0.1 * 128 * 1152), stride=1) == "csr"
    assert choose_conv_format(128, 1152, int(0.1 * 128 * 1152), stride=2) == "dense"
    with pytest.raises(ValueError, match="nnz"):
        choose_conv_format(2, 2, 5)
    with pytest.raises(ValueError, match="format"):
        SparseConv2d(4, 4, 3, format="bitmap")
    with pytest.raises(ValueError, match="divisible by groups"):
        SparseConv2d(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="numeric padding"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding="same"))
    with pytest.raises(ValueError, match=r"\[N, 6, H, W\]"):
        src(torch.randn(1, 5, 9, 9))
    with pytest.raises(ValueError, match="too small"):
        SparseConv2d.from_dense(_conv(dict(cin=2, cout=2, k=5), 0.5), "csr")(
            torch.randn(1, 2, 3, 3))


def test_conv_torch_compile_fullgraph():
    layer = SparseConv2d.from_dense(_conv(dict(cin=4, cout=6, k=3, padding=1, stride=2), 0.3),
                                    "csr")
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(compiled(x), layer(x))


def test_conv_from_weight_with_geometry():
    w = torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.3)
    layer = SparseConv2d.from_dense(w, "csr", stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, stride=2, padding=1), atol=1e-5,
                               rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), groups=st.integers(1, 3),
       kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), n=st.integers(0, 2),
       density=st.sampled_from([0.0, 0.3, 1.0]), bias=st.booleans())
def test_conv_property_matches_dense(cin_g, cout_g, groups, kh, kw, stride, padding, dilation,
                                     n, density, bias):
    conv = _prune_(nn.Conv2d(cin_g * groups, cout_g * groups, (kh, kw), stride, padding,
                             dilation, groups, bias=bias), density)
    x = torch.randn(n, cin_g * groups, 7, 6)
    layer = SparseConv2d.from_dense(conv, "csr")
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)
