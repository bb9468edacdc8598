"""Deployment of trained sparse models: safetensors artifacts rebuilt without the training code.

* :func:`export` / :func:`load` (:mod:`subkern.deploy.sparse`): STR or any pruned model as
  ``SparseLinear`` / ``SparseConv2d`` inference layers (format ``"subkern.sparse"``);
  :func:`load` also opens supermask artifacts;
* :func:`export_supermask` / :func:`load_supermask` (:mod:`subkern.deploy.supermask`): edge-popup
  subnetworks as bit-packed supermasks (format ``"subkern.supermask"``);
* :mod:`subkern.deploy.artifact` (file format: header checks, checksum, atomic write) and
  :mod:`subkern.deploy.tree` (the JSON module tree, :class:`Residual`, lowerings) are shared.

``FORMAT_NAME`` / ``FORMAT_VERSION`` are the supermask format's (kept for compatibility);
``SPARSE_FORMAT_NAME`` / ``SPARSE_FORMAT_VERSION`` the sparse format's.
"""

from __future__ import annotations

from .artifact import DeployFormatError
from .sparse import FORMAT_NAME as SPARSE_FORMAT_NAME
from .sparse import FORMAT_VERSION as SPARSE_FORMAT_VERSION
from .sparse import export, fold_batchnorm_, layer_report, load, read_metadata, to_sparse
from .supermask import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSION_BITS,
    export_supermask,
    load_supermask,
    sign_modes,
    to_supermask,
)
from .tree import Residual, register_leaf, register_lowering

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FORMAT_VERSION_BITS",
    "SPARSE_FORMAT_NAME",
    "SPARSE_FORMAT_VERSION",
    "DeployFormatError",
    "Residual",
    "export",
    "export_supermask",
    "fold_batchnorm_",
    "layer_report",
    "load",
    "load_supermask",
    "read_metadata",
    "register_leaf",
    "register_lowering",
    "sign_modes",
    "to_sparse",
    "to_supermask",
]
