"""Export / load of sparse models for inference (``"subkern.sparse"`` safetensors artifacts).

:func:`export` turns a trained sparse model into inference modules and writes one file;
:func:`load` rebuilds it without the training code. The conversion (:func:`to_sparse`):

1. **copy and lower**: the model is deep-copied, put in eval mode, and modules with a custom
   ``forward`` that have a registered lowering (:func:`subkern.deploy.tree.lower`; built in: the
   edge-popup model classes ``FC``, ``ConvNet``, ``BasicBlock``, ``Bottleneck``, ``ResNet``, which
   the STR recipes use too) become ``Sequential`` and :class:`~subkern.deploy.tree.Residual` nodes;
2. **materialise**: every weight layer becomes a plain ``nn.Linear`` / ``nn.Conv2d`` holding the
   weight it multiplies with: STR layers (anything with ``effective_weight()``, e.g.
   ``subkern.nn.STRLinear`` / ``STRConv2d``: ``sign(W) relu(|W| - sigmoid(s))``),
   ``torch.nn.utils.prune``-style layers (``weight_orig * weight_mask``), edge-popup layers
   (``weight * top-k mask``) and plain layers whose zeros come from any pruning;
3. **fold BatchNorm** (``fold_batchnorm=True``): a ``BatchNorm2d`` (with running statistics)
   right after a ``Conv2d`` in a ``Sequential`` is folded into it,
   ``W' = W * gamma / sqrt(var + eps)`` per output channel and
   ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, and replaced by ``Identity``. This is
   exact in eval mode (up to float rounding) and keeps the sparsity pattern (a row is scaled);
4. **sparsify**: each ``Linear`` becomes :class:`~subkern.nn.sparse.SparseLinear` and each
   ``Conv2d`` :class:`~subkern.nn.sparse.SparseConv2d` in the format ``formats`` asks for;
   ``"auto"`` chooses per layer by density and shape
   (:func:`subkern.ops.sparse_linear.choose_format` for ``batch_hint`` rows per call,
   :func:`subkern.nn.sparse.choose_conv_format` for convolutions).

``nn.MaxPool2d`` becomes :class:`subkern.deploy.tree.MaxPool2d` (the same pooling through the
faster channels-last CPU kernel). Everything else (ReLU, pools, Flatten, Dropout, BatchNorm not
after a conv, Supermask layers) is kept; a module the architecture tree cannot describe is
refused with :class:`DeployFormatError` naming it. The file (:mod:`subkern.deploy.artifact`):
the converted model's ``state_dict`` as safetensors, metadata ``format = "subkern.sparse"``,
``format_version``, ``checksum`` (sha256), ``architecture`` (JSON tree,
:mod:`subkern.deploy.tree`), written atomically. :func:`load` also
opens supermask artifacts (``"subkern.supermask"``), so it is the one loader of both formats.

Limits: models with other custom forwards must be lowered by the user
(:func:`subkern.deploy.tree.register_lowering`) or written as ``Sequential``/``Residual``;
``Conv2d`` needs ``padding_mode="zeros"`` and numeric padding.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..nn.sparse import (
    CONV_FORMATS,
    FORMATS,
    SparseConv2d,
    SparseLinear,
    effective_weight,
    fuse_relu_,
)
from ..nn.supermask import SupermaskConv2d, SupermaskLinear, subnet_weight_and_mask
from . import supermask as _supermask
from .artifact import (
    DeployFormatError,
    check_metadata,
    parse_header,
    read_artifact,
    read_bytes,
    write_artifact,
)
from .tree import MaxPool2d, describe, instantiate, lower, register_leaf

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "FORMAT_VERSION_PLAIN", "export", "load", "to_sparse",
           "fold_batchnorm_", "layer_report", "read_metadata"]

FORMAT_NAME = "subkern.sparse"
#: Newest version of the format this code reads and writes. Version 2 added ``relu`` to a
#: ``SparseConv2d``'s config (a ReLU fused into the conv's epilogue); files without a fused ReLU
#: are written as version 1 (:data:`FORMAT_VERSION_PLAIN`) so older subkerns still read them.
FORMAT_VERSION = 2
FORMAT_VERSION_PLAIN = 1

register_leaf("SparseLinear", SparseLinear)
register_leaf("SparseConv2d", SparseConv2d)

Formats = str | Mapping[str, str] | Callable[[str, nn.Module], str]


# --------------------------------------------------------------------------------------------
# materialise
# --------------------------------------------------------------------------------------------

def _is_edge_popup(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("weight", "scores", "k")) and isinstance(
        getattr(module, "scores", None), torch.Tensor)


def _is_weight_layer(module: nn.Module) -> bool:
    if isinstance(module, (SparseLinear, SparseConv2d, SupermaskLinear, SupermaskConv2d)):
        return False
    if callable(getattr(module, "effective_weight", None)) or _is_edge_popup(module):
        return True
    return any(isinstance(module, cls) and type(module).forward is cls.forward
               for cls in (nn.Linear, nn.Conv2d))


def _plain(module: nn.Module, path: str) -> nn.Module:
    """The plain float32 ``nn.Linear`` / ``nn.Conv2d`` computing what ``module`` computes."""
    with torch.no_grad():
        if _is_edge_popup(module) and not callable(getattr(module, "effective_weight", None)):
            weight, mask = subnet_weight_and_mask(module)
            weight = weight * mask.to(weight.dtype)
        else:
            weight = effective_weight(module)
    bias = getattr(module, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        bias = None
    weight = weight.detach().cpu().to(torch.float32)
    if weight.dim() == 2:
        out: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    elif weight.dim() == 4:
        mode = getattr(module, "padding_mode", "zeros")
        padding = getattr(module, "padding", 0)
        if mode != "zeros" or isinstance(padding, str):
            raise DeployFormatError(f"layer {path!r} ({type(module).__name__}): padding_mode "
                                    f"{mode!r} / padding {padding!r} not supported (zero, "
                                    "numeric padding only)")
        groups = int(getattr(module, "groups", 1))
        out = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                        stride=getattr(module, "stride", 1), padding=padding,
                        dilation=getattr(module, "dilation", 1), groups=groups,
                        bias=bias is not None)
    else:
        raise DeployFormatError(f"layer {path!r} ({type(module).__name__}): a {weight.dim()}-D "
                                "weight is not supported (Linear or Conv2d)")
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach().cpu().to(torch.float32))
    return out


def _materialise(parent: nn.Module, prefix: str) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if _is_weight_layer(child):
            setattr(parent, name, _plain(child, path))
        else:
            _materialise(child, path)


# --------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------

def _foldable_bn(module: nn.Module, channels: int) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward
            and module.running_mean is not None and module.running_var is not None
            and module.num_features == channels)


def fold_batchnorm_(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a plain ``nn.Conv2d`` in a
    ``Sequential`` into the conv (replacing the BatchNorm by ``Identity``); returns the count.

    ``W' = W * gamma / sqrt(var + eps)`` (per output channel), ``b' = (b - mean) * gamma /
    sqrt(var + eps) + beta`` (``gamma = 1``, ``beta = 0`` for a non-affine BatchNorm).
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = [name for name, _ in seq.named_children()]
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is not nn.Conv2d or not _foldable_bn(bn, conv.out_channels):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var.double() + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.double()
                shift = -bn.running_mean.double() * scale
                if conv.bias is not None:
                    shift = shift + conv.bias.double() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.double()
                new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                                conv.stride, conv.padding, conv.dilation, conv.groups, bias=True)
                new.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).float())
                new.bias.copy_(shift.float())
            seq._modules[a] = new
            seq._modules[b] = nn.Identity()
            folded += 1
    return folded


# --------------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------------

def _format_for(formats: Formats, path: str, module: nn.Module) -> str:
    if callable(formats) and not isinstance(formats, str):
        fmt = formats(path, module)
    elif isinstance(formats, Mapping):
        fmt = formats.get(path, "auto")
    else:
        fmt = formats
    allowed = CONV_FORMATS if isinstance(module, nn.Conv2d) else FORMATS
    if isinstance(module, nn.Conv2d) and fmt == "bitmap":
        fmt = "csr"          # no bitmap SpMM: a convolution's bitmap request means "sparse"
    if fmt != "auto" and fmt not in allowed:
        raise ValueError(f"format for layer {path!r} must be 'auto' or one of {allowed}, got "
                         f"{fmt!r}")
    return fmt


def _sparsify(parent: nn.Module, prefix: str, formats: Formats, value_dtype: Any,
              batch_hint: int) -> None:
    for name, child in list(parent.named_children()):
        path = f"{prefix}.{name}" if prefix else name
        if type(child) is nn.Linear:
            fmt = _format_for(formats, path, child)
            setattr(parent, name, SparseLinear.from_dense(child, fmt, value_dtype,
                                                          batch_hint=batch_hint))
        elif type(child) is nn.Conv2d:
            fmt = _format_for(formats, path, child)
            setattr(parent, name, SparseConv2d.from_dense(child, fmt, value_dtype))
        elif type(child) is nn.MaxPool2d and not child.return_indices:
            setattr(parent, name, MaxPool2d(child.kernel_size, child.stride, child.padding,
                                            child.dilation, ceil_mode=child.ceil_mode))
        else:
            _sparsify(child, path, formats, value_dtype, batch_hint)


def _copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding non-leaf tensors as attributes (the
    ``weight`` that ``torch.nn.utils.prune`` recomputes in a forward pre-hook)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def to_sparse(model: nn.Module, value_dtype: torch.dtype | str | None = None,
              formats: Formats = "auto", batch_hint: int = 1, fold_batchnorm: bool = True,
              fuse_relu: bool = True) -> nn.Module:
    """A CPU copy of ``model`` (eval mode) with Sparse* inference layers (module docstring).

    ``formats``: ``"auto"``, one of ``"csr"``, ``"bitmap"`` (convolutions: csr), ``"dense"`` for
    every layer, a mapping from a layer's path in the converted model (e.g.
    ``"layer1.0.body.conv1"``; missing paths: ``"auto"``) or a callable ``(path, plain module)
    -> format``. ``value_dtype``: float32 (default), bfloat16 or float16 values.
    ``fuse_relu``: a ``SparseConv2d`` directly followed by ``nn.ReLU`` in a ``Sequential`` applies
    the ReLU in its epilogue (:func:`subkern.nn.sparse.fuse_relu_`; exact).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch_hint, bool) or not isinstance(batch_hint, int) or batch_hint < 1:
        raise ValueError(f"batch_hint must be an int >= 1, got {batch_hint!r}")
    out = lower(_copy(model).cpu().eval())
    if _is_weight_layer(out):
        out = nn.Sequential(_plain(out, "model"))
        wrapped = True
    else:
        _materialise(out, "")
        wrapped = False
    if fold_batchnorm:
        fold_batchnorm_(out)
    _sparsify(out, "", formats, value_dtype, batch_hint)
    if fuse_relu:
        fuse_relu_(out)
    if wrapped:
        out = out[0]
    return out.eval()


def layer_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per Sparse* layer of a converted model: path, type, format, shape, nnz and density."""
    rows = []
    for path, m in model.named_modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            rows.append({"layer": path, "type": type(m).__name__, "format": m.format,
                         "rows": m.rows, "fan_in": m._true_fan_in(),
                         "nnz": (m.nnz if m.format != "dense" else int((m.weight != 0).sum())),
                         "density": m.density(), "value_dtype": m.value_dtype})
    return rows


# --------------------------------------------------------------------------------------------
# file
# --------------------------------------------------------------------------------------------

def _verify(model: nn.Module, converted: nn.Module, example_input: torch.Tensor,
            tolerance: float) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(example_input)
            got = converted(example_input.cpu())
    finally:
        model.train(was_training)
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
        raise TypeError("example_input check needs models that return a tensor")
    expected = expected.detach().cpu().double()
    err = float((got.double() - expected).abs().max()) if expected.numel() else 0.0
    bound = tolerance * max(1.0, float(expected.abs().max())) if expected.numel() else 0.0
    if not err <= bound:
        raise DeployFormatError(f"the converted model differs from the original on "
                                f"example_input: max |difference| {err:.3g} > {bound:.3g}")


def export(model: nn.Module, path: str | os.PathLike[str],
           value_dtype: torch.dtype | str | None = None, formats: Formats = "auto",
           batch_hint: int = 1, fold_batchnorm: bool = True,
           example_input: torch.Tensor | None = None, tolerance: float | None = None,
           fuse_relu: bool = True) -> nn.Module:
    """Convert ``model`` (:func:`to_sparse`) and write it to ``path`` as a ``"subkern.sparse"``
    safetensors artifact (atomically). Returns the converted model (CPU, eval mode).

    ``example_input``: when given, the converted model's output on it must equal ``model``'s (in
    eval mode) within ``tolerance * max(1, max|y|)`` (default 1e-4, 5e-2 with 16-bit values) or
    nothing is written. Raises :class:`DeployFormatError` for a module the architecture tree
    cannot describe and for a failed check.
    """
    converted = to_sparse(model, value_dtype, formats, batch_hint, fold_batchnorm, fuse_relu)
    if example_input is not None:
        if tolerance is None:
            half = value_dtype is not None and str(value_dtype).removeprefix("torch.") in (
                "bfloat16", "float16")
            tolerance = 5e-2 if half else 1e-4
        _verify(model, converted, example_input, tolerance)
    fused = any(isinstance(m, SparseConv2d) and m.relu for m in converted.modules())
    write_artifact(path, converted.state_dict(), format_name=FORMAT_NAME,
                   format_version=FORMAT_VERSION if fused else FORMAT_VERSION_PLAIN,
                   architecture=describe(converted))
    return converted


def _check_layers(model: nn.Module, path: str) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            try:
                m.check_structure()
            except ValueError as err:
                raise DeployFormatError(f"{path}: layer {name!r}: {err}") from err


def _readable_formats() -> dict[str, int]:
    """Format name -> newest version :func:`load` reads."""
    return {FORMAT_NAME: FORMAT_VERSION, _supermask.FORMAT_NAME: _supermask.FORMAT_VERSION}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata (all strings: ``format``, ``format_version``, ``checksum``, ...) of a sparse
    or supermask artifact; raises :class:`DeployFormatError` for a file :func:`load` refuses by
    its header (truncated, foreign, newer version)."""
    spath, data = read_bytes(path)
    return check_metadata(parse_header(data, spath), spath, _readable_formats())


def load(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model of a ``"subkern.sparse"`` or ``"subkern.supermask"`` artifact (eval).

    Refuses a truncated, corrupt (checksum), foreign or newer-version file, an unknown module
    and inconsistent sparse buffers with :class:`DeployFormatError` naming the problem.
    """
    spath, data = read_bytes(path)
    formats = _readable_formats()
    meta = parse_header(data, spath).get("__metadata__") or {}
    if isinstance(meta, dict) and meta.get("format") == _supermask.FORMAT_NAME:
        return _supermask.load_supermask(spath, device)
    _, tensors, tree = read_artifact(spath, formats, data)
    model = instantiate(tree, tensors, spath, "cpu")
    _check_layers(model, spath)
    return model.to(device).eval()
