"""Hash codes -> sorted order -> fixed-size chunks (the Reformer sort-and-chunk layout).

Cells are sorted by their bucket id in one hash head (ties broken by a continuous key
so that a bucket's cells are ordered by their position inside it). Cutting the sorted
order into chunks of C cells splits oversized buckets, and a small or singleton bucket
shares its chunk with the buckets of the nearest codes in sort order (same leading
bits), so every cell gets C - 1 neighbours plus the previous chunk as context.
Everything is numpy vector code: no Python loop over buckets.
"""

from __future__ import annotations

import numpy as np


def sort_order(codes: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Permutation sorting cells by ``codes`` (cells,), then by ``key`` (cells,)."""
    return np.lexsort((key, codes))


def chunk_index(order: np.ndarray, chunk_size: int, shift: int = 0) -> np.ndarray:
    """Cut ``order`` (cyclically shifted by ``shift``) into chunks: (n_chunks, C), padded with -1."""
    if shift:
        order = np.roll(order, -shift)
    n_chunks = -(-len(order) // chunk_size)
    out = np.full(n_chunks * chunk_size, -1, dtype=np.int64)
    out[: len(order)] = order
    return out.reshape(n_chunks, chunk_size)


def with_lookback(chunks: np.ndarray, chunk_ids: np.ndarray) -> np.ndarray:
    """Token cells of ``chunk_ids``: previous chunk then the chunk itself, (len(ids), 2C), -1 = none."""
    prev = np.where(chunk_ids[:, None] > 0, chunks[np.maximum(chunk_ids - 1, 0)], -1)
    return np.concatenate([prev, chunks[chunk_ids]], axis=1)


def bucket_stats(codes: np.ndarray, labels: np.ndarray | None = None) -> list[dict]:
    """Per hash head: non-empty buckets, size percentiles, singleton fraction, label purity.

    Purity is the fraction of same-label pairs among all pairs of cells sharing a bucket.
    """
    stats = []
    for k in range(codes.shape[1]):
        _, inverse, sizes = np.unique(codes[:, k], return_inverse=True, return_counts=True)
        row = {
            "head": k,
            "n_buckets": int(sizes.size),
            "size_median": float(np.median(sizes)),
            "size_p90": float(np.percentile(sizes, 90)),
            "size_p99": float(np.percentile(sizes, 99)),
            "size_max": int(sizes.max()),
            "singleton_fraction": float((sizes == 1).sum() / len(codes)),
        }
        if labels is not None:
            valid = ~pd_isna(labels)
            _, lab = np.unique(np.asarray(labels)[valid].astype(str), return_inverse=True)
            pair = np.zeros((sizes.size, lab.max() + 1))
            np.add.at(pair, (inverse[valid], lab), 1)
            same = (pair * (pair - 1)).sum()
            n_b = pair.sum(1)
            total = (n_b * (n_b - 1)).sum()
            row["purity"] = float(same / total) if total else float("nan")
        stats.append(row)
    return stats


def pd_isna(values) -> np.ndarray:
    import pandas as pd

    return np.asarray(pd.isna(pd.Series(values)))
