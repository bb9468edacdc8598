"""subkern.deploy.export / load: sparse artifacts of pruned, STR and ResNet models."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import subkern  # noqa: F401
from subkern import deploy
from subkern.deploy import DeployFormatError, Residual
from subkern.deploy.artifact import checksum
from subkern.methods.edgepopup.models import Builder, build_model
from subkern.nn.sparse import SparseConv2d, SparseLinear


def _sparsify_weights_(model: nn.Module, density: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_((torch.rand(m.weight.shape, generator=g) < density).float())
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.uniform_(-0.2, 0.2, generator=g)
    return model


def _resnet(name: str = "cresnet18", width: float = 0.125, bn: str = "affine") -> nn.Module:
    model = build_model(name, Builder(subnet=False, init=None, bn=bn), (3, 12, 12), 10, width)
    return _sparsify_weights_(model, 0.15).eval()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol)


def test_resnet50_roundtrip_and_torch_export(tmp_path):
    model = _resnet("resnet50", width=0.0625)
    path = tmp_path / "r.safetensors"
    converted = deploy.export(model, path)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    loaded = deploy.load(path)
    assert not loaded.training
    kinds = {type(m) for m in loaded.modules()}
    assert {SparseConv2d, SparseLinear, Residual} <= kinds
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())   # all folded
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        _close(loaded(x), model(x))
        _close(converted(x), loaded(x), 1e-6)
        ep = torch.export.export(loaded, (x,))
        _close(ep.module()(x), loaded(x), 1e-6)
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert header["__metadata__"]["format"] == "subkern.sparse"
    assert int(header["__metadata__"]["format_version"]) == deploy.SPARSE_FORMAT_VERSION


def test_no_fold_keeps_batchnorm_and_formats_by_layer(tmp_path):
    model = _resnet(bn="nonaffine")
    formats = {"conv1": "dense", "fc": "bitmap"}
    path = tmp_path / "m.safetensors"
    deploy.export(model, path, formats=formats, fold_batchnorm=False,
                  value_dtype=torch.bfloat16)
    loaded = deploy.load(path)
    assert loaded.conv1.format == "dense" and loaded.fc.format == "bitmap"
    assert loaded.conv1.value_dtype == "bfloat16"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in loaded.modules()) > 0
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        _close(loaded(x), model(x), 5e-2)


def test_pruned_and_str_mlp(tmp_path):
    lin1, lin2 = nn.Linear(30, 40), nn.Linear(40, 5)
    prune.l1_unstructured(lin1, "weight", amount=0.9)
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), nn.Dropout(0.2), lin2).eval()
    str_mod = pytest.importorskip("subkern.nn.str")
    s = str_mod.STRLinear(5, 3, s_init=-1.5)
    model.append(s)
    path = tmp_path / "mlp.safetensors"
    report = deploy.layer_report(deploy.export(model, path, formats="csr"))
    assert [r["layer"] for r in report] == ["1", "4", "5"]
    assert report[0]["density"] == pytest.approx(0.1, abs=0.01)
    loaded = deploy.load(path)
    x = torch.randn(4, 3, 10)
    with torch.no_grad():
        _close(loaded(x), model(x), 1e-5)
    # a single layer is exported as itself
    single = deploy.to_sparse(lin1)
    assert isinstance(single, SparseLinear)
    # the optional self-check on an example input
    deploy.export(model, path, example_input=x, value_dtype=torch.bfloat16)
    with pytest.raises(DeployFormatError, match="differs"):
        deploy.export(model, tmp_path / "never.safetensors", example_input=x,
                      value_dtype=torch.bfloat16, tolerance=1e-9)
    assert not (tmp_path / "never.safetensors").exists()


def test_edge_popup_and_str_resnet_layers(tmp_path):
    builder = Builder(subnet=True, k=0.3)
    model = build_model("cresnet18", builder, (3, 8, 8), 4, 0.125).eval()
    _sparsify_weights_(model, 1.0)          # primes the BatchNorm statistics only
    path = tmp_path / "ep.safetensors"
    deploy.export(model, path)
    loaded = deploy.load(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        _close(loaded(x), model(x))
    density = [m.density() for m in loaded.modules() if isinstance(m, SparseConv2d)]
    assert max(density) == pytest.approx(0.3, abs=0.02)


def test_fold_batchnorm_is_exact():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(6)
    model = _sparsify_weights_(nn.Sequential(conv, bn, nn.ReLU()), 0.5).eval()
    folded = deploy.to_sparse(model, formats="dense")
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        _close(folded(x), model(x), 1e-5)
    # training-mode statistics are not folded away silently: the copy is put in eval mode
    assert not deploy.to_sparse(model.train()).training


def test_unsupported_module_refused(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(DeployFormatError, match="Custom"):
        deploy.export(nn.Sequential(nn.Linear(4, 4), Custom()), tmp_path / "x.safetensors")
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="format for layer '0'"):
        deploy.export(nn.Sequential(nn.Linear(4, 4)), tmp_path / "y.safetensors",
                      formats="blocked")
    with pytest.raises(ValueError, match="batch_hint"):
        deploy.to_sparse(nn.Linear(2, 2), batch_hint=0)


def _rewrite(data: bytes, meta_changes: dict | None = None, tensors=None) -> bytes:
    from safetensors.torch import load, save

    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + size])["__metadata__"]
    meta.update(meta_changes or {})
    return save(tensors if tensors is not None else load(data), metadata=meta)


def test_corrupt_truncated_foreign_newer(tmp_path):
    model = nn.Sequential(nn.Linear(40, 6), nn.ReLU())
    _sparsify_weights_(model, 0.2)
    good = tmp_path / "good.safetensors"
    deploy.export(model, good, formats="csr")
    data = good.read_bytes()
    from safetensors.torch import load

    tensors = load(data)
    broken = dict(tensors)
    broken["0.row_ptr"] = broken["0.row_ptr"].clone()
    broken["0.row_ptr"][2] = 10**6
    cases = {
        "truncated": (data[:-10], "truncated"),
        "tiny": (data[:5], "too short"),
        "flipped": (data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:], "checksum"),
        "garbage": (b"\x00" * 64, "not a"),
        "newer": (_rewrite(data, {"format_version": str(deploy.SPARSE_FORMAT_VERSION + 1)}),
                  "newer"),
        "foreign": (_rewrite(data, {"format": "someone.else"}), "not a subkern artifact"),
        "arch": (_rewrite(data, {"architecture": json.dumps({"type": "Transformer"})}),
                 "unknown module"),
        "structure": (_rewrite(data, {"checksum": checksum(broken)}, broken), "row_ptr"),
        "mismatch": (_rewrite(data, {"checksum": checksum({"w": tensors["0.values"]})},
                              {"w": tensors["0.values"]}), "do not match"),
    }
    bad = tmp_path / "bad.safetensors"
    for blob, message in cases.values():
        bad.write_bytes(blob)
        with pytest.raises(DeployFormatError, match=message):
            deploy.load(bad)
    deploy.load(good)


def test_load_opens_supermask_artifacts(tmp_path):
    from subkern.nn.supermask import SupermaskLinear

    w = torch.where(torch.rand(6, 20) < 0.5, 0.1, -0.1)
    layer = SupermaskLinear.from_weight_and_mask(w, torch.rand(6, 20) < 0.5)
    path = tmp_path / "sm.safetensors"
    deploy.export_supermask(nn.Sequential(layer, nn.ReLU()), path)
    loaded = deploy.load(path)
    x = torch.randn(3, 20)
    torch.testing.assert_close(loaded(x), torch.relu(layer(x)))


def test_artifact_smaller_than_dense(tmp_path):
    model = _sparsify_weights_(nn.Sequential(nn.Linear(1024, 1024, bias=False)), 0.1)
    path = tmp_path / "big.safetensors"
    deploy.export(model, path, formats="csr", value_dtype=torch.bfloat16)
    # 10 % nonzeros at 2 (int16 index) + 2 (bf16 value) bytes vs 4 bytes per dense weight
    assert os.path.getsize(path) < 0.11 * 1024 * 1024 * 4


def test_residual_tree_roundtrip():
    from subkern.deploy.tree import build, describe

    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), None, "none")
    tree = describe(block)
    assert tree["type"] == "Residual" and tree["config"] == {"activation": "none"}
    rebuilt = build(tree)
    rebuilt.load_state_dict(block.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(rebuilt(x), block(x))
    # a body that returns a view of its input is never updated in place
    view_body = Residual(nn.Sequential(nn.Flatten()), None, "relu")
    x0 = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(view_body(x), torch.relu(2 * x0))
    torch.testing.assert_close(x, x0)
    with pytest.raises(ValueError, match="activation"):
        Residual(nn.Identity(), activation="gelu")
    with pytest.raises(DeployFormatError, match="body"):
        build({"type": "Residual", "config": {}, "children": [["x", {"type": "Identity"}]]})


def test_maxpool_replacement_is_exact():
    from subkern.deploy.tree import MaxPool2d, build, describe

    x = torch.randn(2, 5, 13, 11)
    for kw in (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True),
               dict(kernel_size=(3, 2), stride=(1, 2), dilation=2)):
        ref = nn.MaxPool2d(**kw)
        fast = build(describe(ref))
        assert type(fast) is MaxPool2d and describe(fast) == describe(ref)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), ref(x), atol=0, rtol=0)
            assert fast(x).is_contiguous()
            torch.testing.assert_close(fast(x[:, :, ::2]), ref(x[:, :, ::2]), atol=0, rtol=0)


def test_sparse_e2e_benchmark_tiny():
    from subkern.bench import sparse_e2e
    from subkern.bench.harness import BenchConfig

    model = sparse_e2e.make_model(sparse_e2e.SIZES["tiny"], "uniform")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    density = sum(int((m.weight != 0).sum()) for m in convs) / sum(m.weight.numel()
                                                                  for m in convs)
    assert density == pytest.approx(0.1, abs=0.01)
    erk = sparse_e2e.layer_densities(model, "erk")
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sum(d * s for d, s in zip(erk, sizes, strict=True)) == pytest.approx(0.1 * sum(sizes))
    assert max(erk) <= 1.0 and min(erk) < 0.05
    result = sparse_e2e.run(BenchConfig(size="tiny", reps=1, log=lambda _msg: None))
    assert not result.errors and result.rows and all(row.match for row in result.rows)
    assert result.rows[0].target == sparse_e2e.TARGET


@pytest.mark.parametrize("with_relu", [True, False])
def test_fused_relu_is_exact_and_sets_the_format_version(tmp_path, with_relu):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)]
    if with_relu:
        layers.append(nn.ReLU())
    layers += [nn.Conv2d(8, 4, 1), nn.Flatten()]
    model = _sparsify_weights_(nn.Sequential(*layers), density=0.3).eval()
    path = tmp_path / "m.safetensors"
    converted = deploy.export(model, path, formats="csr")
    convs = [m for m in converted.modules() if isinstance(m, SparseConv2d)]
    assert [m.relu for m in convs] == ([True, False] if with_relu else [False, False])
    header = deploy.read_metadata(path)
    expected = deploy.sparse.FORMAT_VERSION if with_relu else deploy.sparse.FORMAT_VERSION_PLAIN
    assert int(header["format_version"]) == expected
    loaded = deploy.load(path)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
