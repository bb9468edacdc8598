"""Deployment of trained subnetworks: bit-packed supermask artifacts (safetensors).

See :mod:`subkern.deploy.supermask` for the file format.
"""

from __future__ import annotations

from .supermask import (
    FORMAT_NAME,
    FORMAT_VERSION,
    DeployFormatError,
    export_supermask,
    load_supermask,
    read_metadata,
    to_supermask,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DeployFormatError",
    "export_supermask",
    "load_supermask",
    "read_metadata",
    "to_supermask",
]
