"""Generic deployment artifact: one safetensors file with a checked header (every subkern format).

A subkern artifact is a `safetensors <https://github.com/huggingface/safetensors>`_ file:

* tensors: a model's ``state_dict()`` (contiguous CPU copies);
* metadata (all strings): ``format`` (the format's name, e.g. ``"subkern.supermask"`` or
  ``"subkern.sparse"``), ``format_version`` (an integer), ``checksum`` = ``"sha256:<hex>"`` of the
  tensors (for every tensor in name order: the name, dtype, shape and raw bytes, see
  :func:`checksum`), ``architecture`` (the JSON module tree of :mod:`subkern.deploy.tree`) and
  ``subkern_version``, plus whatever a format adds.

Writing is atomic (:func:`subkern._atomic.atomic_write`: temporary file in the same folder, fsync,
``os.replace``). Reading refuses, with :class:`DeployFormatError` naming the problem, a file that
is too short or truncated, is not safetensors, has another format name, a newer (or invalid)
format version, lacks a required metadata key, or fails its checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._atomic import atomic_write

__all__ = ["DeployFormatError", "checksum", "parse_header", "check_metadata", "read_header",
           "read_bytes", "write_artifact", "read_artifact", "MAX_HEADER_BYTES"]

#: Largest safetensors header accepted (a corrupt length field must not trigger a huge read).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class DeployFormatError(ValueError):
    """The model cannot be exported, or the file is not a valid subkern deployment artifact."""


def checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` over every tensor in name order: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _kind(format_names: Iterable[str]) -> str:
    names = list(format_names)
    if len(names) == 1:
        return names[0].removeprefix("subkern.")
    return "subkern"


def parse_header(data: bytes, path: str, kind: str = "subkern") -> dict[str, Any]:
    """The JSON header of the safetensors bytes ``data`` (checks sizes, offsets, truncation)."""
    if len(data) < 8:
        raise DeployFormatError(f"{path}: not a {kind} artifact (file of {len(data)} bytes is "
                                "too short for a safetensors header; truncated?)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
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


def check_metadata(header: Mapping[str, Any], path: str, formats: Mapping[str, int],
                   required: Iterable[str] = ("checksum", "architecture")) -> dict[str, str]:
    """The metadata of ``header`` after checking its format name and version.

    ``formats``: accepted format name -> newest version this subkern reads.
    """
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise DeployFormatError(f"{path}: bad safetensors metadata (not a map)")
    name = meta.get("format")
    if name not in formats:
        expected = " or ".join(repr(f) for f in formats)
        raise DeployFormatError(f"{path}: not a {_kind(formats)} artifact (format {name!r}, "
                                f"expected {expected})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as err:
        raise DeployFormatError(f"{path}: bad format_version "
                                f"{meta.get('format_version')!r}") from err
    newest = formats[name]
    if version > newest:
        raise DeployFormatError(f"{path}: {name} format version {version} is newer than this "
                                f"subkern supports ({newest}); upgrade subkern")
    if version < 1:
        raise DeployFormatError(f"{path}: bad format version {version}")
    for key in required:
        if key not in meta:
            raise DeployFormatError(f"{path}: metadata lacks {key!r}")
    return dict(meta)


def read_bytes(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """``(path as str, file contents)``."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        return path, fh.read()


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw safetensors header of ``path`` (structure checked, metadata not)."""
    spath, data = read_bytes(path)
    return parse_header(data, spath)


def write_artifact(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], *,
                   format_name: str, format_version: int, architecture: Mapping[str, Any],
                   extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` + metadata (format, version, checksum, architecture) atomically."""
    from safetensors.torch import save

    from ..version import __version__

    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    metadata = {"format": format_name, "format_version": str(int(format_version)),
                "checksum": checksum(tensors), "architecture": json.dumps(architecture),
                "subkern_version": str(__version__)}
    for key, value in (extra_metadata or {}).items():
        if key in metadata:
            raise ValueError(f"extra_metadata may not override {key!r}")
        metadata[key] = str(value)
    data = save(tensors, metadata=metadata)
    with atomic_write(path) as fh:
        fh.write(data)


def read_artifact(path: str | os.PathLike[str], formats: Mapping[str, int],
                  data: bytes | None = None
                  ) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, Any]]:
    """``(metadata, tensors, architecture tree)`` of an artifact whose format is in ``formats``
    (``data``: the file's bytes when already read).

    Every check of the module docstring runs before anything is returned.
    """
    from safetensors.torch import load

    if data is None:
        spath, data = read_bytes(path)
    else:
        spath = os.fspath(path)
    meta = check_metadata(parse_header(data, spath, _kind(formats)), spath, formats)
    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise DeployFormatError(f"{spath}: corrupt safetensors data ({err})") from err
    if checksum(tensors) != meta["checksum"]:
        raise DeployFormatError(f"{spath}: checksum mismatch (the file is corrupt)")
    try:
        tree = json.loads(meta["architecture"])
    except json.JSONDecodeError as err:
        raise DeployFormatError(f"{spath}: architecture is not valid JSON ({err})") from err
    if not isinstance(tree, dict):
        raise DeployFormatError(f"{spath}: architecture is not a JSON object")
    return meta, tensors, tree
