"""STR layers (STRLinear, STRConv2d) and the ``str`` sparsify method: forward and gradients against
STR's formula, from_dense / to_dense / state_dict, sparsity reports, the module swap, and that
weight decay on ``s`` makes a layer sparser (how STR learns its budget)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subkern
from subkern.nn.str import STRConv2d, STRLinear, overall_sparsity, str_modules
from subkern.ops import soft_threshold as st
from subkern.sparsify import METHODS, EdgePopupConfig, STRConfig, get_config, sparsify_


def _weff(weight, s):
    s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (weight.dim() - 1)))
    return torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(s))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_linear_and_conv_follow_the_formula_and_train_every_parameter(backend, per_channel):
    lin = STRLinear(12, 7, s_init=-2.0, per_channel=per_channel)
    conv = STRConv2d(4, 6, 3, stride=2, padding=1, groups=2, s_init=-1.5,
                     per_channel=per_channel)
    assert lin.s.shape == ((7,) if per_channel else ())
    assert conv.s.shape == ((6,) if per_channel else ())
    assert lin.per_channel is per_channel
    x = torch.randn(3, 5, 12)
    xc = torch.randn(2, 4, 9, 9)
    with subkern.use_backend(backend):
        y = lin(x)
        z = conv(xc)
    torch.testing.assert_close(y, F.linear(x, _weff(lin.weight, lin.s), lin.bias))
    torch.testing.assert_close(z, F.conv2d(xc, _weff(conv.weight, conv.s), conv.bias, 2, 1, 1,
                                           2))
    (y.square().sum() + z.square().sum()).backward()
    for module in (lin, conv):
        assert {n for n, p in module.named_parameters() if p.requires_grad} == {"weight", "s",
                                                                                 "bias"}
        for p in module.parameters():
            assert p.grad is not None and p.grad.shape == p.shape


def test_from_dense_keeps_weights_and_a_very_negative_s_is_the_dense_layer():
    dense = nn.Linear(10, 4)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    lin = STRLinear.from_dense(dense)               # s_init = -100: sigmoid ~ 4e-44
    sconv = STRConv2d.from_dense(conv, s_init=-3200.0, per_channel=True)
    assert torch.equal(lin.weight, dense.weight) and torch.equal(lin.bias, dense.bias)
    assert sconv.bias is None and sconv.s.shape == (5,)
    x = torch.randn(6, 10)
    xc = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(lin(x), dense(x), rtol=0, atol=0)
    torch.testing.assert_close(sconv(xc), conv(xc), rtol=0, atol=0)
    assert lin.sparsity() == 0.0 and sconv.sparsity() == 0.0
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        STRLinear.from_dense(conv)
    with pytest.raises(TypeError, match="must be an nn.Conv2d"):
        STRConv2d.from_dense(dense)


def test_threshold_effective_weight_sparsity_and_to_dense():
    torch.manual_seed(0)
    lin = STRLinear(50, 40, s_init=-1.0)        # threshold sigmoid(-1) ~ 0.27
    conv = STRConv2d(3, 8, 3, padding=1, s_init=0.0, per_channel=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.4)
        conv.s.copy_(torch.linspace(-4, 1, 8))
    torch.testing.assert_close(lin.threshold(), torch.sigmoid(torch.tensor(-1.0)))
    assert not lin.threshold().requires_grad and not lin.effective_weight().requires_grad
    weff = lin.effective_weight()
    torch.testing.assert_close(weff, _weff(lin.weight.detach(), lin.s.detach()))
    want = float((lin.weight.abs() <= lin.threshold()).float().mean())
    assert lin.sparsity() == pytest.approx(want) and 0.1 < lin.sparsity() < 0.9
    assert lin.nonzeros() == int((weff != 0).sum())
    # per-channel: sparsity grows with the channel's threshold
    per_row = (conv.effective_weight() == 0).flatten(1).float().mean(1)
    assert torch.all(per_row[1:] >= per_row[:-1])
    x = torch.randn(4, 50)
    xc = torch.randn(1, 3, 6, 6)
    dense, dconv = lin.to_dense(), conv.to_dense()
    assert type(dense) is nn.Linear and type(dconv) is nn.Conv2d
    torch.testing.assert_close(dense(x), lin(x))
    torch.testing.assert_close(dconv(xc), conv(xc))
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(40, 2))
    assert [name for name, _ in str_modules(model)] == ["0"]
    assert overall_sparsity(model) == pytest.approx(lin.sparsity())
    assert math.isnan(overall_sparsity(nn.Linear(2, 2)))   # no STR layer


@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip(per_channel):
    a = STRConv2d(4, 6, 3, s_init=-2.0, per_channel=per_channel)
    with torch.no_grad():
        a.s.add_(torch.rand_like(a.s))
    b = STRConv2d(4, 6, 3, s_init=-50.0, per_channel=per_channel)
    assert set(a.state_dict()) == {"weight", "s", "bias"}
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    lin = STRLinear(3, 2, bias=False)
    lin2 = STRLinear(3, 2, bias=False)
    lin2.load_state_dict(lin.state_dict())
    assert torch.equal(lin2.weight, lin.weight) and torch.equal(lin2.s, lin.s)


@pytest.mark.parametrize(("padding", "padding_mode"), [("same", "zeros"), (1, "reflect"),
                                                        ("valid", "zeros")])
def test_conv_padding_variants(padding, padding_mode):
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=padding_mode)
    sconv = STRConv2d.from_dense(conv, s_init=-1.0)
    ref = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=padding_mode)
    with torch.no_grad():
        ref.weight.copy_(_weff(conv.weight, sconv.s))
        ref.bias.copy_(conv.bias)
    x = torch.randn(2, 2, 7, 6)
    torch.testing.assert_close(sconv(x), ref(x))


def test_bfloat16_layer_and_bad_s_init():
    lin = STRLinear(16, 8, s_init=-1.0, dtype=torch.bfloat16)
    assert lin.s.dtype == torch.bfloat16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = lin(x)
    want = F.linear(x, st.reference_soft_threshold(lin.weight, lin.s), lin.bias)
    torch.testing.assert_close(y, want)
    y.float().sum().backward()
    assert lin.s.grad.dtype == torch.bfloat16
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="s_init must be finite"):
            STRLinear(2, 2, s_init=bad)
    with pytest.raises(TypeError, match="s_init must be a real number"):
        STRLinear(2, 2, s_init="-100")


def test_weight_decay_on_s_raises_the_threshold_and_the_sparsity():
    """STR's mechanism: the decay on s pulls it towards 0, sigmoid(s) up, more weights to 0."""
    torch.manual_seed(0)
    lin = STRLinear(64, 32, s_init=-4.0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, weight_decay=0.05)
    x = torch.randn(64, 64)
    target = torch.randn(64, 32) * 0.1
    start = lin.sparsity()
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(lin(x), target).backward()
        opt.step()
    assert float(lin.s.detach()) > -4.0 and lin.sparsity() > start + 0.2


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(STRConv2d(3, 4, 3, padding=1, s_init=-2.0), nn.ReLU(), nn.Flatten(),
                          STRLinear(4 * 5 * 5, 3, s_init=-1.0, per_channel=True))
    twin = nn.Sequential(*[m for m in model])   # the same parameters
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 5, 5)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.square().sum().backward()
    for p, g in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, g)


# --------------------------------------------------------------------------------------------
# sparsify_ with STRConfig
# --------------------------------------------------------------------------------------------

def _model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_sparsify_swaps_every_layer_keeps_the_function_and_everything_trains():
    torch.manual_seed(0)
    model = _model().eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    out = sparsify_(model, STRConfig())
    assert out is model
    kinds = [type(m) for m in model]
    assert kinds.count(STRConv2d) == 2 and kinds.count(STRLinear) == 2
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)   # s_init=-100: still dense
    assert all(p.requires_grad for p in model.parameters())        # W, s, BatchNorm train
    assert all(m.s.shape == () for _, m in str_modules(model))
    # idempotent: STR layers carry the _subkern_sparse marker
    assert STRLinear._subkern_sparse and sparsify_(model, STRConfig()) is model
    assert [type(m) for m in model] == kinds
    # edge-popup does not swap STR layers either
    sparsify_(model, EdgePopupConfig(k=0.5))
    assert [type(m) for m in model] == kinds


def test_sparsify_options_skip_first_last_and_per_channel():
    model = sparsify_(_model(), STRConfig(s_init=-3.0, per_channel=True, skip_first=True,
                                          skip_last=True))
    assert type(model[0]) is nn.Conv2d and type(model[8]) is nn.Linear
    assert isinstance(model[3], STRConv2d) and isinstance(model[6], STRLinear)
    assert model[3].s.shape == (8,) and float(model[3].s.detach()[0]) == -3.0
    assert METHODS["str"] is STRConfig
    cfg = get_config("str", s_init=-50, per_channel=False)
    assert isinstance(cfg, STRConfig) and cfg.s_init == -50.0
    layer = sparsify_(nn.Linear(3, 2), STRConfig())
    assert isinstance(layer, STRLinear)
    with pytest.raises(ValueError, match="s_init must be finite"):
        STRConfig(s_init=float("nan"))
    with pytest.raises(TypeError, match="s_init must be a real number"):
        STRConfig(s_init=None)
    with pytest.raises(TypeError, match="skip_first must be a bool"):
        STRConfig(-100.0)   # positional: would land in the base class's skip_first
    with pytest.raises(TypeError, match="per_channel must be a bool"):
        STRConfig(per_channel=1)
