"""Retrieval structures on top of the binary-code ops: :class:`BinaryIndex` (a flat Hamming index
with ids, FAISS ``IndexBinaryFlat``-like), its file format, and sharded search over
``torch.distributed``."""

from __future__ import annotations

from .index import MISSING_DISTANCE, MISSING_ID, BinaryIndex
from .sharded import shard_bounds, shard_offsets, sharded_range_search, sharded_search
from .storage import FORMAT_VERSION, IndexFormatError

__all__ = [
    "BinaryIndex",
    "IndexFormatError",
    "FORMAT_VERSION",
    "MISSING_DISTANCE",
    "MISSING_ID",
    "shard_bounds",
    "shard_offsets",
    "sharded_search",
    "sharded_range_search",
]
