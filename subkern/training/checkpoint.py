"""Checkpoints that are written atomically and refuse to load when damaged.

File layout (all integers little-endian)::

    b"SUBKCKPT"            8 bytes magic
    uint32 version          CHECKPOINT_VERSION
    32 bytes                SHA-256 of the payload
    payload                 torch.save(state) bytes (loaded back with weights_only=True)

``save_checkpoint`` writes to a temporary file in the same folder, fsyncs it and renames it over
the target with ``os.replace``, so a crash leaves either the old or the new checkpoint, never a
half-written one. ``load_checkpoint`` raises ``CheckpointError`` for a wrong magic, an unknown
version, a checksum mismatch (truncation, bit flips) or an unreadable payload.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from typing import Any

import torch

from .._atomic import atomic_write

MAGIC = b"SUBKCKPT"
CHECKPOINT_VERSION = 1
_HEADER = struct.Struct("<8sI32s")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, or of an unknown format version."""


def save_checkpoint(path: str, state: dict[str, Any]) -> str:
    """Atomically write ``state`` (tensors, numbers, strings, lists, dicts) to ``path``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = _HEADER.pack(MAGIC, CHECKPOINT_VERSION, hashlib.sha256(payload).digest())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(header)
        handle.write(payload)
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; ``CheckpointError`` if it is damaged."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    if len(raw) < _HEADER.size:
        raise CheckpointError(f"{path}: truncated checkpoint ({len(raw)} bytes)")
    magic, version, digest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise CheckpointError(f"{path}: not a subkern checkpoint")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this subkern "
                              f"reads version {CHECKPOINT_VERSION}")
    payload = raw[_HEADER.size:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (file is corrupt or truncated)")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: unreadable checkpoint payload ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint payload is not a dict")
    return state
