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
  rebuilds the model without the training code, ``subkern_version``, ``sign_modes`` (JSON
  ``{layer name: "bits" | "seed"}``).

Sign modes (``export_supermask(..., signs=...)``): a layer trained with a ``sign_seed``
(``SubnetLinear(..., sign_seed=s)``, signed-constant init) can be stored with its seed instead of
its sign bits (``sign_seed`` int64 tensor instead of ``<layer>.sign_bits``, ``"sign_mode":
"seed"`` in its architecture config): 1 bit per weight. Format version 2 introduced this mode; an
artifact that uses it is written as version 2 (which subkerns that predate it refuse as "newer"),
any other as version 1 (unchanged from before; version-1 files load as they always did).

Architecture tree (:mod:`subkern.deploy.tree`): the model must be built from registered modules
(``Sequential``, ``Linear``, ``Conv2d``, BatchNorm, ReLU, pools, ``Flatten``, ``Dropout``,
``Identity``, ``SupermaskLinear``, ``SupermaskConv2d``, ...) and edge-popup layers (which become
Supermask layers); a custom ``forward`` cannot be described, so any other module is refused with
a :class:`DeployFormatError` naming it. The generic file handling (header checks, checksum,
atomic write) is :mod:`subkern.deploy.artifact`.

The file is written atomically (temporary file in the same directory, fsync, ``os.replace``).
:func:`load_supermask` refuses, with :class:`DeployFormatError`, a file that is truncated, is not
safetensors, is another format, has a newer format version, fails its checksum, or describes an
unknown module.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

from ..nn.supermask import EXPORT_SIGNS, SupermaskConv2d, SupermaskLinear
from .artifact import (
    DeployFormatError,
    check_metadata,
    checksum,
    parse_header,
    read_artifact,
    read_bytes,
    write_artifact,
)
from .tree import build, describe, instantiate

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "DeployFormatError", "export_supermask",
           "load_supermask", "to_supermask", "describe", "build", "read_metadata"]

FORMAT_NAME = "subkern.supermask"
#: Newest format version this subkern reads and writes. Version 2 added Supermask layers in seed
#: mode (``sign_mode="seed"``: the ``sign_seed`` buffer replaces ``sign_bits``); an artifact
#: without such a layer is still written as version 1, so older subkerns read it, and they refuse
#: a version-2 file as "newer than this subkern supports".
FORMAT_VERSION = 2
#: The version written for artifacts whose layers all store their sign bits.
FORMAT_VERSION_BITS = 1


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def _is_edge_popup(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("weight", "scores", "k")) and isinstance(
        getattr(module, "scores", None), torch.Tensor)


def to_supermask(model: nn.Module, atol: float = 1e-6, signs: str = "bits") -> nn.Module:
    """A copy of ``model`` with every edge-popup layer replaced by its Supermask layer.

    ``signs``: ``"bits"`` (store sign bits), ``"seed"`` (store each layer's ``sign_seed``
    instead; raises :class:`DeployFormatError` naming the layer when it has no seed or the seed
    does not regenerate every kept sign) or ``"auto"`` (the seed where it does, else the bits).
    """
    if signs not in EXPORT_SIGNS:
        raise ValueError(f"signs must be one of {', '.join(EXPORT_SIGNS)}, got {signs!r}")
    if _is_edge_popup(model):
        try:
            return _convert_layer(model, atol, signs)
        except ValueError as err:
            raise DeployFormatError(f"{type(model).__name__}: {err}") from err
    out = copy.deepcopy(model)
    _replace(out, atol, signs)
    return out


def _convert_layer(module: nn.Module, atol: float, signs: str = "bits") -> nn.Module:
    if module.weight.dim() == 2:
        return SupermaskLinear.from_subnet(module, atol, signs)
    if module.weight.dim() == 4:
        return SupermaskConv2d.from_subnet(module, atol, signs)
    raise DeployFormatError(f"{type(module).__name__}: edge-popup layer with a "
                            f"{module.weight.dim()}-D weight is not supported (Linear or Conv2d)")


def _replace(parent: nn.Module, atol: float, signs: str = "bits") -> None:
    for name, child in list(parent.named_children()):
        if _is_edge_popup(child):
            try:
                setattr(parent, name, _convert_layer(child, atol, signs))
            except ValueError as err:
                raise DeployFormatError(f"layer {name!r} ({type(child).__name__}): {err}") from err
        else:
            _replace(child, atol, signs)


def sign_modes(model: nn.Module) -> dict[str, str]:
    """``{layer name: "bits" | "seed"}`` of the Supermask layers of ``model``."""
    return {name: m.sign_mode for name, m in model.named_modules()
            if isinstance(m, (SupermaskLinear, SupermaskConv2d))}


# --------------------------------------------------------------------------------------------
# Architecture description and file format: generic, in subkern.deploy.tree / .artifact
# --------------------------------------------------------------------------------------------

def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    return checksum(tensors)


def export_supermask(model: nn.Module, path: str | os.PathLike[str], atol: float = 1e-6,
                     signs: str = "auto") -> nn.Module:
    """Convert ``model`` (:func:`to_supermask`) and write it to ``path`` (safetensors).

    ``signs`` (:func:`to_supermask`): ``"auto"`` (default) stores a layer's sign seed instead of
    its sign bits when the layer was trained with ``sign_seed`` and the seed regenerates every
    kept sign (the artifact then holds 1 bit per weight, 32x less than float32), ``"bits"``
    always stores the bits, ``"seed"`` requires the seed for every layer. The metadata key
    ``sign_modes`` records each layer's mode (JSON), and the architecture each layer's
    ``sign_mode``; an artifact with a seed-mode layer has format version 2, else 1.

    Returns the converted model (on CPU). Raises :class:`DeployFormatError` for modules the
    format cannot describe and for edge-popup layers whose kept weights are not ``+-c``.
    """
    converted = to_supermask(model, atol, signs).cpu().eval()
    modes = sign_modes(converted)
    version = FORMAT_VERSION if "seed" in modes.values() else FORMAT_VERSION_BITS
    write_artifact(path, converted.state_dict(), format_name=FORMAT_NAME,
                   format_version=version, architecture=describe(converted),
                   extra_metadata={"sign_modes": json.dumps(modes)})
    return converted


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a supermask artifact (checks format name and version)."""
    spath, data = read_bytes(path)
    return _check_metadata(parse_header(data, spath, "supermask"), spath)


def _check_metadata(header: dict[str, Any], path: str) -> dict[str, str]:
    return check_metadata(header, path, {FORMAT_NAME: FORMAT_VERSION})


def load_supermask(path: str | os.PathLike[str], device: torch.device | str = "cpu"
                   ) -> nn.Module:
    """Rebuild and load a model written by :func:`export_supermask` (in eval mode)."""
    _, tensors, tree = read_artifact(path, {FORMAT_NAME: FORMAT_VERSION})
    return instantiate(tree, tensors, os.fspath(path), device)
