"""Seed-regenerated signs (subkern.nn.init.seeded_signs), Supermask layers in seed mode, their
artifacts (export_supermask(signs=...)), and the Supermask layers' prepacked cache."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from _helpers import rewrite_metadata
from torch import nn

import subkern  # noqa: F401
from subkern.backend import use_backend
from subkern.deploy import DeployFormatError, export_supermask, load_supermask, read_metadata
from subkern.deploy import supermask as supermask_format
from subkern.deploy.artifact import check_metadata, parse_header
from subkern.nn.init import init_std, init_weight_, seeded_signs
from subkern.nn.subnet import SubnetConv2d, SubnetLinear
from subkern.nn.supermask import SupermaskConv2d, SupermaskLinear
from subkern.ops import ternary as T

M64 = (1 << 64) - 1


def _mix(z: int) -> int:   # the docstring's definition, written out independently
    z &= M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def python_signs(seed: int, n: int, start: int = 0) -> list[bool]:
    key = _mix(seed)
    return [(_mix(key + (i + 1) * 0x9E3779B97F4A7C15) >> 63) == 1 for i in range(start, n)]


def as_int(bits: torch.Tensor) -> int:
    return sum(int(b) << i for i, b in enumerate(bits.tolist()))


# ------------------------------------------------------------------------------------------
# generator and init
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 12345, -1, -(1 << 63), (1 << 63) - 1])
def test_seeded_signs_bit_exact(seed):
    assert seeded_signs(seed, 300).tolist() == python_signs(seed, 300)


def test_seeded_signs_pinned_and_chunked():
    # pinned values: a change of the generator would silently break deployed artifacts
    assert as_int(seeded_signs(0, 64)) == 0x9ECC3104737AFA89
    assert as_int(seeded_signs(-1, 64)) == 0xBD3FE87A4EAC2393
    n = (1 << 15) * 2 + 7                       # crosses the chunk boundaries
    long = seeded_signs(7, n)
    assert long[-50:].tolist() == python_signs(7, n, n - 50)
    assert long[(1 << 15) - 5:(1 << 15) + 5].tolist() == python_signs(7, (1 << 15) + 5,
                                                                      (1 << 15) - 5)
    assert 0.48 < long.float().mean() < 0.52
    assert seeded_signs(7, 0).shape == (0,)


def test_seeded_signs_bad_input():
    with pytest.raises(TypeError, match="sign_seed must be an int"):
        seeded_signs(1.5, 3)
    with pytest.raises(ValueError, match="fit in int64"):
        seeded_signs(1 << 63, 3)
    with pytest.raises(ValueError, match="numel"):
        seeded_signs(1, -1)


def test_init_weight_with_sign_seed():
    w = torch.empty(6, 10)
    torch.manual_seed(0)
    init_weight_(w, "signed_constant", sign_seed=3)
    std = init_std(w)
    expected = torch.where(seeded_signs(3, 60).reshape(6, 10), std, -std)
    assert torch.equal(w, expected)
    torch.manual_seed(1)                        # the global RNG plays no part
    w2 = init_weight_(torch.empty(6, 10), "signed_constant", sign_seed=3)
    assert torch.equal(w2, w)
    with pytest.raises(ValueError, match="signed_constant"):
        init_weight_(torch.empty(6, 10), "kaiming_normal", sign_seed=3)


def test_subnet_layers_with_sign_seed():
    a = SubnetLinear(20, 8, sign_seed=11)
    b = SubnetLinear(20, 8, sign_seed=11)
    assert torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight > 0, seeded_signs(11, 160).reshape(8, 20))
    c = SubnetConv2d(4, 6, 3, groups=2, sign_seed=-5)
    assert torch.equal(c.weight > 0, seeded_signs(-5, c.weight.numel()).reshape(c.weight.shape))
    # state_dict round trip keeps the seed
    d = SubnetLinear(20, 8)
    assert d.sign_seed is None
    d.load_state_dict(a.state_dict())
    assert d.sign_seed == 11 and torch.equal(d.weight, a.weight)
    assert "sign_seed=11" in repr(a)
    with pytest.raises(ValueError, match="signed_constant"):
        SubnetLinear(4, 4, init="kaiming_normal", sign_seed=1)
    # default unchanged: the generator draws the signs
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    e = SubnetLinear(20, 8, generator=g1)
    ref = init_weight_(torch.empty(8, 20), "signed_constant", 0.5, generator=g2)
    assert torch.equal(e.weight, ref)


# ------------------------------------------------------------------------------------------
# Supermask layers in seed mode
# ------------------------------------------------------------------------------------------

def trained_linear(inp: int = 70, out: int = 37, seed: int = 5, bias: bool = True
                   ) -> SubnetLinear:
    layer = SubnetLinear(inp, out, bias=bias, k=0.4, sign_seed=seed)
    with torch.no_grad():
        layer.scores.normal_()
        if bias:
            layer.bias.normal_()
    return layer


def test_supermask_linear_seed_mode():
    sub = trained_linear()
    layer = SupermaskLinear.from_subnet(sub, signs="seed")
    assert layer.sign_mode == "seed"
    assert set(layer.state_dict()) == {"mask_bits", "sign_seed", "scale", "bias"}
    assert int(layer.sign_seed) == 5
    x = torch.randn(3, 70)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), sub(x), atol=1e-5, rtol=1e-5)
    # a fresh seed-mode layer regenerates the sign bits from the loaded seed
    fresh = SupermaskLinear(70, 37, sign_mode="seed")
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.dense_weight(), sub.effective_weight())
    assert fresh.deploy_config() == {"in_features": 70, "out_features": 37, "bias": True,
                                     "sign_mode": "seed"}
    bits = SupermaskLinear.from_subnet(sub)            # default: bits
    assert bits.sign_mode == "bits" and "sign_bits" in bits.state_dict()
    assert "sign_mode" not in bits.deploy_config()
    with pytest.raises(RuntimeError, match="sign_mode='seed'"):
        bits.set_sign_seed(3)
    with pytest.raises(ValueError, match="sign_mode must be one of"):
        SupermaskLinear(3, 4, sign_mode="hash")


def test_seed_mode_needs_matching_signs():
    sub = trained_linear()
    with torch.no_grad():
        kept = sub.mask().bool()
        o, i = kept.nonzero()[0].tolist()
        sub.weight[o, i] *= -1                         # a kept sign the seed does not give
    with pytest.raises(ValueError, match="1 of the .* kept weights"):
        SupermaskLinear.from_subnet(sub, signs="seed")
    auto = SupermaskLinear.from_subnet(sub, signs="auto")
    assert auto.sign_mode == "bits"
    torch.testing.assert_close(auto.dense_weight(), sub.effective_weight())
    # a pruned weight's sign does not matter
    sub2 = trained_linear()
    with torch.no_grad():
        o, i = (~sub2.mask().bool()).nonzero()[0].tolist()
        sub2.weight[o, i] *= -1
    assert SupermaskLinear.from_subnet(sub2, signs="seed").sign_mode == "seed"
    # no seed at all
    plain = SubnetLinear(10, 4)
    with pytest.raises(ValueError, match="has none"):
        SupermaskLinear.from_subnet(plain, signs="seed")
    assert SupermaskLinear.from_subnet(plain, signs="auto").sign_mode == "bits"
    with pytest.raises(ValueError, match="signs must be one of"):
        SupermaskLinear.from_subnet(plain, signs="maybe")


def seeded_model(bias: bool = False) -> nn.Sequential:
    model = nn.Sequential(
        SubnetConv2d(3, 8, 3, padding=1, k=0.5, sign_seed=1), nn.ReLU(),
        SubnetConv2d(8, 8, 3, stride=2, groups=2, k=0.3, sign_seed=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        SubnetLinear(8, 10, bias=bias, k=0.5, sign_seed=3), nn.ReLU(), nn.Linear(10, 3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "scores"):
                m.scores.normal_()
    return model


@pytest.mark.parametrize("signs", ["seed", "bits", "auto"])
def test_export_load_roundtrip_both_modes(tmp_path, signs):
    model = seeded_model(bias=True)
    path = tmp_path / f"{signs}.safetensors"
    converted = export_supermask(model, path, signs=signs)
    loaded = load_supermask(path)
    mode = "bits" if signs == "bits" else "seed"
    expected_modes = {"0": mode, "2": mode, "6": mode}
    assert supermask_format.sign_modes(loaded) == expected_modes
    assert supermask_format.sign_modes(converted) == expected_modes
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    meta = read_metadata(path)
    assert json.loads(meta["sign_modes"]) == expected_modes
    assert int(meta["format_version"]) == (1 if mode == "bits" else 2)
    names = set(loaded.state_dict())
    assert ("0.sign_bits" in names) == (mode == "bits")
    assert ("0.sign_seed" in names) == (mode == "seed")
    arch = json.loads(meta["architecture"])
    assert ("sign_mode" in arch["children"][0][1]["config"]) == (mode == "seed")


def test_export_seed_mismatch_and_missing_seed(tmp_path):
    model = seeded_model()
    with torch.no_grad():
        layer = model[6]
        o, i = layer.mask().bool().nonzero()[0].tolist()
        layer.weight[o, i] *= -1
    with pytest.raises(DeployFormatError, match="layer '6'.*kept weights"):
        export_supermask(model, tmp_path / "x.safetensors", signs="seed")
    assert not os.listdir(tmp_path)
    export_supermask(model, tmp_path / "auto.safetensors", signs="auto")
    modes = json.loads(read_metadata(tmp_path / "auto.safetensors")["sign_modes"])
    assert modes == {"0": "seed", "2": "seed", "6": "bits"}
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(load_supermask(tmp_path / "auto.safetensors")(x), model(x),
                                   atol=1e-5, rtol=1e-5)
    plain = nn.Sequential(SubnetLinear(5, 3))
    with pytest.raises(DeployFormatError, match="has none"):
        export_supermask(plain, tmp_path / "p.safetensors", signs="seed")
    with pytest.raises(ValueError, match="signs must be one of"):
        export_supermask(plain, tmp_path / "p.safetensors", signs="both")


def test_seed_artifact_is_32x_smaller(tmp_path):
    layer = SubnetLinear(1024, 1024, k=0.5, sign_seed=9)
    path_seed, path_bits = tmp_path / "seed.safetensors", tmp_path / "bits.safetensors"
    export_supermask(nn.Sequential(layer), path_seed, signs="seed")
    export_supermask(nn.Sequential(layer), path_bits, signs="bits")
    fp32_bytes = 1024 * 1024 * 4
    ratio_seed = fp32_bytes / os.path.getsize(path_seed)
    ratio_bits = fp32_bytes / os.path.getsize(path_bits)
    assert ratio_seed > 31.5, f"{ratio_seed:.2f}x"     # 1 bit per weight + header
    assert 15.9 < ratio_bits < 16.0, f"{ratio_bits:.2f}x"


def test_seed_artifact_corrupt_or_unknown_to_old_loader(tmp_path):
    path = tmp_path / "m.safetensors"
    export_supermask(seeded_model(), path, signs="seed")
    data = path.read_bytes()
    header = parse_header(data, str(path))
    # a loader that knows only version 1 (no seed mode) refuses it clearly
    with pytest.raises(DeployFormatError, match="newer"):
        check_metadata(header, str(path), {supermask_format.FORMAT_NAME: 1})
    bad = tmp_path / "bad.safetensors"
    for blob, msg in [(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:], "checksum"),
                      (data[:-20], "truncated"),
                      (rewrite_metadata(data, format_version="3"), "newer")]:
        bad.write_bytes(blob)
        with pytest.raises(DeployFormatError, match=msg):
            load_supermask(bad)
    # a seed-mode tree whose tensors are bits-mode ones does not load silently
    bits = tmp_path / "bits.safetensors"
    export_supermask(seeded_model(), bits, signs="bits")
    seed_arch = read_metadata(path)["architecture"]
    from safetensors.torch import load, save

    tensors = load(bits.read_bytes())
    meta = read_metadata(bits)
    meta["architecture"] = seed_arch
    bad.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(DeployFormatError, match="do not match the architecture"):
        load_supermask(bad)


# ------------------------------------------------------------------------------------------
# the prepacked cache of the Supermask layers
# ------------------------------------------------------------------------------------------

def random_supermask(out: int = 40, inp: int = 50) -> SupermaskLinear:
    w = torch.where(torch.rand(out, inp) < 0.5, 0.1, -0.1)
    return SupermaskLinear.from_weight_and_mask(w, torch.rand(out, inp) < 0.5, torch.randn(out))


def test_prepacked_cache_follows_the_bits():
    layer = random_supermask()
    x = torch.randn(3, 50)

    def expected() -> torch.Tensor:
        return torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)

    torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
    if T.prepacked_preferred(x, 50):
        assert "_prepacked_cache" in layer.__dict__
    assert not any("prepacked" in k for k in layer.state_dict())
    with torch.no_grad():
        layer.mask_bits[3:7] = 0                       # in place: version bump
        layer.sign_bits.bitwise_not_()
    torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
    other = random_supermask()
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
    layer.mask_bits = other.mask_bits.clone()          # a new tensor
    layer.sign_bits = torch.zeros_like(layer.sign_bits)
    torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
    clone = copy.deepcopy(layer)
    assert "_prepacked_cache" not in clone.__dict__
    torch.testing.assert_close(clone(x), layer(x))
    with use_backend("reference"):
        torch.testing.assert_close(layer(x), expected(), atol=1e-5, rtol=1e-5)
    # larger batches than the prepacked path takes
    big = torch.randn(T.PREPACKED_MAX_BATCH + 1, 50)
    torch.testing.assert_close(layer(big), torch.nn.functional.linear(
        big, layer.dense_weight(), layer.bias), atol=1e-5, rtol=1e-5)


def test_prepacked_cache_with_inference_mode_and_groups():
    sub = SubnetConv2d(4, 6, 3, groups=2, padding=1, k=0.5, sign_seed=4, bias=True)
    with torch.no_grad():
        sub.bias.normal_()
    with torch.inference_mode():
        layer = SupermaskConv2d.from_subnet(sub, signs="auto")
        x = torch.randn(1, 4, 2, 2)                    # 4 im2col rows: the prepacked path
        y = layer(x)
    assert layer.sign_mode == "seed"
    with torch.no_grad():
        torch.testing.assert_close(y, sub(x), atol=1e-5, rtol=1e-5)


def test_supermask_layer_gradient_through_prepacked_path():
    layer = random_supermask()
    x = torch.randn(3, 50, requires_grad=True)
    y = layer(x)
    assert y.requires_grad
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ layer.dense_weight(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not layer(x).requires_grad
    x3 = torch.randn(2, 2, 50)
    torch.testing.assert_close(layer(x3), torch.nn.functional.linear(
        x3, layer.dense_weight(), layer.bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 50\]"):
        layer(torch.randn(2, 49))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.randn(2, 50, dtype=torch.float64))


def test_prepacked_path_only_with_avx512():
    from subkern import _ext

    module = _ext.extension()
    if module is None:
        pytest.skip("subkern._C not built")
    layer = random_supermask()
    x = torch.randn(2, 50)
    expected = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
    for isa in ("avx2", "portable"):
        try:
            module.set_cpu_isa(isa)
        except Exception as err:  # noqa: BLE001 - this CPU lacks the level
            pytest.skip(f"ISA {isa} unavailable: {err}")
        try:
            assert not T.prepacked_preferred(x, 50)   # the bit-mask kernel is faster there
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        finally:
            module.set_cpu_isa("auto")
    assert T.prepacked_preferred(x, 50) == (module.cpu_isa() == "avx512vpopcntdq")
    assert not T.prepacked_preferred(torch.randn(T.PREPACKED_MAX_BATCH + 1, 50), 50)
    with use_backend("reference"):
        assert not T.prepacked_preferred(x, 50)
