"""Minibatches over the sparse prepared matrix: densify one batch at a time."""

from __future__ import annotations

import numpy as np
import torch

from .preprocess import Prepared


class CellData:
    """Sparse cells x genes data served as dense torch minibatches.

    Parameters
    ----------
    prepared : output of :func:`schashformer.preprocess.prepare`.
    batch_index : (cells,) integer batch category per kept cell, or None.
    n_batches : number of batch categories (one-hot width).
    device : torch device the tensors are moved to.
    """

    def __init__(self, prepared: Prepared, batch_index: np.ndarray | None = None, n_batches: int = 0,
                 device: torch.device | str = "cpu"):
        self.prepared = prepared
        self.batch_index = None if batch_index is None else np.asarray(batch_index, dtype=np.int64)
        self.n_batches = n_batches if batch_index is not None else 0
        self.device = torch.device(device)

    @property
    def n_cells(self) -> int:
        return self.prepared.n_cells

    @property
    def n_genes(self) -> int:
        return self.prepared.n_genes

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        """Standardised expression (len(rows), genes)."""
        return torch.from_numpy(self.prepared.standardised(rows)).to(self.device)

    def targets(self, rows: np.ndarray):
        """(counts (rows, genes), size factors (rows,), batch one-hot (rows, n_batches) or None)."""
        counts = torch.from_numpy(self.prepared.counts[rows].toarray()).to(self.device)
        sf = torch.from_numpy(self.prepared.size_factors[rows]).to(self.device)
        onehot = None
        if self.n_batches:
            b = torch.from_numpy(self.batch_index[rows]).to(self.device)
            onehot = torch.nn.functional.one_hot(b, self.n_batches).float()
        return counts, sf, onehot

    def minibatches(self, batch_size: int, rng: np.random.Generator | None = None):
        """Row indices in batches of ``batch_size``; shuffled when ``rng`` is given."""
        order = rng.permutation(self.n_cells) if rng is not None else np.arange(self.n_cells)
        for start in range(0, self.n_cells, batch_size):
            yield order[start:start + batch_size]
