"""A flat (exhaustive) index of binary codes searched by Hamming distance.

:class:`BinaryIndex` plays the part of FAISS's ``IndexBinaryFlat`` (plus an id map): it stores
``uint8`` codes ``[n, nbits / 8]`` in FAISS's bit layout, each with an ``int64`` id, and answers

* k-nearest-neighbour queries (:meth:`BinaryIndex.search`) through the fused
  :func:`subkern.ops.binary.hamming_topk` (whichever backend is active),
* range queries (:meth:`BinaryIndex.range_search`) through
  :func:`subkern.ops.binary.hamming_distance` on bounded database chunks.

Ordering is deterministic everywhere: results are ascending by the key ``(distance, position)``,
where the *position* of an entry is its rank in insertion order among the live entries (removals
keep the order of the rest). Files: :meth:`BinaryIndex.save` / :meth:`BinaryIndex.load` (format in
:mod:`subkern.retrieval.storage`).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import torch

from ..ops.binary import MAX_CODE_BYTES, hamming_distance, hamming_topk
from . import storage

__all__ = ["BinaryIndex", "MISSING_DISTANCE", "MISSING_ID"]

#: Distance in the result slots that have no entry (k larger than the index), as FAISS.
MISSING_DISTANCE = torch.iinfo(torch.int32).max
#: Id in the result slots that have no entry, as FAISS.
MISSING_ID = -1

_MIN_CAPACITY = 64
# int32 distances one range-search block may hold (16 MiB): bounds its working memory.
_RANGE_BLOCK_ELEMENTS = 1 << 22

IdsLike = torch.Tensor | Sequence[int]


def _check_nbits(nbits: object) -> int:
    if isinstance(nbits, bool):
        raise TypeError("nbits must be an int, got bool")
    try:
        value = operator.index(nbits)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"nbits must be an int, got {type(nbits).__name__}") from None
    if value <= 0 or value % 8 != 0 or value > 8 * MAX_CODE_BYTES:
        raise ValueError(f"nbits must be a positive multiple of 8 between 8 and "
                         f"{8 * MAX_CODE_BYTES}, got {value}")
    return value


def _as_id_tensor(name: str, ids: object) -> torch.Tensor:
    """``ids`` (an integer tensor, or a sequence / array of ints) as a 1-D int64 tensor."""
    if isinstance(ids, torch.Tensor):
        tensor = ids
    else:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be an integer tensor or a sequence of ints, got "
                            f"{type(ids).__name__} ({err})") from None
        if tensor.numel() == 0:
            tensor = tensor.to(torch.int64)
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.is_complex():
        raise TypeError(f"{name} must hold integers (int64 ids), got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(tensor.shape)}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {tensor.layout}")
    return tensor.to(torch.int64)


class BinaryIndex:
    """Exhaustive Hamming-distance index of ``nbits``-bit binary codes (FAISS ``IndexBinaryFlat``).

    Codes are ``uint8 [n, nbits / 8]`` in FAISS's layout (bit ``i`` is bit ``i % 8`` of byte
    ``i // 8``); every entry carries an ``int64`` id, by default a running counter ``0, 1, 2, ...``
    over all :meth:`add` calls that is never reused after :meth:`remove_ids`.

    Storage is two capacity-doubling buffers (codes and ids) on :attr:`device`, so :meth:`add` is
    amortised ``O(rows added)``. An index loaded with ``mmap=True`` reads its buffers straight from
    the file's pages (copy-on-write mapping, nothing is copied at load time) and copies them into
    its own memory only on the first mutation (:meth:`add`, :meth:`remove_ids`; :meth:`reset`
    simply drops the mapping).

    Args:
        nbits: code length in bits, a positive multiple of 8 from 8 to 4096.
        device: where the codes live and searches run (default CPU).
    """

    def __init__(self, nbits: int, device: torch.device | str | None = None) -> None:
        self._nbits = _check_nbits(nbits)
        self._code_size = self._nbits // 8
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        self._codes = torch.empty((0, self._code_size), dtype=torch.uint8, device=self._device)
        self._ids = torch.empty((0,), dtype=torch.int64, device=self._device)
        self._n = 0
        self._next_id = 0
        self._mapped_path: str | None = None

    # ----------------------------------------------------------------------------------------
    # Properties
    # ----------------------------------------------------------------------------------------

    @property
    def nbits(self) -> int:
        """Code length in bits."""
        return self._nbits

    @property
    def code_size(self) -> int:
        """Code length in bytes (``nbits // 8``)."""
        return self._code_size

    @property
    def ntotal(self) -> int:
        """Number of live entries."""
        return self._n

    @property
    def next_id(self) -> int:
        """The id the next default-id :meth:`add` gives its first row."""
        return self._next_id

    @property
    def device(self) -> torch.device:
        """Device of the stored codes and ids (and of search results)."""
        return self._device

    @property
    def codes(self) -> torch.Tensor:
        """The live codes ``uint8 [ntotal, code_size]`` in insertion order.

        A view of the index's buffer, not a copy: treat it as read-only (writing through it
        changes the index; for a memory-mapped index the writes stay private to this process).
        It is only valid until the next :meth:`add`, :meth:`remove_ids` or :meth:`reset`.
        """
        return self._codes[: self._n]

    @property
    def ids(self) -> torch.Tensor:
        """The ids ``int64 [ntotal]`` of :attr:`codes`, row for row (a read-only view, as codes)."""
        return self._ids[: self._n]

    @property
    def is_mapped(self) -> bool:
        """Whether the buffers are still the memory-mapped pages of the file loaded from."""
        return self._mapped_path is not None

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        mapped = f", mapped={self._mapped_path!r}" if self._mapped_path is not None else ""
        return (f"BinaryIndex(nbits={self._nbits}, ntotal={self._n}, next_id={self._next_id}, "
                f"device={self._device}{mapped})")

    # ----------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------

    def _check_codes(self, name: str, codes: object) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of uint8 codes, got "
                            f"{type(codes).__name__}")
        if codes.dtype != torch.uint8:
            raise TypeError(f"{name} must have dtype torch.uint8 (packed codes [n, "
                            f"{self._code_size}], see subkern.pack_bits), got {codes.dtype}")
        if codes.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {codes.layout}")
        if codes.dim() != 2 or codes.shape[1] != self._code_size:
            hint = " (use codes.unsqueeze(0) for a single code)" if (
                codes.dim() == 1 and codes.shape[0] == self._code_size) else ""
            raise ValueError(f"{name} must have shape [n, {self._code_size}] for {self._nbits}-bit "
                             f"codes, got {tuple(codes.shape)}{hint}")
        if codes.device != self._device:
            raise ValueError(f"{name} is on device {codes.device} but the index is on "
                             f"{self._device}; move one of them (tensor.to(index.device) or "
                             f"index.to(device))")
        return codes.contiguous()

    def _check_ids(self, ids: object, n: int) -> torch.Tensor:
        ids_t = _as_id_tensor("ids", ids)
        if ids_t.shape[0] != n:
            raise ValueError(f"ids must have one id per code: got {ids_t.shape[0]} ids for {n} "
                             f"codes")
        if ids_t.device != self._device and ids_t.device.type != "cpu":
            raise ValueError(f"ids is on device {ids_t.device} but the index is on "
                             f"{self._device}")
        ids_t = ids_t.to(self._device)
        if n == 0:
            return ids_t
        if bool((ids_t < 0).any()):
            raise ValueError("ids must be non-negative (-1 marks a missing result)")
        if torch.unique(ids_t).numel() != n:
            raise ValueError("ids must be unique; the given ids contain duplicates")
        # Every id ever given is below next_id, so ids at or above it cannot collide.
        if int(ids_t.min()) < self._next_id and self._n > 0:
            clash = torch.isin(ids_t, self.ids)
            if bool(clash.any()):
                example = int(ids_t[clash][0])
                raise ValueError(f"ids must not already be in the index: id {example} is already "
                                 f"present ({int(clash.sum())} clashing id(s) in all)")
        return ids_t

    # ----------------------------------------------------------------------------------------
    # Mutation
    # ----------------------------------------------------------------------------------------

    def _own_buffers(self, capacity: int) -> None:
        """Reallocate both buffers with room for ``capacity`` rows, keeping the live part."""
        codes = torch.empty((capacity, self._code_size), dtype=torch.uint8, device=self._device)
        ids = torch.empty((capacity,), dtype=torch.int64, device=self._device)
        codes[: self._n] = self._codes[: self._n]
        ids[: self._n] = self._ids[: self._n]
        self._codes, self._ids = codes, ids
        self._mapped_path = None

    def add(self, codes: torch.Tensor, ids: IdsLike | None = None) -> None:
        """Append ``codes`` (``uint8 [n, code_size]`` on :attr:`device`).

        ``ids`` (``int64 [n]``, non-negative, unique, none already in the index; CPU or on
        :attr:`device`) defaults to the running counter :attr:`next_id`, :attr:`next_id` + 1, ....
        After explicit ids the counter continues above the largest id ever added, so default ids
        never collide with explicit ones. Amortised ``O(n)``: buffers grow by doubling.
        """
        codes = self._check_codes("codes", codes)
        n = codes.shape[0]
        if ids is None:
            ids_t = torch.arange(self._next_id, self._next_id + n, dtype=torch.int64,
                                 device=self._device)
        else:
            ids_t = self._check_ids(ids, n)
        if n == 0:
            return
        needed = self._n + n
        if needed > self._codes.shape[0] or self._mapped_path is not None:
            capacity = max(needed, 2 * self._codes.shape[0], _MIN_CAPACITY)
            self._own_buffers(capacity)
        self._codes[self._n: needed] = codes
        self._ids[self._n: needed] = ids_t
        self._n = needed
        self._next_id = max(self._next_id, int(ids_t.max()) + 1)

    def remove_ids(self, ids: IdsLike) -> int:
        """Remove the entries whose id is in ``ids`` (ids not in the index are ignored).

        Returns the number of entries removed. The remaining entries keep their insertion order;
        removed ids are never handed out again by the default-id counter. ``O(ntotal)``.
        """
        ids_t = _as_id_tensor("ids", ids)
        if self._n == 0 or ids_t.numel() == 0:
            return 0
        remove = torch.isin(self.ids, ids_t.to(self._device))
        removed = int(remove.sum())
        if removed == 0:
            return 0
        keep = ~remove
        kept_codes = self.codes[keep]
        kept_ids = self.ids[keep]
        new_n = self._n - removed
        if self._mapped_path is not None:
            # Mapped pages are never written: the kept rows become the index's own buffers.
            self._codes, self._ids = kept_codes, kept_ids
            self._mapped_path = None
        else:
            self._codes[:new_n] = kept_codes
            self._ids[:new_n] = kept_ids
        self._n = new_n
        return removed

    def reset(self) -> None:
        """Remove every entry and release the buffers (the default-id counter keeps counting)."""
        self._codes = torch.empty((0, self._code_size), dtype=torch.uint8, device=self._device)
        self._ids = torch.empty((0,), dtype=torch.int64, device=self._device)
        self._n = 0
        self._mapped_path = None

    # ----------------------------------------------------------------------------------------
    # Search
    # ----------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest entries of every query by Hamming distance.

        Returns ``(distances int32 [nq, k], ids int64 [nq, k])`` on :attr:`device`, ascending by
        ``(distance, position)``: ties go to the entry added earlier. Slots past :attr:`ntotal`
        hold ``(MISSING_DISTANCE, MISSING_ID) = (2**31 - 1, -1)``, as FAISS. Runs the fused
        :func:`~subkern.ops.binary.hamming_topk` of the active backend with ``min(k, ntotal)``.
        """
        queries = self._check_codes("queries", queries)
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be a positive int, got {type(k).__name__}")
        if k <= 0:
            raise ValueError(f"k must be a positive int, got {k}")
        nq = queries.shape[0]
        distances = torch.full((nq, k), MISSING_DISTANCE, dtype=torch.int32, device=self._device)
        ids = torch.full((nq, k), MISSING_ID, dtype=torch.int64, device=self._device)
        kk = min(k, self._n)
        if nq == 0 or kk == 0:
            return distances, ids
        found_d, found_pos = hamming_topk(queries, self.codes, kk)
        present = found_pos >= 0
        distances[:, :kk] = found_d
        ids[:, :kk] = torch.where(present, self.ids[found_pos.clamp_min(0)],
                                  torch.full_like(found_pos, MISSING_ID))
        return distances, ids

    def range_search(self, queries: torch.Tensor, radius: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All entries at Hamming distance strictly below ``radius`` from each query (as FAISS).

        Returns ``(lims int64 [nq + 1], distances int32 [m], ids int64 [m])``: the results of
        query ``i`` are ``distances[lims[i]:lims[i + 1]]`` and ``ids[lims[i]:lims[i + 1]]``,
        ascending by ``(distance, position)``. The database is scanned in blocks of at most
        ``2**22`` distances (:func:`~subkern.ops.binary.hamming_distance` per block), so the
        working memory beyond the results is bounded.
        """
        queries = self._check_codes("queries", queries)
        if isinstance(radius, bool) or not isinstance(radius, int):
            raise TypeError(f"radius must be an int, got {type(radius).__name__}")
        nq, n = queries.shape[0], self._n
        dev = self._device
        radius = min(radius, self._nbits + 1)  # every distance is <= nbits
        q_parts: list[torch.Tensor] = []
        d_parts: list[torch.Tensor] = []
        p_parts: list[torch.Tensor] = []
        if nq > 0 and n > 0 and radius > 0:
            db_block = max(1, min(n, _RANGE_BLOCK_ELEMENTS // max(1, min(nq, 1024))))
            q_block = max(1, min(nq, _RANGE_BLOCK_ELEMENTS // db_block))
            for d0 in range(0, n, db_block):
                db = self._codes[d0: min(n, d0 + db_block)]
                for q0 in range(0, nq, q_block):
                    dist = hamming_distance(queries[q0: q0 + q_block], db)
                    hit_q, hit_p = torch.nonzero(dist < radius, as_tuple=True)
                    if hit_q.numel() == 0:
                        continue
                    d_parts.append(dist[hit_q, hit_p])
                    q_parts.append(hit_q + q0)
                    p_parts.append(hit_p + d0)
        lims = torch.zeros(nq + 1, dtype=torch.int64, device=dev)
        if not q_parts:
            return (lims, torch.empty(0, dtype=torch.int32, device=dev),
                    torch.empty(0, dtype=torch.int64, device=dev))
        hit_q = torch.cat(q_parts)
        hit_d = torch.cat(d_parts)
        hit_p = torch.cat(p_parts)
        # Per query, hits were produced in ascending position, so one stable sort by the key
        # q * (nbits + 1) + distance orders them by (query, distance, position).
        key = hit_q * (self._nbits + 1) + hit_d.to(torch.int64)
        order = torch.sort(key, stable=True).indices
        hit_d, hit_p = hit_d[order], hit_p[order]
        lims[1:] = torch.cumsum(torch.bincount(hit_q, minlength=nq), dim=0)
        return lims, hit_d, self._ids[hit_p]

    # ----------------------------------------------------------------------------------------
    # Devices and files
    # ----------------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> BinaryIndex:
        """This index on ``device``, with ``torch.Tensor.to`` semantics.

        Returns ``self`` when the index already lives on ``device``; otherwise a new index holding
        copies of the live codes and ids (same ids, same default-id counter). The original is
        never modified.
        """
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if target == self._device:
            return self
        other = BinaryIndex(self._nbits, device=target)
        other._codes = self.codes.to(target, copy=True)
        other._ids = self.ids.to(target, copy=True)
        other._n = self._n
        other._next_id = self._next_id
        return other

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (format: :mod:`subkern.retrieval.storage`).

        The file appears complete under ``path`` or not at all; an existing file is replaced only
        once the new one is fully written and synced.
        """
        storage.write_index_file(path, self._nbits, self._next_id, self.codes, self.ids)

    @classmethod
    def load(cls, path: str | os.PathLike[str], mmap: bool = True, verify: bool = True,
             device: torch.device | str | None = None) -> BinaryIndex:
        """Read an index written by :meth:`save`.

        ``mmap=True`` maps the code and id sections of the file copy-on-write instead of reading
        them: loading costs no copy and no anonymous memory, pages come from the page cache on
        demand, and the index copies its buffers into its own memory on the first :meth:`add` or
        :meth:`remove_ids`. Writes never reach the file. ``verify=True`` checks the CRC-32 of
        each section (reading the whole file once); the header's checksum is always checked.
        ``device`` other than CPU loads then moves (:meth:`to`). Any defect raises
        :class:`~subkern.retrieval.storage.IndexFormatError`.
        """
        parts = storage.read_index_file(path, mmap=mmap, verify=verify)
        index = cls(parts.nbits)
        index._codes = parts.codes
        index._ids = parts.ids
        index._n = parts.codes.shape[0]
        index._next_id = parts.next_id
        index._mapped_path = parts.mapped_path
        if device is not None:
            index = index.to(device)
        return index
