"""Checks of arguments at the package boundary: AnnData type, parameter types, device names.

Data checks (counts, names, genes) live in :mod:`schashformer.preprocess` and the file
checks in :mod:`schashformer.io`; every rejected input is listed in docs/VALIDATION.md.
"""

from __future__ import annotations

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


def check_params(params: dict) -> None:
    """Unknown TrainConfig fields and values of the wrong type are refused before they reach training."""
    fields = TrainConfig.__dataclass_fields__
    unknown = set(params) - set(fields)
    if unknown:
        raise ParameterError(f"unknown parameter(s) {sorted(unknown)}; see schashformer.train.TrainConfig")
    checks = {"int": is_int, "bool": lambda v: isinstance(v, (bool, np.bool_)), "str": lambda v: isinstance(v, str),
              "float": lambda v: is_int(v) or isinstance(v, (float, np.floating))}
    for name, value in params.items():
        kinds = [k.strip() for k in str(fields[name].type).split("|")]
        if value is None and "None" in kinds:
            continue
        known = [checks[k] for k in kinds if k in checks]
        if known and not any(check(value) for check in known):
            raise ParameterError(f"parameter {name} must be {' or '.join(kinds)}, got {value!r}")
    bits = params.get("hash_bits")
    if bits is not None and not 1 <= bits <= 62:
        raise ParameterError(f"hash_bits must be in [1, 62] (or None for automatic), got {bits}")
    check_values(params)


# float fields that must be >= 0 (weights, noise, rates); lr and tau must be > 0 (TrainConfig.validate)
NON_NEGATIVE = ("input_noise", "w_zinb", "w_contrastive", "bucket_weight", "w_balance", "w_quantisation",
                "w_consistency", "w_kl", "w_zinb_stage2", "weight_decay", "grad_clip", "tol")
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
    import warnings

    limit = min(n_genes, n_cells)
    for name in ("token_pcs", "input_pcs"):
        asked = getattr(config, name)
        if asked > limit:
            what = f"the embedding has {config.hash_latent + limit} columns, not {config.hash_latent + asked}" \
                if name == "token_pcs" and config.token_residual else "the projection is narrower"
            warnings.warn(f"{name}={asked} exceeds the {n_genes} genes x {n_cells} cells kept; only {limit} principal "
                          f"components are used, so {what}", UserWarning, stacklevel=3)
