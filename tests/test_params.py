"""One parameter source: SCHashFormer's signature, TrainConfig's defaults, and everything derived from them
(scikit-learn get_params / set_params / clone, save / load, the run record and rerun, the checkpoint
fingerprint, the command line's --param and the main.py configs)."""

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_no_attributes_set_in_init, check_parameters_default_constructible

from schashformer import app
from schashformer import SCHashFormer, cli, record, tl
from schashformer import n_clusters as nc
from schashformer.errors import InputError, ParameterError
from schashformer.model import PARAM_DEFAULTS, PARAM_TYPES, RUN_ONLY, TRAIN_FIELDS
from schashformer.preprocess import DEFAULT_N_TOP_GENES
from schashformer.train import TrainConfig
from tests.conftest import simulate_counts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main as main_py  # noqa: E402  (the paper's entry point, at the repository root)

# the estimator's own parameters, next to the TrainConfig fields
ESTIMATOR_LEVEL = {"n_clusters": None, "resolution": nc.DEFAULT_RESOLUTION, "n_top_genes": DEFAULT_N_TOP_GENES,
                   "seed": 0, "device": "auto", "allow_noncounts": False, "progress": True, "checkpoint_dir": None,
                   "checkpoint_every": 100, "keep_checkpoint": False}
# small networks for the one fit below (the other training parameters get a non-default value each)
TINY = dict(stage1_steps=2, stage2_pretrain_steps=2, stage2_cluster_steps=2, hidden=16, hash_latent=8, d_model=8,
            attn_heads=2, latent=4, stage1_batch=64, chunks_per_batch=4, chunk_size=8, token_pcs=3, input_pcs=4,
            layers=1, kmeans_n_init=2)


def other_value(name: str, default):
    """A valid value different from ``default``."""
    special = {"init": "leiden", "hash_bits": 5, "d_model": 240, "attn_heads": 6, "stage1_steps_subsample": 150, "zinb_genes": 64, "n_clusters": 3, "device": "cpu",
               "checkpoint_dir": "ck"}
    if name in special:
        return special[name]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    return default * 0.5 if default else 0.25


OTHER = {name: other_value(name, default) for name, default in PARAM_DEFAULTS.items()}


def yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- the signature is the source
def test_signature_is_train_config_fields_plus_estimator_parameters():
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert list(PARAM_DEFAULTS) == list(ESTIMATOR_LEVEL) + list(fields) and TRAIN_FIELDS == tuple(fields)
    assert {k: PARAM_DEFAULTS[k] for k in ESTIMATOR_LEVEL} == ESTIMATOR_LEVEL
    for name, default in fields.items():  # TrainConfig's defaults, not copies of them
        assert PARAM_DEFAULTS[name] == default and type(PARAM_DEFAULTS[name]) is type(default), name
    train_types = typing.get_type_hints(TrainConfig)
    assert {k: PARAM_TYPES[k] for k in fields} == train_types
    sig = inspect.signature(SCHashFormer.__init__).parameters
    assert all(p.kind is p.KEYWORD_ONLY for name, p in sig.items() if name not in ("self", "n_clusters"))
    assert PARAM_DEFAULTS["resolution"] is nc.DEFAULT_RESOLUTION
    assert set(RUN_ONLY) <= set(ESTIMATOR_LEVEL)


def test_every_parameter_is_documented():
    doc = SCHashFormer.__doc__
    assert [name for name in PARAM_DEFAULTS if name not in doc] == []


def test_defaults_build_the_default_train_config():
    assert SCHashFormer().config == TrainConfig()


# ----------------------------------------------------------------------------- scikit-learn conventions
def test_init_only_stores_and_sklearn_checks_pass():
    check_no_attributes_set_in_init("SCHashFormer", SCHashFormer())
    check_parameters_default_constructible("SCHashFormer", SCHashFormer())
    path = Path("somewhere")
    model = SCHashFormer(3, checkpoint_dir=path, seed=-1, lr="abc")  # no checks at construction
    assert model.checkpoint_dir is path and model.seed == -1 and model.lr == "abc"
    with pytest.raises(ParameterError, match=r"seed must be an integer >= 0, got -1"):
        model.check_params()


def test_get_params_set_params_clone_round_trip():
    model = SCHashFormer(**OTHER)
    assert model.get_params() == OTHER
    copy = clone(model)
    assert copy is not model and copy.get_params() == OTHER
    fresh = SCHashFormer().set_params(**OTHER)
    assert fresh.get_params() == OTHER
    with pytest.raises(ValueError, match="not_a_param"):
        fresh.set_params(not_a_param=1)


def test_every_training_parameter_reaches_train_config():
    model = SCHashFormer(**OTHER)
    model.check_params()
    assert model.config.to_dict() == {name: OTHER[name] for name in TRAIN_FIELDS}
    model.set_params(lr=0.5)
    assert model.config.lr == 0.5  # built from the parameters on each access
    with pytest.raises(ParameterError, match=r"parameter tau must be float, got 'x'"):
        SCHashFormer(tau="x").config


def test_unknown_names_are_parameter_errors():
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['stage1_stepz'\]"):
        SCHashFormer.from_params({"stage1_stepz": 1})
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['alpha'\]"):  # the old name of w_kl
        tl.cluster(simulate_counts(40, 30), 3, alpha=1.0)


def test_fit_checks_parameters_first():
    with pytest.raises(ParameterError, match=r"parameter stage1_steps must be int, got 'abc'"):
        SCHashFormer(3, stage1_steps="abc").fit(simulate_counts(40, 30))
    with pytest.raises(ParameterError, match=r"parameter progress must be bool"):
        SCHashFormer(3, progress="yes").fit(simulate_counts(40, 30))


# ----------------------------------------------------------------------------- save, record, rerun, fingerprint
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tl.cluster with a non-default value for every parameter that defines the result (small networks)."""
    params = {name: OTHER[name] for name in PARAM_DEFAULTS if name not in RUN_ONLY}
    params.update(TINY, train_cells=100, n_top_genes=30, allow_noncounts=True)
    adata = simulate_counts(60, 40)
    _, model = tl.cluster(adata, return_model=True, progress=False, device="cpu", **params)
    return adata, model, params, tmp_path_factory.mktemp("params")


def test_run_record_holds_every_result_parameter_and_rerun_repeats_it(run):
    adata, model, params, _ = run
    rec = model.result_params()
    assert rec == params and set(rec) == set(PARAM_DEFAULTS) - set(RUN_ONLY)
    again, fit_args = record.rerun_args(adata.uns["schashformer"])
    assert again == params and fit_args == {"labels_key": None, "batch_key": None, "layer": None}
    legacy = dict(adata.uns["schashformer"])
    legacy["params"] = {{"w_kl": "alpha", "w_zinb_stage2": "beta"}.get(k, k): v for k, v in legacy["params"].items()}
    assert record.rerun_args(legacy)[0] == params


def test_save_load_round_trips_every_parameter(run):
    adata, model, params, tmp = run
    model.save(tmp / "m")
    loaded = SCHashFormer.load(tmp / "m", device="cpu")
    assert loaded.result_params() == params and loaded.device == "cpu" and loaded.progress is False
    assert np.array_equal(loaded.predict(adata), model.predict(adata))


def test_model_saved_with_the_old_names_alpha_and_beta_loads(run):
    adata, model, params, tmp = run
    model.save(tmp / "new", overwrite=True)
    state = torch.load(tmp / "new" / "model.pt", weights_only=True)
    init = dict(state["init"])
    init["alpha"], init["beta"] = init.pop("w_kl"), init.pop("w_zinb_stage2")
    del init["resolution"]  # older still: no resolution either
    state["init"] = init
    (tmp / "old").mkdir()
    torch.save(state, tmp / "old" / "model.pt")
    loaded = SCHashFormer.load(tmp / "old", device="cpu")
    assert loaded.w_kl == params["w_kl"] and loaded.w_zinb_stage2 == params["w_zinb_stage2"]
    assert loaded.resolution == nc.DEFAULT_RESOLUTION
    assert np.array_equal(loaded.predict(adata), model.predict(adata))


def test_checkpoint_fingerprint_names_a_differing_training_parameter(tmp_path):
    adata = simulate_counts(40, 30)
    kwargs = dict(seed=0, progress=False, device="cpu", checkpoint_dir=tmp_path / "ck", keep_checkpoint=True, **TINY)
    SCHashFormer(3, **kwargs).fit(adata)
    with pytest.raises(InputError, match=r"differs in lr\)"):
        SCHashFormer(3, lr=0.01, **kwargs).fit(adata, resume=True)
    # how a fit runs (progress bars, checkpoint spacing) is not part of the run's identity
    SCHashFormer(3, **{**kwargs, "progress": True, "checkpoint_every": 7}).fit(adata, resume=True)


# ----------------------------------------------------------------------------- command line and configs
def test_cli_param_accepts_every_other_parameter():
    settable = [name for name in PARAM_DEFAULTS if name not in app.OPTION_PARAMS and name not in app.FIXED_PARAMS]
    assert set(TRAIN_FIELDS) <= set(settable)
    items = [f"{name}={yaml_text(OTHER[name])}" for name in settable]
    assert app.parse_params(items) == {name: OTHER[name] for name in settable}
    for name in TRAIN_FIELDS:  # the defaults as well
        assert app.parse_params([f"{name}={yaml_text(PARAM_DEFAULTS[name])}"]) == {name: PARAM_DEFAULTS[name]}
    args = cli.build_parser().parse_args(["cluster", "in.h5ad", "--out", "o", "--seed", "4", "--quiet", *(
        a for item in items for a in ("--param", item))])
    params = app.estimator_params(args)
    model = SCHashFormer.from_params(params)
    model.check_params()
    assert model.config.to_dict() == {name: OTHER[name] for name in TRAIN_FIELDS}
    assert params["seed"] == 4 and params["progress"] is False
    assert {k: params[k] for k in app.OPTION_PARAMS if k != "seed"} == {
        k: PARAM_DEFAULTS[k] for k in app.OPTION_PARAMS if k != "seed"}  # option defaults: the estimator's


@pytest.mark.parametrize("item,message", [
    ("seed=3", r"--param seed=\.\.\.: use --seed"),
    ("n_top_genes=3", r"use --n-top-genes"),
    ("progress=false", r"set by --quiet"),
    ("checkpoint_dir=x", r"set by --out"),
    ("w_klx=1", r"unknown parameter\(s\) \['w_klx'\]"),
])
def test_cli_param_refuses_names_with_their_own_option(item, message):
    with pytest.raises(ParameterError, match=message):
        app.parse_params([item])


def test_every_shipped_config_is_accepted():
    for path in sorted((ROOT / "configs").glob("*.yml")):
        cfg = main_py.read_config(path)
        SCHashFormer.from_params({**cfg["params"], "n_clusters": cfg["n_clusters"] or None}).check_params()


def test_config_params_may_set_every_parameter(tmp_path):
    settable = {name: OTHER[name] for name in PARAM_DEFAULTS
                if name not in ("n_clusters", "checkpoint_dir", "keep_checkpoint")}
    path = tmp_path / "all.yml"
    path.write_text(yaml.safe_dump({"data_path": "x.h5ad", "n_clusters": 3, "params": settable}))
    cfg = main_py.read_config(path)
    assert cfg["params"] == settable
    assert SCHashFormer.from_params(cfg["params"]).config.to_dict() == {name: OTHER[name] for name in TRAIN_FIELDS}
    path.write_text(yaml.safe_dump({"data_path": "x.h5ad", "n_clusters": 3, "params": {"alpha": 1.0}}))
    with pytest.raises(ParameterError, match=r"all\.yml: unknown parameter\(s\) \['alpha'\]"):
        main_py.read_config(path)
    path.write_text(yaml.safe_dump({"data_path": "x.h5ad", "n_clusters": 3, "params": {"lr": "fast"}}))
    with pytest.raises(ParameterError, match=r"all\.yml: parameter lr must be float, got 'fast'"):
        main_py.read_config(path)
