"""Checks of arguments at the package boundary: AnnData type, estimator parameters, device names.

Data checks (counts, names, genes) live in :mod:`schashformer.preprocess` and the file
checks in :mod:`schashformer.io`; every rejected input is listed in docs/VALIDATION.md.
"""

from __future__ import annotations

import os
import types
import typing
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from .errors import InputError, ParameterError
from .train import TrainConfig, resolve_device


def is_int(value) -> bool:
    """An integer that is not a boolean."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_adata(adata) -> None:
    """Refuse anything that is not an AnnData before its attributes are touched."""
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}")


def annotation_types(hint) -> tuple:
    """The types an annotation allows: ``int | None`` -> (int, NoneType)."""
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def type_names(hint) -> list[str]:
    """The names of the types an annotation allows: ``int | None`` -> ["int", "None"]."""
    return ["None" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in annotation_types(hint)]


def _has_type(value, kind) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, (bool, np.bool_))
    if kind is int:
        return is_int(value)
    if kind is float:  # an integer is a number too
        return is_int(value) or isinstance(value, (float, np.floating))
    if kind is Path:
        return isinstance(value, (str, os.PathLike))
    return isinstance(value, kind) if isinstance(kind, type) else True


def check_types(params: dict, hints: dict) -> None:
    """Each value of ``params`` has one of the types of its annotation in ``hints`` (``typing.get_type_hints``)."""
    for name, value in params.items():
        hint = hints[name]
        if not any(_has_type(value, kind) for kind in annotation_types(hint)):
            raise ParameterError(f"parameter {name} must be {' or '.join(type_names(hint))}, got {value!r}")


# training parameters that count things: at least 1, or (the step, component and attention-key counts) at least 0
_AT_LEAST_1 = ("hash_heads", "hidden", "hash_latent", "stage1_batch", "chunk_size", "chunks_per_batch", "d_model",
               "attn_heads", "layers", "latent", "update_interval", "kmeans_n_init", "infer_batch", "train_cells",
               "graph_chunk")
_AT_LEAST_0 = ("stage1_steps", "stage2_pretrain_steps", "stage2_cluster_steps", "input_pcs", "token_pcs",
               "attention_neighbours", "pool_mates")
# integer fields where None means "no limit" (every gene, no step cap)
_NONE_OR_AT_LEAST = {"zinb_genes": 1, "stage1_steps_subsample": 0}


def check_params(params: dict, hints: dict) -> None:
    """Check the estimator parameters in ``params`` (any subset of them; ``hints``: their annotations).

    The one check of :class:`schashformer.SCHashFormer`'s parameters (its ``check_params``, run first
    by ``fit`` and by the command line before any data is read): the ranges of ``n_clusters``,
    ``seed``, ``n_top_genes`` and ``checkpoint_every``, then every value's type against its
    annotation, then the ranges of the :class:`~schashformer.train.TrainConfig` fields. Checks that
    need the data (K at most the number of cells) stay in ``fit``; ``resolution`` is checked by
    :func:`schashformer.n_clusters.check_resolution`.
    """
    k = params.get("n_clusters")
    if k is not None and (not is_int(k) or k < 2):
        raise ParameterError(f"n_clusters must be an integer >= 2, got {k!r} (or None to estimate it)")
    for name, low in (("seed", 0), ("n_top_genes", 1), ("checkpoint_every", 0)):
        if name in params and (not is_int(params[name]) or params[name] < low):
            raise ParameterError(f"{name} must be an integer >= {low}, got {params[name]!r}")
    check_types(params, hints)
    if "seed" in params:
        check_seed(params["seed"])
    bits = params.get("hash_bits")
    if bits is not None and not 1 <= bits <= 62:
        raise ParameterError(f"hash_bits must be in [1, 62] (or None for automatic), got {bits}")
    for names, low in ((_AT_LEAST_1, 1), (_AT_LEAST_0, 0)):
        for name in names:
            if name in params and params[name] < low:
                raise ParameterError(f"{name} must be >= {low}, got {params[name]}")
    for name, low in _NONE_OR_AT_LEAST.items():
        value = params.get(name)
        if value is not None and value < low:
            raise ParameterError(f"{name} must be None or an integer >= {low}, got {value!r}")
    if "d_model" in params and "attn_heads" in params and params["d_model"] % params["attn_heads"]:
        raise ParameterError(f"d_model={params['d_model']} must be divisible by attn_heads={params['attn_heads']}")
    if "init" in params and params["init"] not in ("kmeans", "leiden", "auto"):
        raise ParameterError(f"init must be 'kmeans', 'leiden' or 'auto', got {params['init']!r}")
    for name in ("mask_rate", "dropout"):
        if name in params and not 0 <= params[name] < 1:
            raise ParameterError("mask_rate and dropout must be in [0, 1)")
    if params.get("w_zinb", 0) < 0:
        raise ParameterError(f"w_zinb must be >= 0, got {params['w_zinb']}")
    for name in ("tau", "lr"):
        if name in params and params[name] <= 0:
            raise ParameterError(f"tau and lr must be > 0, got tau={params.get('tau')}, lr={params.get('lr')}")
    check_values(params)


# float fields that must be >= 0 (weights, noise, rates); lr and tau must be > 0 (TrainConfig.validate)
NON_NEGATIVE = ("input_noise", "query_noise", "target_balance", "w_zinb", "w_contrastive", "bucket_weight",
                "w_balance", "w_quantisation", "w_consistency", "w_neighbour", "w_kl", "w_zinb_stage2", "weight_decay", "grad_clip", "tol")
SEED_MAX = 2**32 - 1  # numpy's legacy generator and scikit-learn's random_state accept [0, 2**32 - 1]


def check_values(params: dict) -> None:
    """Float hyper-parameters must be finite (NaN/inf would only fail after training), weights and noise >= 0."""
    for name, value in params.items():
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            raise ParameterError(f"parameter {name} must be a finite number, got {value!r}")
        if is_int(value) and abs(int(value)) > 2**62:
            raise ParameterError(f"parameter {name} is out of range, got {value!r}")
    for name in NON_NEGATIVE:
        value = params.get(name)
        if value is not None and value < 0:
            raise ParameterError(f"parameter {name} must be >= 0, got {value!r}")
    if params.get("graph_neighbors") is not None and params["graph_neighbors"] < 1:  # a graph without edges
        raise ParameterError(f"parameter graph_neighbors must be >= 1, got {params['graph_neighbors']!r}")


def check_seed(seed) -> None:
    """``seed`` an integer in [0, 2**32 - 1]: larger seeds overflow numpy / scikit-learn after training."""
    if not is_int(seed) or seed < 0:
        raise ParameterError(f"seed must be an integer >= 0, got {seed!r}")
    if seed > SEED_MAX:
        raise ParameterError(f"seed must be an integer <= {SEED_MAX} (2**32 - 1, the range numpy and scikit-learn "
                             f"accept), got {seed}")


def resolve(device) -> torch.device:
    """:func:`resolve_device` with unknown names and missing GPUs reported as ParameterError."""
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise ParameterError(f"device={device!r} is not a device name; use 'auto', 'cpu' or 'cuda' "
                             f"({one_line(exc)})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParameterError(f"device={device!r} is not supported; use 'auto', 'cpu' or 'cuda'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"device={device!r} was requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    return dev


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a library exception, for a one-line error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def warn_narrow(config: TrainConfig, n_genes: int, n_cells: int) -> None:
    """Warn (before training) when there are fewer genes or cells than principal components asked for.

    ``token_pcs`` / ``input_pcs`` are capped at min(genes, cells), so the stage-2 tokens, and with
    ``token_residual`` the embedding, come out narrower than hash_latent + token_pcs.
    """

    limit = min(n_genes, n_cells)
    for name in ("token_pcs", "input_pcs"):
        asked = getattr(config, name)
        if asked > limit:
            what = f"the embedding has {config.hash_latent + limit} columns, not {config.hash_latent + asked}" \
                if name == "token_pcs" and config.token_residual else "the projection is narrower"
            warnings.warn(f"{name}={asked} exceeds the {n_genes} genes x {n_cells} cells kept; only {limit} principal "
                          f"components are used, so {what}", UserWarning, stacklevel=3)
