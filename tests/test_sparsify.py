"""``sparsify_``: the module swap on an MLP, a ResNet and a user's model, filters, skips,
freezing, the config registry (the extension point for STR / SupSup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import subkern
from subkern.methods.edgepopup.models import BasicBlock, Builder, ResNet
from subkern.nn import SubnetConv2d, SubnetLinear
from subkern.sparsify import (
    METHODS,
    EdgePopupConfig,
    SparsifyConfig,
    get_config,
    register_method,
    sparsify_,
)


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _small_resnet() -> nn.Module:
    dense = Builder(subnet=False, init=None, bn="affine")
    return ResNet(dense, BasicBlock, (1, 1, 1, 1), (3, 16, 16), 5, imagenet_stem=False, width=8)


def test_mlp_every_linear_swapped_in_place_and_only_scores_train():
    torch.manual_seed(0)
    model = _mlp()
    out = sparsify_(model, EdgePopupConfig(k=0.3))
    assert out is model
    layers = [m for m in model if not isinstance(m, nn.ReLU)]
    assert all(type(m) is SubnetLinear and m.k == 0.3 for m in layers)
    assert all(m.init == "signed_constant" for m in layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.scores", "2.scores", "4.scores"]
    loss = model(torch.randn(8, 16)).square().mean()
    loss.backward()
    assert all(m.scores.grad is not None for m in layers)


def test_init_none_keeps_the_model_function_at_k1():
    torch.manual_seed(1)
    model = _mlp()
    x = torch.randn(5, 16)
    expected = model(x)
    sparsify_(model, EdgePopupConfig(k=1.0, init=None))
    torch.testing.assert_close(model(x), expected)


def test_resnet_convs_and_fc_swapped_bn_frozen_outputs_preserved():
    torch.manual_seed(2)
    model = _small_resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    sparsify_(model, EdgePopupConfig(k=1.0, init=None))
    assert sum(isinstance(m, SubnetConv2d) for m in model.modules()) == n_conv
    assert isinstance(model.fc, SubnetLinear)
    assert isinstance(model.layer2[0].shortcut[0], SubnetConv2d)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if not n.endswith("scores"))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_filter_fn_and_skip_first_last():
    model = _mlp()
    seen = []

    def only_hidden(module: nn.Module, fqn: str) -> bool:
        seen.append(fqn)
        return fqn == "2"

    sparsify_(model, EdgePopupConfig(), filter_fn=only_hidden)
    assert seen == ["0", "2", "4"]
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "SubnetLinear", "ReLU",
                                                 "Linear"]
    model = _mlp()
    sparsify_(model, EdgePopupConfig(skip_first=True, skip_last=True))
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "SubnetLinear", "ReLU",
                                                 "Linear"]
    assert model[0].weight.requires_grad          # skipped layers stay dense and trainable


def test_user_model_shared_layer_root_layer_and_idempotence():
    class User(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(6, 6)
            self.block = nn.ModuleDict({"a": self.shared, "conv": nn.Conv2d(1, 2, 3)})
            self.norm = nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.block["a"](self.shared(x)))

    model = sparsify_(User(), EdgePopupConfig(k=0.5))
    assert model.shared is model.block["a"] and isinstance(model.shared, SubnetLinear)
    assert isinstance(model.block["conv"], SubnetConv2d)
    assert not model.norm.weight.requires_grad
    assert model(torch.randn(3, 6)).shape == (3, 6)
    before = model.shared
    sparsify_(model, EdgePopupConfig(k=0.1))      # already sparse: left alone
    assert model.shared is before and before.k == 0.5
    root = sparsify_(nn.Linear(3, 2), EdgePopupConfig())
    assert isinstance(root, SubnetLinear)
    model = sparsify_(User(), EdgePopupConfig(freeze_bn=False))
    assert model.norm.weight.requires_grad


def test_config_validation_and_registry_extension_point():
    with pytest.raises(ValueError):
        EdgePopupConfig(k=0.0)
    with pytest.raises(ValueError, match="unknown init"):
        EdgePopupConfig(init="nope")
    with pytest.raises(TypeError, match="SparsifyConfig"):
        sparsify_(_mlp(), {"k": 0.5})
    assert METHODS["edgepopup"] is EdgePopupConfig
    assert get_config("edgepopup", k=0.2).k == 0.2
    with pytest.raises(KeyError, match="unknown sparsify method"):
        get_config("nope")

    class HalfLinear(nn.Module):
        def __init__(self, dense: nn.Linear):
            super().__init__()
            self.dense = dense

        def forward(self, x):
            return 0.5 * self.dense(x)

    @register_method
    @dataclass
    class HalveConfig(SparsifyConfig):          # a toy method plugged in like STR / SupSup
        method: ClassVar[str] = "test-halve"

        def eligible(self, module):
            return type(module) is nn.Linear

        def convert(self, module, fqn):
            return HalfLinear(module)

    try:
        model = _mlp()
        x = torch.randn(2, 16)
        sparsify_(model, get_config("test-halve", skip_last=True))
        assert isinstance(model[0], HalfLinear) and type(model[4]) is nn.Linear
        assert model(x).shape == (2, 4)
        with pytest.raises(ValueError, match="already registered"):
            @register_method
            @dataclass
            class Clash(SparsifyConfig):
                method: ClassVar[str] = "test-halve"
        with pytest.raises(TypeError, match="method"):
            register_method(type("NoName", (SparsifyConfig,), {}))
    finally:
        METHODS.pop("test-halve", None)


def test_edgepopup_config_sign_seed_gives_per_layer_seeds_and_seed_artifacts(tmp_path):
    from subkern.sparsify import layer_sign_seed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    subkern.sparsify_(model, subkern.EdgePopupConfig(k=0.5, sign_seed=7))
    assert model[0].sign_seed == layer_sign_seed(7, "0")
    assert model[2].sign_seed == layer_sign_seed(7, "2")
    assert model[0].sign_seed != model[2].sign_seed
    # the weights' signs are exactly the generator's, so the masks alone ship
    signs = subkern.nn.seeded_signs(model[0].sign_seed, model[0].weight.numel())
    assert torch.equal(model[0].weight.detach().reshape(-1) > 0, signs)
    path = tmp_path / "m.safetensors"
    subkern.deploy.export_supermask(model, path, signs="seed")
    deployed = subkern.deploy.load_supermask(path)
    x = torch.randn(3, 16)
    torch.testing.assert_close(deployed(x), model(x).detach())
    assert set(subkern.deploy.sign_modes(deployed).values()) == {"seed"}


def test_edgepopup_config_sign_seed_checks():
    with pytest.raises(ValueError, match="sign_seed needs init='signed_constant'"):
        subkern.EdgePopupConfig(sign_seed=1, init="kaiming_normal")
    with pytest.raises(TypeError, match="sign_seed"):
        subkern.EdgePopupConfig(sign_seed="1")
