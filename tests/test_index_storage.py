"""BinaryIndex files: round trips, memory mapping, refusal of damaged or foreign files, atomic
save."""

from __future__ import annotations

import json
import os
import pathlib
import struct

import numpy as np
import pytest
import torch

from subkern.retrieval import BinaryIndex, IndexFormatError, storage


def random_codes(n: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, nbytes), dtype=torch.uint8)


def make_index(nbits: int = 64, n: int = 40, removals: bool = False) -> BinaryIndex:
    index = BinaryIndex(nbits)
    codes = random_codes(n, nbits // 8)
    if n > 4:
        codes[n // 2] = codes[0]
    index.add(codes[: n // 2])
    index.add(codes[n // 2:], ids=torch.arange(1000, 1000 + n - n // 2))
    if removals:
        index.remove_ids(torch.arange(0, 1000 + n, 3))
    return index


def layout(path: pathlib.Path) -> tuple[int, dict]:
    """(header length, parsed header) of a saved file."""
    raw = path.read_bytes()
    header_len = struct.unpack_from("<I", raw, 12)[0]
    return header_len, json.loads(raw[24: 24 + header_len])


def file_mappings(tensor: torch.Tensor) -> list[str]:
    """Paths of the /proc/self/maps regions that hold the tensor's first and last byte."""
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size() - 1
    paths = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            for address in (first, last):
                if lo <= address < hi:
                    paths.append(fields[5] if len(fields) > 5 else "")
    return paths


def assert_same_index(a: BinaryIndex, b: BinaryIndex) -> None:
    assert (a.nbits, a.ntotal, a.next_id, a.code_size) == (b.nbits, b.ntotal, b.next_id,
                                                           b.code_size)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.ids, b.ids)
    assert a.codes.dtype == torch.uint8 and a.ids.dtype == torch.int64


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def emptied_index() -> BinaryIndex:
    index = BinaryIndex(16)
    index.add(random_codes(5, 2))
    index.remove_ids(torch.arange(5))
    return index


CASES = {
    "empty": lambda: BinaryIndex(32),
    "empty-after-removals": emptied_index,
    "small": lambda: make_index(64, 40),
    "after-removals": lambda: make_index(64, 40, removals=True),
    "24-bit": lambda: make_index(24, 77),
    "4096-bit": lambda: make_index(4096, 23, removals=True),
    "one-row": lambda: make_index(8, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, case, mmap):
    index = CASES[case]()
    path = tmp_path / "index.subkbix"
    index.save(path)
    loaded = BinaryIndex.load(path, mmap=mmap)
    assert_same_index(loaded, index)
    assert loaded.is_mapped == (mmap and index.ntotal > 0)
    queries = torch.cat([random_codes(6, index.code_size), index.codes[:2]])
    for k in (1, 5, index.ntotal + 2):
        got, want = loaded.search(queries, k), index.search(queries, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    radius = index.nbits // 2
    pairs = zip(loaded.range_search(queries, radius), index.range_search(queries, radius),
                strict=True)
    for got, want in pairs:
        assert torch.equal(got, want)
    # the loaded index keeps working like the original, and never writes to the file
    before = path.read_bytes()
    loaded.add(random_codes(3, index.code_size))
    index.add(loaded.codes[-3:])
    assert torch.equal(loaded.ids, index.ids)
    assert loaded.remove_ids(index.ids[::2]) == index.remove_ids(index.ids[::2])
    assert_same_index(loaded, index)
    assert not loaded.is_mapped
    assert path.read_bytes() == before


def test_file_layout(tmp_path):
    index = make_index(24, 10)
    path = tmp_path / "i.subkbix"
    index.save(str(path))  # str and pathlib paths both work
    raw = path.read_bytes()
    assert raw[:8] == b"SUBKBIX\0" and struct.unpack_from("<I", raw, 8)[0] == 1
    header_len, meta = layout(path)
    assert meta["nbits"] == 24 and meta["ntotal"] == 10 and meta["next_id"] == 1005
    assert meta["file_size"] == len(raw) and meta["byte_order"] == "little"
    codes, ids = meta["sections"]["codes"], meta["sections"]["ids"]
    assert codes["offset"] % 64 == 0 and ids["offset"] % 64 == 0
    assert codes["offset"] >= 24 + header_len and ids["offset"] >= codes["offset"] + 30
    assert raw[codes["offset"]: codes["offset"] + 30] == index.codes.numpy().tobytes()
    assert raw[ids["offset"]: ids["offset"] + 80] == index.ids.numpy().astype("<i8").tobytes()


def test_mmap_load_does_not_copy(tmp_path):
    index = make_index(256, 2000)
    path = tmp_path / "big.subkbix"
    index.save(path)
    loaded = BinaryIndex.load(path, mmap=True)
    assert loaded.is_mapped and str(path) in repr(loaded)
    # the tensors' memory is the file's pages (copy-on-write mapping), not a copy
    assert file_mappings(loaded.codes) == [str(path), str(path)]
    assert file_mappings(loaded.ids) == [str(path), str(path)]
    _, meta = layout(path)
    base = loaded.codes.data_ptr() - meta["sections"]["codes"]["offset"]
    assert loaded.ids.data_ptr() - base == meta["sections"]["ids"]["offset"]
    d0 = loaded.search(index.codes[:4], 3)
    assert torch.equal(d0[1], index.search(index.codes[:4], 3)[1])
    # the first mutation copies into the index's own memory
    loaded.remove_ids([0])
    assert not loaded.is_mapped and file_mappings(loaded.codes) != [str(path), str(path)]
    copied = BinaryIndex.load(path, mmap=False)
    assert not copied.is_mapped and file_mappings(copied.codes) != [str(path), str(path)]


def test_load_to_device_and_over_mapped_file(tmp_path):
    path = tmp_path / "i.subkbix"
    first = make_index(32, 30)
    first.save(path)
    mapped = BinaryIndex.load(path)
    assert BinaryIndex.load(path, device="meta").device.type == "meta"
    # saving a new index over the file a live index maps: the mapped index keeps its data
    second = make_index(32, 12)
    second.save(path)
    assert_same_index(mapped, first)
    assert_same_index(BinaryIndex.load(path), second)
    mapped.save(path)  # and a mapped index can be saved over its own file
    assert_same_index(BinaryIndex.load(path), first)


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path) -> tuple[pathlib.Path, bytes, dict, int]:
    path = tmp_path / "good.subkbix"
    make_index(64, 50).save(path)
    header_len, meta = layout(path)
    return path, path.read_bytes(), meta, header_len


def write(tmp_path: pathlib.Path, data: bytes, name: str = "bad.subkbix") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_truncated_files(tmp_path, saved):
    _, raw, meta, header_len = saved
    codes, ids = meta["sections"]["codes"], meta["sections"]["ids"]
    cuts = [3, 8, 12, 16, 23, 24, 24 + header_len // 2, 24 + header_len,
            codes["offset"], codes["offset"] + 17, ids["offset"], ids["offset"] + 8,
            len(raw) - 1]
    for cut in cuts:
        path = write(tmp_path, raw[:cut])
        for mmap in (True, False):
            with pytest.raises(IndexFormatError, match="truncated file") as info:
                BinaryIndex.load(path, mmap=mmap)
            assert f"found {cut}" in str(info.value), (cut, str(info.value))
            if cut >= 24 + header_len:
                assert f"expected {len(raw)} bytes" in str(info.value)
    with pytest.raises(IndexFormatError, match="empty"):
        BinaryIndex.load(write(tmp_path, b""))


def test_trailing_bytes(tmp_path, saved):
    _, raw, _, _ = saved
    with pytest.raises(IndexFormatError, match=f"trailing data: expected {len(raw)} bytes"):
        BinaryIndex.load(write(tmp_path, raw + b"\0"))


def flipped(raw: bytes, position: int) -> bytes:
    data = bytearray(raw)
    data[position] ^= 0x10
    return bytes(data)


def test_flipped_bytes(tmp_path, saved):
    _, raw, meta, header_len = saved
    codes, ids = meta["sections"]["codes"], meta["sections"]["ids"]
    assert codes["offset"] == 24 + header_len and ids["offset"] > codes["offset"] + codes["nbytes"]
    cases = [
        (2, "not a subkern BinaryIndex file"),  # magic
        (13, "header length|truncated"),  # header length
        (17, "header checksum mismatch"),  # the header checksum itself
        (21, "header checksum mismatch"),  # reserved word
        (24 + 10, "header checksum mismatch"),  # JSON header
        (24 + header_len - 1, "header checksum mismatch"),  # the header's space padding
        (ids["offset"] - 1, "non-zero padding"),  # alignment padding between the sections
        (codes["offset"], "checksum mismatch in the 'codes' section"),
        (codes["offset"] + codes["nbytes"] - 1, "checksum mismatch in the 'codes' section"),
        (ids["offset"] + 5, "checksum mismatch in the 'ids' section"),
        (len(raw) - 1, "checksum mismatch in the 'ids' section"),
    ]
    for position, pattern in cases:
        path = write(tmp_path, flipped(raw, position))
        for mmap in (True, False):
            with pytest.raises(IndexFormatError, match=pattern):
                BinaryIndex.load(path, mmap=mmap)


def test_verify_false_skips_only_section_checksums(tmp_path, saved):
    original, raw, meta, header_len = saved
    codes = meta["sections"]["codes"]
    path = write(tmp_path, flipped(raw, codes["offset"]))
    loaded = BinaryIndex.load(path, verify=False)  # trusted file, no full read
    good = BinaryIndex.load(original)
    assert loaded.codes[0, 0] == good.codes[0, 0] ^ 0x10
    assert torch.equal(loaded.codes[1:], good.codes[1:])
    with pytest.raises(IndexFormatError, match="header checksum"):
        BinaryIndex.load(write(tmp_path, flipped(raw, 30)), verify=False)


def test_foreign_files(tmp_path):
    rng = np.random.default_rng(0)
    npy = tmp_path / "codes.npy"
    np.save(npy, rng.integers(0, 256, (20, 8), dtype=np.uint8))
    foreign = [
        npy,
        write(tmp_path, rng.bytes(5000), "random.bin"),
        write(tmp_path, b"SUBKBIX!" + bytes(100), "near-miss.bin"),
        write(tmp_path, b'{"format": "subkern.BinaryIndex"}', "json.txt"),
    ]
    for path in foreign:
        with pytest.raises(IndexFormatError, match="not a subkern BinaryIndex file"):
            BinaryIndex.load(path)
    with pytest.raises(FileNotFoundError):
        BinaryIndex.load(tmp_path / "missing.subkbix")
    assert issubclass(IndexFormatError, ValueError)


def test_newer_and_invalid_versions(tmp_path, saved):
    _, raw, _, _ = saved
    newer = raw[:8] + struct.pack("<I", 2) + raw[12:]
    with pytest.raises(IndexFormatError, match="format version 2.*reads \\(format version 1\\)"):
        BinaryIndex.load(write(tmp_path, newer))
    zero = raw[:8] + struct.pack("<I", 0) + raw[12:]
    with pytest.raises(IndexFormatError, match="invalid format version 0"):
        BinaryIndex.load(write(tmp_path, zero))


def test_malformed_header_with_valid_checksum(tmp_path, saved):
    """A header whose checksum matches but whose contents are inconsistent is refused too."""
    _, raw, meta, header_len = saved
    meta["sections"]["ids"]["offset"] += 1
    text = json.dumps(meta).encode().ljust(header_len)
    assert len(text) == header_len
    preamble = raw[:24]
    crc = storage._header_crc(preamble, text)
    patched = (preamble[:16] + struct.pack("<I", crc) + preamble[20:24] + text
               + raw[24 + header_len:])
    with pytest.raises(IndexFormatError, match="inconsistent 'ids' section"):
        BinaryIndex.load(write(tmp_path, patched))


# --------------------------------------------------------------------------------------------
# Atomic save
# --------------------------------------------------------------------------------------------

def _only_file(tmp_path: pathlib.Path, name: str) -> None:
    assert sorted(os.listdir(tmp_path)) == [name], os.listdir(tmp_path)


@pytest.mark.parametrize("failure", ["write", "fsync", "replace"])
def test_failed_save_leaves_previous_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "index.subkbix"
    old = make_index(64, 30)
    old.save(path)
    before = path.read_bytes()
    new = make_index(64, 300)

    if failure == "write":
        original = storage._write_all
        codes_bytes = new.codes.numel()

        def failing_write(fh, data):
            view = memoryview(data).cast("B")
            if view.nbytes == codes_bytes:  # the codes section: write half, then the disk "fails"
                original(fh, view[: view.nbytes // 2])
                raise OSError(28, "No space left on device")
            original(fh, data)

        monkeypatch.setattr(storage, "_write_all", failing_write)
    elif failure == "fsync":
        def failing_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(storage.os, "fsync", failing_fsync)
    else:
        def failing_replace(src, dst):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(storage.os, "replace", failing_replace)

    with pytest.raises(OSError):
        new.save(path)
    assert path.read_bytes() == before
    _only_file(tmp_path, "index.subkbix")
    monkeypatch.undo()
    assert_same_index(BinaryIndex.load(path), old)
    new.save(path)  # and a later save succeeds
    assert_same_index(BinaryIndex.load(path), new)
    _only_file(tmp_path, "index.subkbix")


def test_interrupted_first_save_creates_nothing(tmp_path, monkeypatch):
    def interrupted(fh, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_write_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_index().save(tmp_path / "new.subkbix")
    assert os.listdir(tmp_path) == []


def test_save_errors(tmp_path):
    index = make_index()
    with pytest.raises(IsADirectoryError):
        index.save(tmp_path)
    with pytest.raises(FileNotFoundError):
        index.save(tmp_path / "no-such-dir" / "i.subkbix")
    assert os.listdir(tmp_path) == []


def test_inconsistent_ids_and_counter(tmp_path):
    """Files from a faulty writer: ids at or above next_id (default ids would collide)."""
    codes = random_codes(3, 2)
    path = tmp_path / "odd.subkbix"
    storage.write_index_file(path, 16, 4, codes, torch.tensor([0, 1, 5]))
    with pytest.raises(IndexFormatError, match=r"ids outside \[0, next_id=4\)"):
        BinaryIndex.load(path)
    storage.write_index_file(path, 16, 2, codes, torch.tensor([0, 1, 5]))
    with pytest.raises(IndexFormatError, match="malformed header"):
        BinaryIndex.load(path)
    storage.write_index_file(path, 16, 6, codes, torch.tensor([0, 1, 5]))
    assert BinaryIndex.load(path).ids.tolist() == [0, 1, 5]
