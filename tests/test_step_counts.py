"""Step counts derived from the data (TrainConfig.for_cells) and the bfloat16 training path (issue 22)."""

import numpy as np
import pytest
import torch

from schashformer import SCHashFormer, engine
from schashformer.metrics import clustering_scores
from schashformer.train import MIN_STEPS, PHASE_EPOCHS, TrainConfig
from tests.conftest import FAST, simulate_counts

PHASES = ("stage2_pretrain_steps", "stage2_cluster_steps")  # the scaled ones; stage 1 keeps its count


def steps(cfg: TrainConfig) -> tuple[int, int, int]:
    return tuple(getattr(cfg, name) for name in PHASES)


SCALED = TrainConfig(scale_steps=True)


def test_by_default_the_configured_counts_are_kept():
    for n in (10, 220, 4271):
        assert TrainConfig().for_cells(n) == TrainConfig()


def test_scaled_counts_reach_the_caps_on_pbmc_sized_data_and_above():
    caps = steps(SCALED)
    for n in (4271, 20_000, 10**6):
        assert steps(SCALED.for_cells(n)) == caps


@pytest.mark.parametrize("n", [3, 50, 220, 1000, 1886, 2746])
def test_small_data_get_fewer_steps_never_below_the_floor(n):
    cfg = SCALED
    scaled = cfg.for_cells(n)
    for name, phase in zip(PHASES, ("pretrain", "cluster")):
        got, cap = getattr(scaled, name), getattr(cfg, name)
        assert MIN_STEPS <= got <= cap
        batch = cfg.chunk_size * cfg.chunks_per_batch
        # enough steps for PHASE_EPOCHS passes over the cells, unless capped
        assert got == cap or got * min(batch, n) >= PHASE_EPOCHS[phase] * n
    # below the size at which a phase's cap holds exactly its epochs, that phase runs fewer steps
    batch = cfg.chunk_size * cfg.chunks_per_batch
    full = min(getattr(cfg, name) * batch / PHASE_EPOCHS[phase] for name, phase in zip(PHASES, ("pretrain", "cluster")))
    assert steps(scaled) < steps(cfg) if n < full else steps(scaled) <= steps(cfg)
    # the other fields are untouched
    assert {k: v for k, v in scaled.to_dict().items() if k not in PHASES} == \
           {k: v for k, v in cfg.to_dict().items() if k not in PHASES}


def test_step_counts_grow_with_the_data():
    counts = [steps(SCALED.for_cells(n)) for n in (100, 500, 1000, 2000, 3000, 4000, 5000)]
    assert all(np.all(np.array(a) <= np.array(b)) for a, b in zip(counts, counts[1:]))


def test_caps_below_the_floor_are_kept_exactly():
    small_caps = TrainConfig(stage2_pretrain_steps=3, stage2_cluster_steps=9, scale_steps=True)
    assert steps(small_caps.for_cells(200)) == (3, 9)
    assert TrainConfig(stage1_steps=7, scale_steps=True).for_cells(200).stage1_steps == 7


def test_a_small_fit_runs_the_scaled_step_counts():
    adata = simulate_counts(240, 120, n_types=3, seed=2)
    params = {**FAST, "stage1_steps": 60, "stage2_pretrain_steps": 100, "stage2_cluster_steps": 200, "tol": 0.0,
              "scale_steps": True}
    model = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, **params).fit(adata)
    expect = model.config.for_cells(240)
    last = {stage: max(r["step"] for r in model.history_ if r["stage"] == stage) for stage in (1, "2-pretrain")}
    assert last[1] == 60 - 1  # stage 1 keeps its count
    assert last["2-pretrain"] == expect.stage2_pretrain_steps - 1 < 100 - 1
    assert model.config.stage2_pretrain_steps == 100  # the estimator's parameters stay the user's


def test_bfloat16_training_path_gives_finite_losses_and_the_same_clusters(monkeypatch):
    """The autocast path that CUDA takes, exercised on the CPU: every loss stays finite (the ZINB
    likelihood runs in float32) and the clusters match a float32 fit."""
    adata = simulate_counts(300, 150, n_types=3, seed=4)
    y = adata.obs["label"].to_numpy()
    plain = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, **FAST).fit(adata)
    monkeypatch.setattr(engine, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    seen = []
    original = engine.training_precision

    def spy(device, cfg):
        context = original(device, cfg)
        seen.append(isinstance(context, torch.autocast))
        return context

    monkeypatch.setattr(engine, "training_precision", spy)
    mixed = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, **FAST).fit(adata)
    assert seen and all(seen)
    assert all(np.isfinite(r["loss"]) for r in mixed.history_)
    assert mixed.embedding_.dtype == np.float32
    assert clustering_scores(y, mixed.labels_)["ari"] > 0.8 * clustering_scores(y, plain.labels_)["ari"]
    # switched off, the same device trains in float32
    off = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, mixed_precision=False, **FAST).fit(adata)
    assert not seen[-1] and np.array_equal(off.labels_, plain.labels_)
