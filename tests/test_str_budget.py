"""The per-layer budget report: hand-computed parameters, non-zeros and FLOPs for Linear and
Conv2d (stride, padding, groups, sequence inputs), STR and edge-popup layers, layers that do not
run, the text / Markdown / JSON / PNG outputs and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from subkern.methods.str import BudgetReport, budget_report
from subkern.nn import SubnetLinear
from subkern.nn.str import STRConv2d, STRLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False)    # 9x9 -> 5x5
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)                          # 5x5 -> 5x5
        self.fc = nn.Linear(100, 3)
        self.unused = nn.Linear(7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.grouped(self.conv(x)).flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.conv.weight[:, :, 0, :] = 0.0            # 4 * 2 * 3 = 24 zeros of 72
        net.fc.weight[1:] = 0.0                      # 200 zeros of 300
    return net


def test_counts_and_flops_are_exact():
    report = budget_report(_net(), torch.randn(3, 2, 9, 9))
    by_name = {layer.name: layer for layer in report.layers}
    assert list(by_name) == ["conv", "grouped", "fc", "unused"]
    conv = by_name["conv"]
    assert (conv.kind, conv.shape, conv.params, conv.nonzeros) == ("conv2d", (4, 2, 3, 3), 72, 48)
    assert conv.sparsity == pytest.approx(24 / 72)
    assert conv.dense_flops == 25 * 4 * 2 * 9 and conv.sparse_flops == 25 * 48    # per sample
    grouped = by_name["grouped"]
    assert grouped.shape == (4, 2, 1, 1) and grouped.dense_flops == 25 * 4 * 2
    fc = by_name["fc"]
    assert (fc.params, fc.nonzeros, fc.dense_flops, fc.sparse_flops) == (300, 100, 300, 100)
    unused = by_name["unused"]
    assert unused.dense_flops is None and unused.sparse_flops is None
    assert report.params == 72 + 8 + 300 + 49
    assert report.nonzeros == 48 + 8 + 100 + 49
    assert report.sparsity == pytest.approx(1 - report.nonzeros / report.params)
    assert report.dense_flops == 1800 + 200 + 300 and report.sparse_flops == 1200 + 200 + 100
    assert not any(layer.sparse_layer for layer in report.layers)


def test_sequence_inputs_count_rows_per_sample():
    layer = nn.Linear(8, 5)
    report = budget_report(nn.Sequential(layer), torch.randn(4, 6, 8))
    assert report.layers[0].dense_flops == 6 * 8 * 5


def test_str_layers_report_the_effective_weight_and_threshold():
    torch.manual_seed(0)
    model = nn.Sequential(STRConv2d(1, 4, 3, padding=1, bias=False, s_init=-2.0), nn.Flatten(),
                          STRLinear(4 * 36, 10, s_init=-3.0, per_channel=True)).train()
    report = budget_report(model, torch.randn(2, 1, 6, 6))
    conv, fc = report.layers
    assert conv.sparse_layer and fc.sparse_layer
    assert conv.nonzeros == model[0].nonzeros() and conv.sparsity == pytest.approx(
        model[0].sparsity())
    assert 0 < conv.sparsity < 1
    assert conv.threshold == pytest.approx(float(torch.sigmoid(torch.tensor(-2.0))))
    assert conv.sparse_flops == 36 * conv.nonzeros and conv.dense_flops == 36 * 36
    assert fc.threshold == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert model.training                                  # mode restored


def test_edgepopup_layers_are_reported_with_their_mask():
    layer = SubnetLinear(20, 10, k=0.3)
    report = budget_report(nn.Sequential(layer), torch.randn(1, 20))
    assert report.layers[0].nonzeros == int(torch.count_nonzero(layer.effective_weight()))
    assert report.layers[0].sparsity == pytest.approx(0.7, abs=0.01)


def test_outputs_table_markdown_json_and_plot(tmp_path):
    report = budget_report(_net(), torch.randn(1, 2, 9, 9))
    text = report.table()
    assert "conv" in text and "total" in text and "33.33" in text
    md = report.table(markdown=True)
    assert md.splitlines()[0].startswith("| layer |") and md.count("\n") == 1 + 4 + 1
    data = json.loads(json.dumps(report.to_json()))
    assert data["totals"]["params"] == report.params and len(data["layers"]) == 4
    assert data["layers"][0]["shape"] == [4, 2, 3, 3]
    saved = json.loads(open(report.save_json(str(tmp_path / "b.json"))).read())
    assert saved == data
    png = report.plot(str(tmp_path / "sub" / "budget.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_sample_input_and_empty_cases():
    report = budget_report(_net())
    assert all(layer.dense_flops is None for layer in report.layers)
    assert report.dense_flops == 0 and report.flops_fraction != report.flops_fraction   # nan
    assert report.to_json()["totals"]["flops_fraction"] is None
    empty = budget_report(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    assert empty.layers == [] and empty.sparsity == 0.0 and "total" in empty.table()
    with pytest.raises(ValueError, match="no layers"):
        BudgetReport().plot("unused.png")
    zero = nn.Linear(4, 1, bias=False)
    zero.weight = nn.Parameter(torch.empty(0, 4))     # an empty layer
    assert budget_report(nn.Sequential(zero)).layers[0].sparsity == 0.0


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        budget_report("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch"):
        budget_report(_net(), torch.randn(0, 2, 9, 9))
    with pytest.raises(ValueError, match="sample_input"):
        budget_report(_net(), ("no tensor",))
