"""The paper's entry point: ``python main.py --dataset NAME`` runs configs/NAME.yml.

A config gives the data path (relative to this folder), the labels key, the number of
clusters, optional batch key and, under ``params``, any other parameter of
``schashformer.SCHashFormer`` (``resolution``, ``n_top_genes``, ``seed``, ``device``, every
TrainConfig field, ...; not the checkpoint ones, which the output directory sets). ``--seed``
overrides the config's seed.
Results go to ``runs/NAME/`` (refused if present unless --overwrite); a killed run continues
with --resume from its checkpoint in ``runs/NAME/.checkpoint``.
"""

import argparse
import sys
import time
from pathlib import Path

import yaml

from schashformer import SCHashFormer, io
from schashformer.app import print_report, run_cluster
from schashformer.errors import InputError, ParameterError, SCHashFormerError

ROOT = Path(__file__).resolve().parent


def load_config(name: str) -> dict:
    path = ROOT / "configs" / f"{name}.yml"
    if not path.exists():
        known = sorted(p.stem for p in (ROOT / "configs").glob("*.yml"))
        raise InputError(f"no config {path}; known data sets: {', '.join(known)}")
    return read_config(path)


def read_config(path: Path) -> dict:
    """A config file, its ``params`` checked as SCHashFormer parameters (names, types, ranges)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    missing = {"data_path", "n_clusters"} - set(cfg)
    if missing:
        raise InputError(f"{path}: missing field(s) {sorted(missing)}")
    params = cfg.setdefault("params", {}) or {}
    if not isinstance(params, dict):
        raise InputError(f"{path}: params must be a mapping of parameter names to values, got {params!r}")
    cfg["params"] = params
    if "n_clusters" in params:
        raise ParameterError(f"{path}: set n_clusters at the top level, not under params")
    fixed = sorted({"checkpoint_dir", "keep_checkpoint"} & set(params))
    if fixed:
        raise ParameterError(f"{path}: {fixed} are set by the output directory (checkpoints go to OUT/.checkpoint)")
    try:
        SCHashFormer.from_params({**params, "n_clusters": cfg["n_clusters"] or None}).check_params()
    except ParameterError as exc:
        raise ParameterError(f"{path}: {exc}") from None
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="name of a file in configs/ (without .yml)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, else 0)")
    parser.add_argument("--out", default=None, help="output directory (default runs/NAME)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue the killed run checkpointed in OUT/.checkpoint")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.dataset)
        data = Path(cfg["data_path"])
        data = data if data.is_absolute() else ROOT / data
        if not data.exists():
            raise InputError(f"data set {args.dataset!r} not found at {data}. It is published at: {cfg.get('source', '?')}. "
                             f"Download it and put it at {data} (or edit data_path in configs/{args.dataset}.yml)")
        if not cfg["n_clusters"]:
            raise InputError(f"configs/{args.dataset}.yml: set n_clusters to the number of cell types")
        start = time.perf_counter()
        adata = io.read(data, format=cfg.get("format"))
        out = Path(args.out or ROOT / "runs" / args.dataset)
        params = {**cfg["params"], "n_clusters": int(cfg["n_clusters"]),
                  **({"progress": False} if args.quiet else {}), **({} if args.seed is None else {"seed": args.seed})}
        report = run_cluster(adata, out=out, params=params, labels_key=cfg.get("labels_key"),
                             batch_key=cfg.get("batch_key"), overwrite=args.overwrite, input_name=str(data),
                             source={"path": data, "format": cfg.get("format")}, read_seconds=time.perf_counter() - start,
                             resume=args.resume)
        print_report(report, out)
        return 0
    except SCHashFormerError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
