"""Binary retrieval in a few lines: hash float embeddings to binary codes, index, search, save.

Run: python examples/binary_retrieval.py

Sign random projections (SimHash) turn float vectors into bits whose Hamming distance tracks the
angle between vectors; LLC's learned binary codes plug in the same way (``pack_bits(codes > 0)``).
"""

from __future__ import annotations

import os
import tempfile
import time

import torch

import subkern


def simhash(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """bit_j(x) = [<x, r_j> > 0] for random Gaussian directions r_j, packed 8 bits per byte."""
    return subkern.pack_bits(x @ projection > 0)


def main() -> None:
    torch.manual_seed(0)
    dim, nbits, n_clusters = 64, 256, 50
    centers = torch.randn(n_clusters, dim)
    labels = torch.randint(0, n_clusters, (100_000,))
    database = centers[labels] + 0.9 * torch.randn(len(labels), dim)
    query_labels = torch.randint(0, n_clusters, (200,))
    queries = centers[query_labels] + 0.9 * torch.randn(len(query_labels), dim)

    projection = torch.randn(dim, nbits)
    index = subkern.BinaryIndex(nbits)
    index.add(simhash(database, projection))

    start = time.perf_counter()
    distances, ids = index.search(simhash(queries, projection), k=10)
    elapsed = time.perf_counter() - start
    precision = (labels[ids] == query_labels[:, None]).float().mean().item()
    print(f"searched {index.ntotal} codes of {nbits} bits for {len(queries)} queries in "
          f"{1e3 * elapsed:.1f} ms; precision@10 (same cluster) = {precision:.3f}")
    print("nearest of query 0:", ids[0, :5].tolist(), "at distances", distances[0, :5].tolist())

    # Codes are FAISS's layout (uint8 [n, nbits/8]): they work with faiss.IndexBinaryFlat as is.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "codes.skbi")
        index.save(path)  # atomic, versioned, checksummed
        loaded = subkern.BinaryIndex.load(path)  # memory-mapped, no copy
        assert torch.equal(loaded.search(simhash(queries, projection), k=10)[1], ids)
        print(f"saved and reloaded {loaded.ntotal} codes ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
