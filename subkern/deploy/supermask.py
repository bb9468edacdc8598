"""Export / load of bit-packed supermask models (safetensors artifacts).

:func:`export_supermask` converts every edge-popup layer of a model (a module with ``weight``,
``scores`` and ``k``, e.g. ``subkern.nn.SubnetLinear`` / ``SubnetConv2d``) to
:class:`~subkern.nn.supermask.SupermaskLinear` / :class:`~subkern.nn.supermask.SupermaskConv2d`,
keeps the rest of the model as it is, and writes one safetensors file:

* tensors: the converted model's ``state_dict()`` (packed mask and sign bits, scales, biases, and
  every other parameter and buffer, e.g. BatchNorm statistics);
* metadata (all strings): ``format`` = ``"subkern.supermask"``, ``format_version`` (an integer,
  :data:`FORMAT_VERSION`), ``checksum`` = ``"sha256:<hex>"`` of the tensors (for every tensor in
  name order: the name, dtype, shape and raw bytes), ``architecture`` = a JSON module tree that
  rebuilds the model without the training code, ``subkern_version``.

Architecture tree: the model must be built from these modules only (a custom ``forward`` cannot be
described, so any other module is refused with a :class:`DeployFormatError` naming it):
``Sequential`` (nested, any child names), ``Linear``, ``Conv2d``, ``BatchNorm1d``,
``BatchNorm2d``, ``ReLU``, ``Flatten``, ``AdaptiveAvgPool2d``, ``MaxPool2d``, ``AvgPool2d``,
``Dropout``, ``Identity``, ``SupermaskLinear``, ``SupermaskConv2d`` and edge-popup layers (which
become Supermask layers). A subclass of one of them is accepted when it does not override
``forward`` (e.g. a non-affine BatchNorm2d) and is rebuilt as its base class. Every node is
``{"type": name, "config": {...}}`` plus ``"children": [[name, node], ...]`` for Sequential.

The file is written atomically (temporary file in the same directory, fsync, ``os.replace``).
:func:`load_supermask` refuses, with :class:`DeployFormatError`, a file that is truncated, is not
safetensors, is another format, has a newer format version, fails its checksum, or describes an
unknown module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._atomic import atomic_write
from ..nn.supermask import SupermaskConv2d, SupermaskLinear

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "DeployFormatError", "export_supermask",
           "load_supermask", "to_supermask", "describe", "build", "read_metadata"]

FORMAT_NAME = "subkern.supermask"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


class DeployFormatError(ValueError):
    """The model cannot be exported, or the file is not a valid supermask artifact."""


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def _is_edge_popup(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("weight", "scores", "k")) and isinstance(
        getattr(module, "scores", None), torch.Tensor)


def to_supermask(model: nn.Module, atol: float = 1e-6) -> nn.Module:
    """A copy of ``model`` with every edge-popup layer replaced by its Supermask layer."""
    if _is_edge_popup(model):
        return _convert_layer(model, atol)
    out = copy.deepcopy(model)
    _replace(out, atol)
    return out


def _convert_layer(module: nn.Module, atol: float) -> nn.Module:
    if module.weight.dim() == 2:
        return SupermaskLinear.from_subnet(module, atol)
    if module.weight.dim() == 4:
        return SupermaskConv2d.from_subnet(module, atol)
    raise DeployFormatError(f"{type(module).__name__}: edge-popup layer with a "
                            f"{module.weight.dim()}-D weight is not supported (Linear or Conv2d)")


def _replace(parent: nn.Module, atol: float) -> None:
    for name, child in list(parent.named_children()):
        if _is_edge_popup(child):
            try:
                setattr(parent, name, _convert_layer(child, atol))
            except ValueError as err:
                raise DeployFormatError(f"layer {name!r} ({type(child).__name__}): {err}") from err
        else:
            _replace(child, atol)


# --------------------------------------------------------------------------------------------
# Architecture description
# --------------------------------------------------------------------------------------------

def _ints(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _conv_config(m: nn.Conv2d) -> dict[str, Any]:
    if isinstance(m.padding, str):
        raise DeployFormatError(f"Conv2d with padding={m.padding!r} is not supported (numeric)")
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": _ints(m.kernel_size), "stride": _ints(m.stride),
            "padding": _ints(m.padding), "dilation": _ints(m.dilation), "groups": m.groups,
            "bias": m.bias is not None, "padding_mode": m.padding_mode}


def _bn_config(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
            "affine": m.affine, "track_running_stats": m.track_running_stats}


def _pool_config(m: nn.Module) -> dict[str, Any]:
    keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "count_include_pad",
            "divisor_override")
    return {k: _ints(getattr(m, k)) for k in keys if hasattr(m, k)}


# name -> (class, config of an instance, constructor from a config)
_Describe = Callable[[Any], dict[str, Any]]
_Build = Callable[[dict[str, Any]], nn.Module]
_LEAVES: dict[str, tuple[type[nn.Module], _Describe, _Build]] = {
    "SupermaskLinear": (
        SupermaskLinear,
        lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None},
        lambda c: SupermaskLinear(**c)),
    "SupermaskConv2d": (
        SupermaskConv2d,
        lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels,
                   "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                   "padding": list(m.padding), "dilation": list(m.dilation),
                   "groups": m.groups, "bias": m.bias is not None},
        lambda c: SupermaskConv2d(**c)),
    "Linear": (
        nn.Linear,
        lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.bias is not None},
        lambda c: nn.Linear(**c)),
    "Conv2d": (nn.Conv2d, _conv_config, lambda c: nn.Conv2d(**c)),
    "BatchNorm1d": (nn.BatchNorm1d, _bn_config, lambda c: nn.BatchNorm1d(**c)),
    "BatchNorm2d": (nn.BatchNorm2d, _bn_config, lambda c: nn.BatchNorm2d(**c)),
    "ReLU": (nn.ReLU, lambda m: {"inplace": m.inplace}, lambda c: nn.ReLU(**c)),
    "Flatten": (nn.Flatten, lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
                lambda c: nn.Flatten(**c)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d,
                          lambda m: {"output_size": _ints(m.output_size)},
                          lambda c: nn.AdaptiveAvgPool2d(**c)),
    "MaxPool2d": (nn.MaxPool2d, _pool_config, lambda c: nn.MaxPool2d(**c)),
    "AvgPool2d": (nn.AvgPool2d, _pool_config, lambda c: nn.AvgPool2d(**c)),
    "Dropout": (nn.Dropout, lambda m: {"p": m.p}, lambda c: nn.Dropout(**c)),
    "Identity": (nn.Identity, lambda m: {}, lambda c: nn.Identity()),
}


def _leaf_name(module: nn.Module) -> str | None:
    for name, (cls, _, _) in _LEAVES.items():
        if type(module) is cls:
            return name
    for name, (cls, _, _) in _LEAVES.items():
        # a subclass that keeps its base's forward computes what the base computes
        if isinstance(module, cls) and type(module).forward is cls.forward:
            if name == "MaxPool2d" and module.return_indices:
                return None
            return name
    return None


def describe(model: nn.Module, path: str = "model") -> dict[str, Any]:
    """The JSON-able architecture tree of ``model`` (raises :class:`DeployFormatError`)."""
    if type(model) is nn.Sequential or (isinstance(model, nn.Sequential)
                                        and type(model).forward is nn.Sequential.forward):
        return {"type": "Sequential",
                "children": [[name, describe(child, f"{path}.{name}")]
                             for name, child in model.named_children()]}
    name = _leaf_name(model)
    if name is None or (name == "MaxPool2d" and model.return_indices):
        supported = ", ".join(["Sequential", *_LEAVES])
        raise DeployFormatError(
            f"cannot describe module {path!r} of type {type(model).__name__}: the supermask "
            f"format rebuilds models made of {supported} only (models with a custom forward "
            "cannot be exported)")
    _, config_of, _ = _LEAVES[name]
    return {"type": name, "config": config_of(model)}


def build(tree: dict[str, Any]) -> nn.Module:
    """Rebuild the (uninitialised) model an architecture tree describes."""
    try:
        kind = tree["type"]
        if kind == "Sequential":
            seq = nn.Sequential()
            for name, child in tree["children"]:
                seq.add_module(str(name), build(child))
            return seq
        if kind not in _LEAVES:
            raise DeployFormatError(f"unknown module type {kind!r} in the architecture")
        config = dict(tree.get("config", {}))
        for key, value in config.items():
            if isinstance(value, list):
                config[key] = tuple(value)
        return _LEAVES[kind][2](config)
    except DeployFormatError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise DeployFormatError(f"invalid architecture description: {err!r}") from err


# --------------------------------------------------------------------------------------------
# File format
# --------------------------------------------------------------------------------------------

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path) as fh:
        fh.write(data)


def export_supermask(model: nn.Module, path: str | os.PathLike[str], atol: float = 1e-6
                     ) -> nn.Module:
    """Convert ``model`` (:func:`to_supermask`) and write it to ``path`` (safetensors).

    Returns the converted model (on CPU). Raises :class:`DeployFormatError` for modules the
    format cannot describe and for edge-popup layers whose kept weights are not ``+-c``.
    """
    from safetensors.torch import save

    from ..version import __version__

    converted = to_supermask(model, atol).cpu().eval()
    architecture = describe(converted)
    tensors = {name: t.detach().cpu().contiguous().clone()
               for name, t in converted.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "checksum": _checksum(tensors), "architecture": json.dumps(architecture),
                "subkern_version": str(__version__)}
    _write_bytes(path, save(tensors, metadata=metadata))
    return converted


def _parse_header(data: bytes, path: str) -> dict[str, Any]:
    if len(data) < 8:
        raise DeployFormatError(f"{path}: not a supermask artifact (file of {len(data)} bytes is "
                                "too short for a safetensors header; truncated?)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise DeployFormatError(f"{path}: not a valid safetensors file (header of {size} bytes "
                                f"in a file of {len(data)} bytes; truncated or foreign)")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DeployFormatError(f"{path}: not a valid safetensors file (bad header: {err})"
                                ) from err
    if not isinstance(header, dict):
        raise DeployFormatError(f"{path}: not a valid safetensors file (header is not a map)")
    end = 8 + size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            stop = int(info["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DeployFormatError(f"{path}: bad entry {name!r} in the safetensors header"
                                    ) from err
        if end + stop > len(data):
            raise DeployFormatError(f"{path}: truncated: tensor {name!r} ends at byte "
                                    f"{end + stop} of a {len(data)}-byte file")
    return header


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a supermask artifact (checks format name and version)."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    return _check_metadata(_parse_header(data, path), path)


def _check_metadata(header: dict[str, Any], path: str) -> dict[str, str]:
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise DeployFormatError(f"{path}: not a supermask artifact (format "
                                f"{meta.get('format')!r}, expected {FORMAT_NAME!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as err:
        raise DeployFormatError(f"{path}: bad format_version "
                                f"{meta.get('format_version')!r}") from err
    if version > FORMAT_VERSION:
        raise DeployFormatError(f"{path}: format version {version} is newer than this subkern "
                                f"supports ({FORMAT_VERSION}); upgrade subkern")
    if version < 1:
        raise DeployFormatError(f"{path}: bad format version {version}")
    for key in ("checksum", "architecture"):
        if key not in meta:
            raise DeployFormatError(f"{path}: metadata lacks {key!r}")
    return dict(meta)


def load_supermask(path: str | os.PathLike[str], device: torch.device | str = "cpu"
                   ) -> nn.Module:
    """Rebuild and load a model written by :func:`export_supermask` (in eval mode)."""
    from safetensors.torch import load

    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    meta = _check_metadata(_parse_header(data, path), path)
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise DeployFormatError(f"{path}: corrupt safetensors data ({err})") from err
    if _checksum(tensors) != meta["checksum"]:
        raise DeployFormatError(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        tree = json.loads(meta["architecture"])
    except json.JSONDecodeError as err:
        raise DeployFormatError(f"{path}: architecture is not valid JSON ({err})") from err
    model = build(tree)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise DeployFormatError(f"{path}: tensors do not match the architecture ({err})") from err
    return model.to(device).eval()
