"""The learned sparsity budget of a model: per-layer sparsity, parameters and FLOPs.

STR (Kusupati et al., ICML 2020, "Soft Threshold Weight Reparameterization for Learnable
Sparsity") learns a *non-uniform* budget: every layer ends at its own sparsity. The paper reports
it per layer (its appendix tables / the official ``budgets/*.csv``) together with the FLOPs the
sparse network needs. ``budget_report(model, sample_input)`` measures exactly that for any model:

* a layer that exposes ``effective_weight()`` (``STRLinear`` / ``STRConv2d``, edge-popup's
  ``SubnetLinear`` / ``SubnetConv2d``, ...) is reported with the weight it really multiplies by;
* a plain ``nn.Linear`` / ``nn.Conv2d`` is reported with its ``weight`` (zeros count as pruned),
  so a magnitude-pruned or any other pruned model works too.

FLOPs are counted as multiply-accumulates per sample, the convention of the STR paper (ResNet-50:
4.09 G) and of most pruning papers; biases, normalisation and activations are not counted.
For one sample:

* Linear ``[.., in] -> [.., out]``: dense ``R * in * out`` with ``R`` the number of rows per sample
  (1 for a ``[batch, in]`` input, the sequence length for ``[batch, seq, in]``); sparse
  ``R * nnz(W)``.
* Conv2d with output ``H_out x W_out``: dense ``H_out * W_out * C_out * (C_in / groups) * kh * kw``,
  sparse ``H_out * W_out * nnz(W)`` (every weight is used once per output position; the few
  products with zero padding at the border are counted, as usual).

The output sizes are measured with forward hooks while ``sample_input`` runs through the model
(in eval mode, without gradients); a layer that the forward pass never reaches has no FLOPs
(``None``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..._atomic import atomic_write


@dataclass
class LayerBudget:
    """One layer of the budget. ``sparsity = 1 - nonzeros / params`` (0 for an empty layer)."""

    name: str
    kind: str                        # "linear" or "conv2d"
    shape: tuple[int, ...]           # weight shape
    params: int
    nonzeros: int
    sparsity: float
    dense_flops: int | None          # multiply-accumulates per sample; None: layer did not run
    sparse_flops: int | None
    threshold: float | None = None   # mean sigmoid(s) of an STR layer, else None
    sparse_layer: bool = False       # True when the layer exposes effective_weight()


@dataclass
class BudgetReport:
    """Per-layer budget plus totals; ``table()``, ``to_json()``, ``save_json()``, ``plot()``."""

    layers: list[LayerBudget] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Overall sparsity over every reported layer (zeros / weights)."""
        return 1.0 - self.nonzeros / self.params if self.params else 0.0

    @property
    def dense_flops(self) -> int:
        return sum(layer.dense_flops or 0 for layer in self.layers)

    @property
    def sparse_flops(self) -> int:
        return sum(layer.sparse_flops or 0 for layer in self.layers)

    @property
    def flops_fraction(self) -> float:
        """Sparse over dense FLOPs (``nan`` when nothing ran)."""
        return self.sparse_flops / self.dense_flops if self.dense_flops else math.nan

    def totals(self) -> dict[str, Any]:
        return {"params": self.params, "nonzeros": self.nonzeros, "sparsity": self.sparsity,
                "dense_flops": self.dense_flops, "sparse_flops": self.sparse_flops,
                "flops_fraction": self.flops_fraction}

    def table(self, markdown: bool = False) -> str:
        """The budget as a fixed-width text table, or a Markdown table (``markdown=True``)."""
        header = ["layer", "kind", "shape", "params", "nonzeros", "sparsity %", "dense FLOPs",
                  "sparse FLOPs", "threshold"]
        rows = [[layer.name or "(model)", layer.kind, "x".join(map(str, layer.shape)),
                 f"{layer.params:,}", f"{layer.nonzeros:,}", f"{100 * layer.sparsity:.2f}",
                 _fmt_flops(layer.dense_flops), _fmt_flops(layer.sparse_flops),
                 "-" if layer.threshold is None else f"{layer.threshold:.4g}"]
                for layer in self.layers]
        frac = self.flops_fraction
        rows.append(["total", "", "", f"{self.params:,}", f"{self.nonzeros:,}",
                     f"{100 * self.sparsity:.2f}", _fmt_flops(self.dense_flops),
                     _fmt_flops(self.sparse_flops) + ("" if math.isnan(frac)
                                                      else f" ({100 * frac:.1f}%)"), ""])
        if markdown:
            lines = ["| " + " | ".join(header) + " |",
                     "|" + "|".join(["---"] * 3 + ["---:"] * 6) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            return "\n".join(lines)
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        align = [str.ljust] * 3 + [str.rjust] * 6

        def fmt(row: Sequence[str]) -> str:
            return "  ".join(align[i](str(cell), widths[i]) for i, cell in enumerate(row))

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), rule, *map(fmt, rows[:-1]), rule, fmt(rows[-1])])

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``{"layers": [...], "totals": {...}}``."""
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            entry["shape"] = list(layer.shape)
            layers.append(entry)
        totals = self.totals()
        if math.isnan(totals["flops_fraction"]):
            totals["flops_fraction"] = None
        return {"layers": layers, "totals": totals}

    def save_json(self, path: str) -> str:
        """Write ``to_json()`` atomically to ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path) as handle:
            handle.write(json.dumps(self.to_json(), indent=2).encode())
        return path

    def plot(self, path: str, title: str | None = None) -> str:
        """Bar plot (PNG) of the per-layer sparsity and of the dense vs. sparse FLOPs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.layers:
            raise ValueError("the budget report has no layers to plot")
        names = [layer.name or "(model)" for layer in self.layers]
        pos = list(range(len(names)))
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(names) + 2), 7),
                                       sharex=True)
        ax1.bar(pos, [100 * layer.sparsity for layer in self.layers],
                color=["tab:blue" if layer.sparse_layer else "tab:gray" for layer in self.layers])
        ax1.axhline(100 * self.sparsity, color="tab:red", linestyle="--",
                    label=f"overall {100 * self.sparsity:.1f}%")
        ax1.set_ylabel("sparsity (%)")
        ax1.set_ylim(0, 100)
        ax1.legend(loc="lower right")
        dense = [layer.dense_flops or 0 for layer in self.layers]
        sparse = [layer.sparse_flops or 0 for layer in self.layers]
        width = 0.4
        ax2.bar([p - width / 2 for p in pos], dense, width, label="dense", color="tab:gray")
        ax2.bar([p + width / 2 for p in pos], sparse, width, label="sparse", color="tab:blue")
        ax2.set_ylabel("MACs per sample")
        if any(dense):
            ax2.set_yscale("log")
        ax2.legend(loc="upper right")
        ax2.set_xticks(pos)
        ax2.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        fig.suptitle(title or f"per-layer budget: {100 * self.sparsity:.1f}% sparse, "
                     f"{_fmt_flops(self.sparse_flops)} of {_fmt_flops(self.dense_flops)} MACs")
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _fmt_flops(value: int | None) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _reported_weight(module: nn.Module) -> torch.Tensor | None:
    effective = getattr(module, "effective_weight", None)
    if callable(effective) and isinstance(module, (nn.Linear, nn.Conv2d)):
        return effective().detach()
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight.detach()
    if callable(effective):
        weight = effective().detach()
        return weight if weight.dim() in (2, 4) else None
    return None


def _threshold(module: nn.Module) -> float | None:
    s = getattr(module, "s", None)
    if isinstance(s, torch.Tensor) and s.is_floating_point():
        return float(torch.sigmoid(s.detach().double()).mean()) if s.numel() else None
    return None


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers a budget reports: Linear/Conv2d (incl. subclasses) and any module with
    ``effective_weight()`` returning a 2-D or 4-D weight, in ``named_modules()`` order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) or callable(
                getattr(module, "effective_weight", None)):
            found.append((name, module))
    return found


@torch.no_grad()
def budget_report(model: nn.Module, sample_input: torch.Tensor | Sequence[Any] | None = None,
                  ) -> BudgetReport:
    """Measure ``model``'s per-layer sparsity budget and FLOPs.

    Args:
        model: any ``nn.Module``; its Linear / Conv2d layers and modules exposing
            ``effective_weight()`` are reported (see the module docstring).
        sample_input: an input batch (a tensor, or a tuple of positional arguments) used to
            measure each layer's output size for the FLOPs; FLOPs are per sample (divided by the
            batch size, the first dimension of the first tensor). ``None``: no FLOPs.

    Returns:
        a ``BudgetReport`` (``.table()``, ``.to_json()``, ``.plot(path)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = sparse_layers(model)
    rows_per_sample: dict[int, int] = {}
    if sample_input is not None:
        args = tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.dim() == 0 or first.shape[0] == 0:
            raise ValueError("sample_input must hold a tensor with a non-empty batch dimension, "
                             f"got {None if first is None else tuple(first.shape)}")
        batch = first.shape[0]
        handles = []

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() == 0:
                return
            weight = _reported_weight(module)
            if weight is None:
                return
            per_out = output.numel() // max(weight.shape[0], 1)   # rows or positions
            rows_per_sample[id(module)] = per_out // batch if output.shape[0] == batch \
                else per_out

        for _, module in layers:
            handles.append(module.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            model(*args)
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
    report = BudgetReport()
    seen: set[int] = set()
    for name, module in layers:
        if id(module) in seen:
            continue
        seen.add(id(module))
        weight = _reported_weight(module)
        if weight is None:
            continue
        params = weight.numel()
        nonzeros = int(torch.count_nonzero(weight))
        positions = rows_per_sample.get(id(module))
        fan = params // weight.shape[0] if weight.shape[0] else 0
        out_features = weight.shape[0]
        dense = None if positions is None else positions * out_features * fan
        sparse = None if positions is None else positions * nonzeros
        report.layers.append(LayerBudget(
            name=name, kind="conv2d" if weight.dim() == 4 else "linear",
            shape=tuple(weight.shape), params=params, nonzeros=nonzeros,
            sparsity=1.0 - nonzeros / params if params else 0.0,
            dense_flops=dense, sparse_flops=sparse, threshold=_threshold(module),
            sparse_layer=callable(getattr(module, "effective_weight", None))))
    return report
