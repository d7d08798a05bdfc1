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
import pandas as pd
import scipy.sparse as sp


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
            valid = ~np.asarray(pd.isna(pd.Series(labels)))
            _, lab = np.unique(np.asarray(labels)[valid].astype(str), return_inverse=True)
            pair = np.zeros((sizes.size, lab.max() + 1))
            np.add.at(pair, (inverse[valid], lab), 1)
            same = (pair * (pair - 1)).sum()
            n_b = pair.sum(1)
            total = (n_b * (n_b - 1)).sum()
            row["purity"] = float(same / total) if total else float("nan")
        stats.append(row)
    return stats


def hash_orders(codes: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
    """Per hash head, the cells sorted by bucket id, ties broken by the first principal axis of ``z``.

    ``codes`` (cells, heads) bucket ids (-1: a cell that was not hashed, sorted first), ``z`` (cells,
    latent) the embedding. Used to rebuild the sort-and-chunk neighbourhoods after a fit, when the
    stage-1 tie-break key is no longer at hand: inside a bucket, cells close in ``z`` stay adjacent.
    """
    zc = np.asarray(z, dtype=np.float64)
    zc = zc - zc.mean(0)
    if zc.shape[1] and np.any(zc):
        _, _, vt = np.linalg.svd(zc[: min(len(zc), 20000)], full_matrices=False)
        key = zc @ vt[0]
    else:
        key = np.zeros(len(zc))
    return [sort_order(np.asarray(codes)[:, k], key) for k in range(codes.shape[1])]


def hash_knn(z: np.ndarray, orders: list[np.ndarray], chunk_size: int, n_neighbors: int = 15,
             block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_neighbors`` nearest cells of every cell among its hash-neighbourhood candidates.

    Candidates of a cell are the cells of its chunk and the two adjacent chunks in every
    head's sorted order (3C per head); the ``n_neighbors`` nearest candidates in ``z`` (Euclidean)
    are kept. Cost O(cells x heads x C), memory O(block x heads x C): no global kNN search.

    Returns
    -------
    indices : (cells, n_neighbors) int64, nearest first, -1 where a cell has fewer candidates.
    distances : (cells, n_neighbors) float32 Euclidean distances, inf where ``indices`` is -1.
    """
    n = z.shape[0]
    candidates = []
    for order in orders:
        chunks = chunk_index(order, chunk_size)
        ids = np.arange(len(chunks))
        nxt = np.where(ids[:, None] < len(chunks) - 1, chunks[np.minimum(ids + 1, len(chunks) - 1)], -1)
        window = np.concatenate([with_lookback(chunks, ids), nxt], axis=1)  # (chunks, 3C)
        rows = np.full((n, window.shape[1]), -1, dtype=np.int64)
        valid = chunks >= 0
        rows[chunks[valid]] = np.repeat(window, chunk_size, axis=0)[valid.ravel()]
        candidates.append(rows)
    cand = np.sort(np.concatenate(candidates, axis=1), axis=1)
    cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # drop duplicates found by several heads
    cand[cand == np.arange(n)[:, None]] = -1  # and the cell itself
    k = min(n_neighbors, cand.shape[1])
    nbrs = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for s in range(0, n, block):
        c = cand[s:s + block]
        d = ((z[np.maximum(c, 0)] - z[s:s + block, None, :]) ** 2).sum(-1)
        d[c < 0] = np.inf
        nearest = np.argpartition(d, k - 1, axis=1)[:, :k]
        dn = np.take_along_axis(d, nearest, axis=1)
        rank = np.argsort(dn, axis=1, kind="stable")  # nearest first
        nearest, dn = np.take_along_axis(nearest, rank, axis=1), np.take_along_axis(dn, rank, axis=1)
        picked = np.take_along_axis(c, nearest, axis=1)
        nbrs[s:s + block] = np.where(np.isfinite(dn), picked, -1)
        dist[s:s + block] = np.sqrt(dn)
    return nbrs, dist


def hash_knn_graph(z: np.ndarray, orders: list[np.ndarray], chunk_size: int, n_neighbors: int = 15,
                   block: int = 65536):
    """Sparse kNN graph from hash neighbourhoods only: (cells, cells) CSR, symmetric, 0/1 weights.

    The neighbours are those of :func:`hash_knn`; no global kNN search.
    """

    nbrs, _ = hash_knn(z, orders, chunk_size, n_neighbors, block)
    return neighbour_graph(nbrs)


def neighbour_graph(nbrs: np.ndarray):
    """Neighbour indices (cells, k), -1 for none -> (cells, cells) CSR, symmetric (union), 0/1 weights."""
    n, k = nbrs.shape
    rows = np.repeat(np.arange(n), k)
    keep = nbrs.ravel() >= 0
    graph = sp.csr_matrix((np.ones(keep.sum(), np.float32), (rows[keep], nbrs.ravel()[keep])), shape=(n, n))
    return ((graph + graph.T) > 0).astype(np.float32).tocsr()
