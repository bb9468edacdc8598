"""Supermask layers and the deployment artifact (export / load) of edge-popup models."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import rewrite_metadata
from torch import nn

import subkern  # noqa: F401
from subkern.deploy import (
    FORMAT_VERSION,
    DeployFormatError,
    export_supermask,
    load_supermask,
    read_metadata,
)
from subkern.deploy import supermask as supermask_format
from subkern.nn.supermask import SupermaskConv2d, SupermaskLinear
from subkern.ops import topk_mask_reference


class StandInLinear(nn.Module):
    """Minimal edge-popup Linear: ``F.linear(x, W * topk_mask(scores, k), b)``."""

    def __init__(self, inp: int, out: int, k: float = 0.5, bias: bool = True,
                 scale: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.sign(torch.randn(out, inp)) * scale,
                                   requires_grad=False)
        self.scores = nn.Parameter(torch.randn(out, inp))
        self.bias = nn.Parameter(torch.randn(out)) if bias else None
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * topk_mask_reference.topk_mask(self.scores, self.k),
                        self.bias)


class StandInConv(nn.Conv2d):
    def __init__(self, cin: int, cout: int, ks: int, k: float = 0.5, **kw) -> None:
        super().__init__(cin, cout, ks, **kw)
        with torch.no_grad():
            self.weight.copy_(torch.sign(torch.randn_like(self.weight)) * 0.2)
        self.scores = nn.Parameter(torch.randn_like(self.weight))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * topk_mask_reference.topk_mask(self.scores, self.k)
        return self._conv_forward(x, w, self.bias)


def conv_model() -> nn.Module:
    return nn.Sequential(
        StandInConv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(StandInConv(8, 8, 3, stride=2, groups=2, dilation=1, bias=False),
                      nn.ReLU()),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1),
        StandInLinear(8, 10), nn.Identity(), nn.Linear(10, 3)).eval()


def _prime_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


# ------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inp,out,bias", [(1, 1, True), (70, 9, True), (128, 5, False),
                                          (200, 33, True)])
def test_supermask_linear_from_subnet(inp, out, bias):
    src = StandInLinear(inp, out, bias=bias)
    layer = SupermaskLinear.from_subnet(src)
    x = torch.randn(6, inp)
    torch.testing.assert_close(layer(x), src(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.dense_weight(),
                               src.weight * topk_mask_reference.topk_mask(src.scores, src.k))
    # only packed bits, the scale and the bias are stored
    names = {n for n, _ in layer.named_buffers()} | {n for n, _ in layer.named_parameters()}
    assert names == ({"mask_bits", "sign_bits", "scale", "bias"} if bias
                     else {"mask_bits", "sign_bits", "scale"})


def test_from_weight_and_mask_rejects_non_constant():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="single c"):
        SupermaskLinear.from_weight_and_mask(w, torch.ones(4, 8))
    w = torch.sign(torch.randn(4, 8)) * 0.3
    w[0, 0] = 0.0
    with pytest.raises(ValueError, match="single c"):
        SupermaskLinear.from_weight_and_mask(w, torch.ones(4, 8))
    with pytest.raises(ValueError, match="0/1"):
        SupermaskLinear.from_weight_and_mask(w, torch.full((4, 8), 0.5))
    # the pruned entries may hold anything
    w[0, 0] = 123.0
    mask = torch.ones(4, 8)
    mask[0, 0] = 0
    layer = SupermaskLinear.from_weight_and_mask(w, mask)
    torch.testing.assert_close(layer.dense_weight(), w * mask)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2), dict(dilation=2, padding=2),
                                dict(groups=2), dict(groups=4, bias=False, stride=(1, 2))])
def test_supermask_conv_from_subnet(kw):
    src = StandInConv(8, 12, 3, **kw).eval()
    layer = SupermaskConv2d.from_subnet(src)
    x = torch.randn(2, 8, 9, 11)
    torch.testing.assert_close(layer(x), src(x), atol=1e-5, rtol=1e-5)


def test_real_subnet_layers():
    nn_mod = pytest.importorskip("subkern.nn.subnet")
    lin = nn_mod.SubnetLinear(70, 9, bias=True, k=0.3)
    conv = nn_mod.SubnetConv2d(4, 6, 3, padding=1, k=0.6)
    x = torch.randn(3, 70)
    xc = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(SupermaskLinear.from_subnet(lin)(x), lin(x), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(SupermaskConv2d.from_subnet(conv)(xc), conv(xc), atol=1e-5,
                                   rtol=1e-5)
    bad = nn_mod.SubnetLinear(8, 4, init="kaiming_normal")
    with pytest.raises(ValueError, match="single c"):
        SupermaskLinear.from_subnet(bad)


# ------------------------------------------------------------------------------------------
# artifact
# ------------------------------------------------------------------------------------------

def test_export_load_roundtrip(tmp_path):
    model = conv_model()
    _prime_batchnorm(model)
    path = tmp_path / "model.safetensors"
    export_supermask(model, path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    loaded = load_supermask(path)
    assert not loaded.training
    assert isinstance(loaded[0], SupermaskConv2d) and isinstance(loaded[8], SupermaskLinear)
    assert isinstance(loaded[10], nn.Linear)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    meta = read_metadata(path)
    assert meta["format"] == "subkern.supermask"
    # no seed-mode layer: written as version 1, readable by subkerns that predate version 2
    assert int(meta["format_version"]) == supermask_format.FORMAT_VERSION_BITS == 1
    assert meta["checksum"].startswith("sha256:")
    assert json.loads(meta["architecture"])["type"] == "Sequential"


def test_export_with_real_subnet_model(tmp_path):
    nn_mod = pytest.importorskip("subkern.nn.subnet")
    bn = pytest.importorskip("subkern.nn.batchnorm")
    model = nn.Sequential(nn_mod.SubnetConv2d(3, 8, 3, padding=1), bn.NonAffineBatchNorm2d(8),
                          nn.ReLU(), nn.Flatten(), nn_mod.SubnetLinear(8 * 6 * 6, 5, k=0.4)
                          ).eval()
    _prime_batchnorm(model)
    path = tmp_path / "m.safetensors"
    export_supermask(model, path)
    loaded = load_supermask(path)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)


def test_artifact_is_16x_smaller(tmp_path):
    g = torch.Generator().manual_seed(0)
    weight = torch.where(torch.rand(4096, 4096, generator=g) < 0.5, 0.01, -0.01)
    mask = torch.rand(4096, 4096, generator=g) < 0.5
    layer = SupermaskLinear.from_weight_and_mask(weight, mask)
    path = tmp_path / "big.safetensors"
    export_supermask(nn.Sequential(layer), path)
    fp32_bytes = 4096 * 4096 * 4
    tensors = load_supermask(path).state_dict()
    bits = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.endswith("_bits"))
    assert bits * 16 == fp32_bytes                       # exactly 2 bits per weight
    size = os.path.getsize(path)
    assert fp32_bytes / size > 15.99, f"{fp32_bytes / size:.3f}x"   # metadata: < 0.1 %


def test_unsupported_module_is_refused(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    model = nn.Sequential(StandInLinear(4, 4), Custom())
    with pytest.raises(DeployFormatError, match="Custom"):
        export_supermask(model, tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
    with pytest.raises(DeployFormatError, match="single c"):
        bad = StandInLinear(4, 4)
        bad.weight.data = torch.randn(4, 4)
        export_supermask(nn.Sequential(bad), tmp_path / "y.safetensors")


def _export_small(tmp_path) -> tuple[str, bytes]:
    path = tmp_path / "small.safetensors"
    export_supermask(nn.Sequential(StandInLinear(40, 6), nn.ReLU()), path)
    return str(path), path.read_bytes()


def test_corrupt_truncated_foreign_newer(tmp_path):
    path, data = _export_small(tmp_path)
    bad = tmp_path / "bad.safetensors"
    cases = {
        "truncated": data[:-10],
        "tiny": data[:5],
        "flipped": data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:],
        "garbage": b"\x00" * 64,
        "newer": rewrite_metadata(data, format_version=str(FORMAT_VERSION + 1)),
        "foreign": rewrite_metadata(data, format="someone.else"),
        "arch": rewrite_metadata(data, architecture=json.dumps({"type": "Transformer"})),
    }
    expected = {"truncated": "truncated", "tiny": "too short", "flipped": "checksum",
                "garbage": "not a", "newer": "newer", "foreign": "not a supermask",
                "arch": "unknown module"}
    for name, blob in cases.items():
        bad.write_bytes(blob)
        with pytest.raises(DeployFormatError, match=expected[name]):
            load_supermask(bad)
    assert issubclass(DeployFormatError, ValueError)
    # a foreign but valid safetensors file
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(bad))
    with pytest.raises(DeployFormatError, match="not a supermask"):
        load_supermask(bad)
    # the good one still loads
    load_supermask(path)
