"""Count simulator fitted to a real labeled data set, for atlas-scale benchmarks.

:func:`fit_reference` estimates, from real raw counts with cell-type labels:

- the type frequencies and, per type, a log-normal library size (counts over the genes);
- per type, the mean expression proportion of every gene (type mean counts / type mean library);
- per gene, a negative-binomial inverse dispersion theta (method of moments on the residuals
  of each cell around its type's expected count, pooled over types);
- a zero inflation: the zeros the NB does not explain, pi = (observed zero fraction - NB zero
  fraction) / (1 - NB zero fraction) per (type, gene), fitted as a logistic curve of the log mean
  count (pi = sigmoid(a + b log mean)), which is how dropout varies in UMI data;
- type mixing: real cells lie on continua between types (activation states, transitional cells,
  doublets), so each reference cell's profile is fitted as (1 - w) own type + w another type by
  maximum multinomial likelihood over a grid of w and every other type; the empirical
  distribution of w and of the partner type per type are kept and resampled;
- within-type expression programmes: the top principal axes of the cells' log-scale residuals
  around their type mean, with their per-cell score variance. Real cells of one type are not
  independent draws per gene: they vary along shared programmes (cell cycle, activation, ...),
  and that correlated variation is what makes neighbouring types hard to separate.

:func:`simulate` then draws any number of cells: type, library size, programme scores, means,
gamma-Poisson (NB) counts, and dropout of the non-zero counts. Cells are generated in chunks,
each from its own child seed, so the first N cells of a larger simulation equal a simulation of
N cells with the same seed (N a multiple of the chunk size; any prefix is a valid sample), and an ``.h5ad`` is written chunk by chunk (anndata's on-disk sparse
append) without ever holding a dense cells x genes matrix or the whole sparse one.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import sparse_dataset, write_elem
from scipy.optimize import least_squares
from tqdm.auto import tqdm

from .. import io
from ..errors import InputError, OutputExistsError, ParameterError

log = logging.getLogger(__name__)

#: Reference data sets :func:`simulate` can be fitted to by name (files of ``../shared/data``;
#: PBMC is also bundled with the package).
REFERENCES = {"PBMC": "10X_PBMC_top2000.h5", "bladder": "mouse_bladder_cell_top2000.h5",
              "worm": "worm_neuron_cell_top2000.h5"}
_CHUNK_CELLS = 8192


@dataclass
class SimulationParams:
    """Everything :func:`simulate` draws from (K types, G genes, R programmes)."""

    type_names: np.ndarray  # (K,) str
    type_freq: np.ndarray  # (K,) sums to 1
    log_lib_mean: np.ndarray  # (K,) mean of log library size
    log_lib_sd: np.ndarray  # (K,) its sd
    proportions: np.ndarray  # (K, G) expected fraction of a cell's counts per gene
    theta: np.ndarray  # (G,) NB inverse dispersion
    dropout: tuple[float, float]  # (a, b): pi(mean) = sigmoid(a + b log mean)
    programmes: np.ndarray  # (R, G) within-type programme loadings on log means
    programme_sd: np.ndarray  # (R,) sd of the per-cell programme scores
    gene_names: np.ndarray  # (G,) str
    mix_partner: np.ndarray | None = None  # (K, K) probability that a type-t cell mixes towards type s
    mix_weights: np.ndarray | None = None  # (M,) empirical mixing weights w (a cell is (1-w) own + w partner)
    reference: str = ""

    @property
    def n_genes(self) -> int:
        return self.proportions.shape[1]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fit_reference(adata: ad.AnnData, labels_key: str = "label", *, n_programmes: int = 10,
                  programme_scale: float = 0.5, name: str = "") -> SimulationParams:
    """Fit simulation parameters to raw counts ``adata.X`` (cells x genes) with labels ``obs[labels_key]``.

    ``n_programmes`` within-type programmes are kept; ``programme_scale`` shrinks their score sd
    (1 = as observed on the log-normalised residuals, which also hold the Poisson noise the NB
    draws again, so the observed spread overstates the programmes).
    """
    if labels_key not in adata.obs:
        raise InputError(f"labels_key {labels_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    labels = pd.Categorical(adata.obs[labels_key].astype(str))
    codes, k = labels.codes, len(labels.categories)
    if (codes < 0).any() or k < 2:
        raise InputError(f"{labels_key!r} needs at least 2 types and no missing values")
    lib = np.asarray(x.sum(1)).ravel()
    keep = lib > 0
    x, codes, lib = x[keep], codes[keep], lib[keep]
    n, g = x.shape
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(k, n))
    size = np.asarray(onehot.sum(1)).ravel()
    type_sum = np.asarray((onehot @ x).todense())  # (K, G)
    lib_sum = onehot @ lib
    # a floor of 0.1 count over the type keeps every mean positive (log-scale programmes need it)
    props = (type_sum + 0.1 / g) / (lib_sum[:, None] + 0.1)
    loglib = np.log(lib)
    ll_mean = (onehot @ loglib) / size
    ll_sd = np.sqrt(np.maximum((onehot @ loglib**2) / size - ll_mean**2, 1e-4))

    # NB dispersion, method of moments pooled over types: sum (x - mu)^2 - mu = sum mu^2 / theta.
    xd = x.toarray()
    mu = lib[:, None] * props[codes]
    excess = ((xd - mu) ** 2 - mu).sum(0)
    theta = np.clip((mu**2).sum(0) / np.maximum(excess, 1e-12), 0.05, 1e3)
    theta[excess <= 0] = 1e3  # no overdispersion: (nearly) Poisson

    # zero inflation: observed zeros beyond the NB's, per (type, gene), as a logistic of log mean
    nb_zero = np.exp(-theta * np.log1p(mu / theta))  # (cells, G)
    obs0 = (onehot @ (xd == 0)) / size[:, None]
    nb0 = (onehot @ nb_zero) / size[:, None]
    tmean = (onehot @ mu) / size[:, None]
    pi = np.clip((obs0 - nb0) / np.maximum(1 - nb0, 1e-6), 0.0, 0.99)
    w = (size[:, None] * (1 - nb0)).ravel()  # where the NB rarely gives zero, excess zeros are well measured
    dropout = _fit_logistic(np.log(tmean.ravel()), pi.ravel(), w)

    # within-type programmes: PCA of log-normalised residuals around each type's mean
    logn = np.log1p(xd / lib[:, None] * 1e4)
    resid = logn - (onehot @ logn / size[:, None])[codes]
    _, s, vt = np.linalg.svd(resid - resid.mean(0), full_matrices=False)
    r = int(min(n_programmes, len(s)))
    prog_sd = programme_scale * s[:r] / np.sqrt(n)
    partner, weights = _fit_mixing(xd, codes, props)
    names = np.asarray(adata.var_names).astype(str)
    return SimulationParams(np.asarray(labels.categories).astype(str), size / n, ll_mean, ll_sd, props, theta,
                            dropout, vt[:r], prog_sd, names, partner, weights, name)


_MIX_GRID = np.linspace(0.0, 0.5, 11)


def _fit_mixing(xd: np.ndarray, codes: np.ndarray, props: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per reference cell, the (partner type, w) maximising sum_g x_g log((1-w) p_own + w p_partner).

    Returns the partner frequencies per own type (K, K) and the cells' fitted w (cells,).
    """
    k, g = props.shape
    # log mixture profiles for every (own, partner, w): (G, K * K * W), one matrix product scores all cells
    mix = (1 - _MIX_GRID)[None, None, :, None] * props[:, None, None, :] + _MIX_GRID[None, None, :, None] * props[None, :, None, :]
    loglik = (xd @ np.log(mix).reshape(-1, g).T).reshape(len(xd), k, k, len(_MIX_GRID))
    own = loglik[np.arange(len(xd)), codes]  # (cells, K partners, W)
    own[np.arange(len(xd)), codes] = -np.inf  # a cell does not mix with its own type
    best = own.reshape(len(xd), -1).argmax(1)
    part, widx = np.unravel_index(best, (k, len(_MIX_GRID)))
    w = _MIX_GRID[widx]
    partner = np.zeros((k, k))
    np.add.at(partner, (codes, part), 1.0)
    np.fill_diagonal(partner, 0.0)
    partner /= np.maximum(partner.sum(1, keepdims=True), 1.0)
    empty = partner.sum(1) == 0
    partner[empty] = (1 - np.eye(k))[empty] / (k - 1)
    return partner, w


def _fit_logistic(logmean: np.ndarray, pi: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """Weighted least squares fit of pi = sigmoid(a + b * logmean); (a, b)."""
    ok = np.isfinite(logmean) & (weight > 0)
    lm, p, sw = logmean[ok], pi[ok], np.sqrt(weight[ok] / weight[ok].sum())
    res = least_squares(lambda ab: sw * (_sigmoid(ab[0] + ab[1] * lm) - p), x0=np.array([-3.0, 0.0]))
    return float(res.x[0]), float(res.x[1])


def unequal_types(n_types: int = 10, n_genes: int = 2000, *, de_fraction: float = 0.1, de_log_fold: float = 0.6,
                  size_ratio: float = 50.0, depth: float = 1500.0, depth_sd: float = 0.4, theta: float = 3.0,
                  seed: int = 0) -> SimulationParams:
    """Synthetic, Splatter-style parameters: ``n_types`` types of very unequal size with modest differences.

    Nothing is fitted to real data (no one tuned on these): gene base proportions are gamma(0.6)
    draws; each type changes a random ``de_fraction`` of the genes by a log-normal fold of
    log-sd ``de_log_fold`` (up or down at random: modest, ~1.8x typical); type frequencies fall
    geometrically so the largest type is ``size_ratio`` times the smallest; library sizes are
    log-normal around ``depth`` counts (shallow); counts are NB with inverse dispersion ``theta``
    (gene-specific around it); no zero inflation, programmes or mixing.
    """
    if n_types < 2 or n_genes < 10 or not 0 < de_fraction <= 1 or size_ratio < 1 or depth <= 0 or theta <= 0:
        raise ParameterError("unequal_types needs n_types >= 2, n_genes >= 10, 0 < de_fraction <= 1, size_ratio >= 1, "
                             f"depth > 0 and theta > 0; got {n_types}, {n_genes}, {de_fraction}, {size_ratio}, "
                             f"{depth}, {theta}")
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, n_genes) + 1e-3
    log_props = np.tile(np.log(base), (n_types, 1))
    n_de = max(1, round(de_fraction * n_genes))
    for t in range(n_types):
        genes = rng.choice(n_genes, n_de, replace=False)
        log_props[t, genes] += rng.choice([-1.0, 1.0], n_de) * np.abs(rng.normal(0.0, de_log_fold, n_de) + de_log_fold)
    props = np.exp(log_props)
    props /= props.sum(1, keepdims=True)
    freq = np.exp(-np.arange(n_types) * np.log(size_ratio) / (n_types - 1))
    return SimulationParams(
        type_names=np.array([f"type{t}" for t in range(n_types)]), type_freq=freq / freq.sum(),
        log_lib_mean=np.full(n_types, np.log(depth)), log_lib_sd=np.full(n_types, depth_sd), proportions=props,
        theta=theta * np.exp(rng.normal(0.0, 0.3, n_genes)), dropout=(-30.0, 0.0),
        programmes=np.zeros((0, n_genes)), programme_sd=np.zeros(0),
        gene_names=np.array([f"gene{g}" for g in range(n_genes)]), reference="unequal")


#: Synthetic references :func:`simulate` accepts by name (parameters made, not fitted).
SYNTHETIC = {"unequal": unequal_types}


def load_reference(like: str) -> tuple[ad.AnnData, str]:
    """(AnnData with ``obs['label']``, name) of a reference named in :data:`REFERENCES` or a file path."""
    if like in REFERENCES:
        if like == "PBMC":
            return io.read_bundled_pbmc(), like
        path = Path(__file__).resolve().parents[4] / "shared" / "data" / REFERENCES[like]
        if not path.exists():
            raise InputError(f"reference {like!r} needs {REFERENCES[like]} (not found at {path}); "
                             "pass a labeled file path instead")
        return io.read(path), like
    path = Path(like)
    if not path.exists():
        raise InputError(f"like={like!r} is neither a known reference ({', '.join(REFERENCES)}) nor a file")
    return io.read(path), path.stem


def _chunk(params: SimulationParams, n: int, rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray]:
    """n cells: (CSR float32 counts, type index)."""
    k = len(params.type_freq)
    types = rng.choice(k, size=n, p=params.type_freq)
    lib = np.exp(rng.normal(params.log_lib_mean[types], params.log_lib_sd[types])).astype(np.float32)
    mu = params.proportions[types].astype(np.float32)
    if params.mix_weights is not None and len(params.mix_weights):
        cum = params.mix_partner.cumsum(1)[types]
        partner = np.minimum((rng.random(n)[:, None] > cum).sum(1), k - 1)
        w = rng.choice(params.mix_weights, size=n).astype(np.float32)[:, None]
        mu = (1 - w) * mu + w * params.proportions[partner].astype(np.float32)
    if len(params.programme_sd):
        scores = rng.normal(size=(n, len(params.programme_sd))) * params.programme_sd
        mu *= np.exp(scores @ params.programmes).astype(np.float32)
        mu /= mu.sum(1, keepdims=True)  # programmes reshape the profile, the library size stays the draw
    mu *= lib[:, None]
    theta = params.theta.astype(np.float32)
    # gamma-Poisson = NB(mean mu, inverse dispersion theta)
    lam = rng.standard_gamma(np.broadcast_to(theta, mu.shape), dtype=np.float32)
    lam *= mu / theta
    counts = rng.poisson(lam).astype(np.float32)
    x = sp.csr_matrix(counts)
    # dropout acts on the non-zero counts only (a dropped zero is still zero): O(nnz) draws
    a, b = params.dropout
    rows = np.repeat(np.arange(n), np.diff(x.indptr))
    pi = _sigmoid(a + b * np.log(np.maximum(mu[rows, x.indices], 1e-12)))
    x.data[rng.random(x.nnz) < pi] = 0
    x.eliminate_zeros()
    return x, types


def simulate(n_cells: int, *, like: str | SimulationParams = "PBMC", seed: int = 0, out: str | Path | None = None,
             overwrite: bool = False, chunk_cells: int = _CHUNK_CELLS, labels_key: str = "label",
             progress: bool = False, workers: int | None = 1):
    """Simulate ``n_cells`` cells like a real labeled data set.

    Parameters
    ----------
    n_cells : number of cells (>= 1).
    like : a reference name from :data:`REFERENCES` ('PBMC': 10x PBMC, 8 types; 'bladder': 16 types;
        'worm': 10 types), 'unequal' (:func:`unequal_types`: 10 synthetic types of very unequal size,
        fitted to nothing), a labeled count file (labels in ``obs['label']``), or fitted
        :class:`SimulationParams`.
    seed : random seed; chunk c uses child seed c of ``numpy.random.SeedSequence(seed)``, so the
        whole chunks of two simulations with this seed and ``chunk_cells`` are identical (the first
        N cells of a larger one equal a simulation of N cells when N is a multiple of ``chunk_cells``).
    out : ``.h5ad`` path. None: return the AnnData in memory. Given: write it chunk by chunk
        (CSR float32 counts in ``X``, ``obs['cell_type']`` categorical, gene names) and return the path.
    overwrite : replace an existing ``out``.
    chunk_cells : cells generated per chunk (memory ~ chunk_cells x genes x 16 bytes).
    labels_key : ``obs`` column of the cell types when ``like`` is a file.
    workers : processes drawing chunks at once (None: one per CPU core). The result does not depend
        on it: each chunk has its own seed and chunks are written in order.

    Returns
    -------
    AnnData (cells x genes) or the written path.
    """
    if isinstance(n_cells, bool) or not isinstance(n_cells, (int, np.integer)) or n_cells < 1:
        raise ParameterError(f"n_cells must be an integer >= 1, got {n_cells!r}")
    if chunk_cells < 1:
        raise ParameterError(f"chunk_cells must be >= 1, got {chunk_cells!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ParameterError(f"workers must be None or an integer >= 1, got {workers!r}")
    if isinstance(like, SimulationParams):
        params = like
    elif like in SYNTHETIC:
        params = SYNTHETIC[like](seed=seed)
    else:
        reference, name = load_reference(like)
        params = fit_reference(reference, labels_key, name=name)
    seeds = np.random.SeedSequence(seed).spawn(-(-int(n_cells) // chunk_cells))
    var = pd.DataFrame(index=pd.Index(params.gene_names, name=None))
    cats = list(params.type_names)

    sizes = [min(chunk_cells, n_cells - c * chunk_cells) for c in range(len(seeds))]
    n_workers = min(len(seeds), (os.cpu_count() or 1) if workers is None else workers)

    def chunks():
        if n_workers <= 1:
            for n, ss in zip(sizes, seeds):
                yield _chunk(params, n, np.random.default_rng(ss))
            return
        yield from _parallel_chunks(params, sizes, seeds, n_workers)

    if out is None:
        xs, ts = zip(*chunks())
        adata = ad.AnnData(sp.vstack(xs, format="csr"), var=var)
        adata.obs_names = [f"cell{i}" for i in range(n_cells)]
        adata.obs["cell_type"] = pd.Categorical.from_codes(np.concatenate(ts), categories=cats)
        return adata
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    return _write_chunks(out, chunks(), n_cells, var, cats, params, seed, progress)


def _seeded_chunk(params: SimulationParams, n: int, seed: np.random.SeedSequence):
    return _chunk(params, n, np.random.default_rng(seed))


def _parallel_chunks(params: SimulationParams, sizes: list[int], seeds: list, workers: int):
    """The chunks of :func:`simulate` in order, drawn by ``workers`` processes.

    At most two chunks per worker are in flight, so memory stays a few chunks however many there
    are (``Executor.map`` would submit them all at once and hold every result not yet written).
    """
    with ProcessPoolExecutor(workers) as pool:
        pending = deque()
        for n, ss in zip(sizes, seeds):
            pending.append(pool.submit(_seeded_chunk, params, n, ss))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_chunks(out: Path, chunks, n_cells: int, var: pd.DataFrame, cats: list, params: SimulationParams,
                  seed: int, progress: bool) -> Path:
    """Write an AnnData file from (CSR, types) chunks with anndata's on-disk sparse append; atomic rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".partial")
    types = np.empty(n_cells, dtype=np.int16)
    pos = 0
    with h5py.File(tmp, "w") as f:
        bar = tqdm(total=n_cells, desc="simulate", unit="cells", disable=not progress)
        for x, t in chunks:
            if pos == 0:
                # 64-bit indptr: 10^7 cells x a few hundred non-zeros pass 2^31, and anndata's append
                # refuses to grow a 32-bit one past it
                x.indptr = x.indptr.astype(np.int64)
                write_elem(f, "X", x, dataset_kwargs={"chunks": (1 << 18,)})  # resizable (anndata), 1 MiB chunks
                xs = sparse_dataset(f["X"])
            else:
                xs.append(x)
            types[pos:pos + len(t)] = t
            pos += len(t)
            bar.update(len(t))
        bar.close()
        obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(types, categories=cats)},
                           index=pd.Index([f"cell{i}" for i in range(n_cells)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", {"simulation": {"reference": params.reference, "seed": int(seed),
                                             "n_types": len(cats), "dropout_logistic": np.asarray(params.dropout)}})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
    tmp.replace(out)
    return out
