"""What the neighbourhood attention sees and does (issue 19, item 3: diagnose first).

For each data set a model is fitted at the defaults (true K, one seed); then, on every hash
head's sorted order cut into the chunks the inference pass uses (C query cells + the previous
chunk as context), it measures with the true labels:

* chance: the fraction of same-label pairs among all pairs of cells;
* window purity: the fraction of same-label cells among a query's keys (its chunk + look-back);
* attention on same label: the attention weight a query puts on same-label keys (mean over
  queries and attention heads); equal to the window purity if attention were uniform;
* update / token: the norm of the attention update z - token relative to the token's norm
  (``token_residual``: z = token + update), median over cells;
* ARI of k-means (K, 10 starts) on the tokens alone and on z, and the model's own ARI.

    python benchmarks/attention_diagnostics.py [--datasets NAME ...] [--seed 0] [--out DIR]

Writes DIR/attention_diagnostics.{md,csv}.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.cluster import KMeans

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (the suite, its loader and the chance purity)

from schashformer import SCHashFormer, buckets, engine  # noqa: E402
from schashformer.data import CellData  # noqa: E402
from schashformer.metrics import clustering_scores  # noqa: E402
from schashformer.nn.local_attention import without_self  # noqa: E402
from schashformer.preprocess import prepare  # noqa: E402

DEFAULT_SETS = ("10X_PBMC_top2000", "mouse_bladder_cell_top2000", "worm_neuron_cell_top2000",
                "baron_mouse_1886x14878")


@torch.no_grad()
def attention_weights(encoder, tokens: torch.Tensor, mask: torch.Tensor, c: int) -> torch.Tensor:
    """Attention weights (chunks, heads, C, 2C) of the first block's queries, as in its forward pass."""
    block = encoder.blocks[0]
    context = encoder.input(tokens)
    if encoder.exclude_self:
        mask = without_self(mask, c)
    return block.attn.weights(block.ln_attn(context[:, -c:]), block.ln_attn(context), mask)[0]


def diagnose(adata, y: np.ndarray, k: int, label_key: str, seed: int) -> dict:
    model = SCHashFormer(k, seed=seed, device="cpu", progress=False).fit(adata, labels_key=label_key)
    prep = prepare(adata, stats=model.stats_)
    keep = prep.cell_mask
    y = y[keep]
    codes, h, hidden = engine.hash_cells(model.indexer_, CellData(prep), model.config.infer_batch)
    tokens, _ = engine.token_features(prep, hidden, model.token_axes_, model.token_scale_)
    c = model.config.chunk_size
    encoder = model.encoder_.eval()
    window_purity, on_same = [], []
    for order in engine.sorted_orders(codes, engine.tie_break_keys(h)):
        chunks = buckets.chunk_index(order, c)
        ids = buckets.with_lookback(chunks, np.arange(len(chunks)))
        mask = ids >= 0
        x = torch.from_numpy(tokens[np.where(mask, ids, 0)])
        weights = attention_weights(encoder, x, torch.from_numpy(mask), c).mean(1).numpy()  # (chunks, C, 2C)
        labels = np.where(mask, y[np.where(mask, ids, 0)], "")
        query_labels = labels[:, -c:]
        same = (labels[:, None, :] == query_labels[:, :, None]) & mask[:, None, :]  # (chunks, C, 2C)
        present = mask[:, -c:]
        window_purity.append((same.sum(2) / mask.sum(1, keepdims=True))[present])
        on_same.append((weights * same).sum(2)[present])
    z = model.embedding_[keep]
    update = np.linalg.norm(z - tokens, axis=1) / np.maximum(np.linalg.norm(tokens, axis=1), 1e-12)
    token_km = KMeans(k, n_init=10, random_state=seed).fit_predict(tokens)
    z_km = KMeans(k, n_init=10, random_state=seed).fit_predict(z)
    return {"cells": int(keep.sum()), "K": k, "chance": quality.chance_purity(y),
            "window purity": float(np.concatenate(window_purity).mean()),
            "attention on same label": float(np.concatenate(on_same).mean()),
            "update / token (median)": float(np.median(update)),
            "ARI k-means tokens": clustering_scores(y, token_km)["ari"],
            "ARI k-means z": clustering_scores(y, z_km)["ari"],
            "ARI model": clustering_scores(y, model.labels_[keep])["ari"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_SETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    rows, start = [], time.perf_counter()
    for path, name, label_key in quality.suite_sets(args.data_dir, args.datasets):
        adata, y, k = quality.load(path, label_key)
        row = {"data set": name, **diagnose(adata, y, k, label_key, args.seed)}
        print(row, flush=True)
        rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "attention_diagnostics.csv", index=False)
    command = "python benchmarks/attention_diagnostics.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = ["# What the neighbourhood attention sees and does", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; seed {args.seed}; "
             f"{(time.perf_counter() - start) / 60:.1f} min. Command: `{command.strip()}`", "",
             "Label fractions are over query cells and the keys of their inference windows (own chunk + "
             "look-back, every hash head's order). Uniform attention would put exactly the window purity "
             "on same-label keys.", "",
             "| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for r in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r) + " |")
    (out / "attention_diagnostics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
