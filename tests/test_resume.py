"""Checkpoint and resume: a killed run resumes and ends with the labels of an uninterrupted run (CPU, same seed).

``test_sigkill_mid_training_then_resume`` kills a real command-line run with SIGKILL while stage 2
trains; ``test_resume_from_every_checkpoint`` stops a fit right after each checkpoint it writes
(every phase, mid-loop and at phase ends) and resumes it. The NaN tests check that a diverged
run names the stage and step and keeps the last good checkpoint.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from schashformer import app
from schashformer import SCHashFormer, checkpoint, cli
from schashformer.nn import losses
from schashformer.checkpoint import Checkpointer
from schashformer.errors import InputError, TrainingError
from tests.conftest import FAST, simulate_counts

ROOT = Path(__file__).resolve().parents[1]
# FAST, with a few more steps so that the kill lands inside stage 2, and no early convergence stop
KILL_PARAMS = {**FAST, "stage1_steps": 60, "stage2_pretrain_steps": 120, "stage2_cluster_steps": 40, "tol": 0.0}
SMALL = {**FAST, "stage1_steps": 20, "stage2_pretrain_steps": 12, "stage2_cluster_steps": 30, "update_interval": 7,
         "tol": 0.0, "input_noise": 1.0}


def read_state(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(tmp_path):
    simulate_counts(300, 200, seed=3).write_h5ad(tmp_path / "in.h5ad")
    params = [a for k, v in KILL_PARAMS.items() for a in ("--param", f"{k}={v}")]

    def argv(out, *extra):
        return ["cluster", str(tmp_path / "in.h5ad"), "--n-clusters", "3", "--out", str(out), "--quiet", "--no-umap",
                "--device", "cpu", "--seed", "5", "--checkpoint-every", "5", *params, *extra]

    # the killed run: a separate process with the same number of threads as this one (same arithmetic)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MKL_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "schashformer.cli", *argv(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / app.CHECKPOINT_DIR / checkpoint.STATE_FILE
    deadline, state = time.monotonic() + 60, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            state = read_state(ckpt) if ckpt.exists() else None
            if state is not None and state["phase"] == "pretrain":
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        assert state is not None and state["phase"] == "pretrain", "no stage-2 checkpoint within 60 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = read_state(ckpt)
    assert at_kill["phase"] == "pretrain" and 0 < at_kill["step"] < KILL_PARAMS["stage2_pretrain_steps"]
    assert sorted(p.name for p in killed.iterdir()) == [app.CHECKPOINT_DIR]  # no results, only the checkpoint

    assert cli.main(argv(killed, "--resume")) == 0
    assert cli.main(argv(tmp_path / "straight")) == 0  # the uninterrupted run
    assert sorted(p.name for p in killed.iterdir()) == ["bucket_sizes.png", "clusters.csv", "metrics.json", "model",
                                                        "result.h5ad", "training_curves.png"]  # ckpt gone
    resumed, straight = (pd.read_csv(tmp_path / d / "clusters.csv", index_col=0) for d in ("killed", "straight"))
    assert resumed["schashformer"].nunique() == 3
    pd.testing.assert_frame_equal(resumed, straight)
    z = [ad.read_h5ad(tmp_path / d / "result.h5ad").obsm["X_schashformer"] for d in ("killed", "straight")]
    np.testing.assert_array_equal(z[0], z[1])


class Stop(Exception):
    """Stands for a kill right after a checkpoint was written."""


@pytest.mark.slow
def test_resume_from_every_checkpoint(tmp_path, monkeypatch):
    adata = simulate_counts(150, 100, seed=2)
    adata.obs["batch"] = np.where(np.arange(150) % 3, "a", "b")  # the batch covariate is part of the state too
    make = lambda: SCHashFormer(3, seed=1, progress=False, device="cpu", checkpoint_dir=tmp_path / "ck",
                                checkpoint_every=10, **SMALL)
    reference = SCHashFormer(3, seed=1, progress=False, device="cpu", **SMALL).fit(adata, batch_key="batch")
    real_save = Checkpointer.save
    written = []

    def recording(self, phase, step=0, **items):
        real_save(self, phase, step, **items)
        written.append((phase, step))
    monkeypatch.setattr(Checkpointer, "save", recording)
    checkpointed = make().fit(adata, batch_key="batch")
    np.testing.assert_array_equal(checkpointed.labels_, reference.labels_)  # checkpointing changes nothing
    assert not (tmp_path / "ck").exists()  # removed after a successful fit
    assert {p for p, _ in written} == set(checkpoint.PHASES)
    assert ("stage1", 10) in written and ("pretrain", 10) in written and ("cluster", 20) in written

    for n in range(1, len(written) + 1):
        calls = []

        def stop_after_n(self, phase, step=0, **items):
            real_save(self, phase, step, **items)
            calls.append(phase)
            if len(calls) == n:
                raise Stop
        monkeypatch.setattr(Checkpointer, "save", stop_after_n)
        with pytest.raises(Stop):
            make().fit(adata, batch_key="batch")
        monkeypatch.setattr(Checkpointer, "save", real_save)
        resumed = make().fit(adata, batch_key="batch", resume=True)
        where = written[n - 1]
        np.testing.assert_array_equal(resumed.labels_, reference.labels_, err_msg=f"resumed from {where}")
        np.testing.assert_array_equal(resumed.embedding_, reference.embedding_, err_msg=f"resumed from {where}")
        assert resumed.history_ == reference.history_, where


def test_resume_without_checkpoint_starts_afresh_and_other_runs_are_refused(tmp_path):
    adata = simulate_counts(120, 80, seed=4)
    kwargs = dict(progress=False, device="cpu", checkpoint_dir=tmp_path / "ck", keep_checkpoint=True, **SMALL)
    first = SCHashFormer(3, seed=0, **kwargs).fit(adata, resume=True)  # nothing to resume: a normal fit
    assert (tmp_path / "ck" / checkpoint.STATE_FILE).exists()
    again = SCHashFormer(3, seed=0, **kwargs).fit(adata, resume=True)  # resumes the finished run: no training
    np.testing.assert_array_equal(again.labels_, first.labels_)
    with pytest.raises(InputError, match=r"checkpoint was written by another run \(differs in seed\)"):
        SCHashFormer(3, seed=1, **kwargs).fit(adata, resume=True)
    with pytest.raises(InputError, match=r"differs in data"):
        SCHashFormer(3, seed=0, **kwargs).fit(simulate_counts(120, 80, seed=5), resume=True)


def test_resume_needs_a_checkpoint_dir():
    from schashformer.errors import ParameterError

    with pytest.raises(ParameterError, match=r"^resume=True needs checkpoint_dir="):
        SCHashFormer(3, progress=False, **SMALL).fit(simulate_counts(50, 40), resume=True)


def nan_at(monkeypatch, call: int) -> None:
    """Make stage 2's loss NaN at its ``call``-th evaluation (0-based)."""
    real, calls = losses.NeighbourhoodLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss, terms = real(self, *args, **kwargs)
        return (loss * float("nan"), terms) if len(calls) - 1 == call else (loss, terms)
    monkeypatch.setattr(losses.NeighbourhoodLoss, "forward", forward)


def test_nan_loss_names_stage_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    adata = simulate_counts(150, 100, seed=6)
    make = lambda: SCHashFormer(3, seed=0, progress=False, device="cpu", checkpoint_dir=tmp_path / "ck",
                                checkpoint_every=5, **SMALL)
    nan_at(monkeypatch, 8)  # pretrain step 8: the last checkpoint is pretrain step 5
    with pytest.raises(TrainingError) as info:
        make().fit(adata)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("stage 2: encoder, step 8: loss became nan; lower lr (now 0.001)")
    assert f"last good checkpoint {tmp_path / 'ck' / checkpoint.STATE_FILE} (pretrain, step 5) is kept" in message
    kept = read_state(tmp_path / "ck" / checkpoint.STATE_FILE)
    assert (kept["phase"], kept["step"]) == ("pretrain", 5)  # not overwritten by the bad state
    assert all(torch.isfinite(v).all() for m in kept["modules"].values() for v in m.values() if v.is_floating_point())
    # the kept checkpoint is good: resuming it (the NaN gone) gives the uninterrupted run's labels
    monkeypatch.undo()
    resumed = make().fit(adata, resume=True)
    straight = SCHashFormer(3, seed=0, progress=False, device="cpu", **SMALL).fit(adata)
    np.testing.assert_array_equal(resumed.labels_, straight.labels_)


def test_nan_loss_without_checkpoints_names_stage_and_step(monkeypatch):
    real, calls = losses.HashingLoss.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        loss, terms = real(self, *args, **kwargs)
        return (loss * float("inf"), terms) if len(calls) == 4 else (loss, terms)
    monkeypatch.setattr(losses.HashingLoss, "forward", forward)
    with pytest.raises(TrainingError, match=r"^stage 1 \(hashing\), step 3: loss became inf; lower lr") as info:
        SCHashFormer(3, seed=0, progress=False, device="cpu", **SMALL).fit(simulate_counts(100, 60))
    assert "checkpoint" not in str(info.value)


def test_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    layer = torch.nn.Linear(3, 2)
    ckpt = Checkpointer(tmp_path, 1, {"run": "x"}, np.random.default_rng(0))
    ckpt.modules["encoder"] = layer
    ckpt.save("pretrain", 4)
    good = (tmp_path / checkpoint.STATE_FILE).read_bytes()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"pretrain, step 5: the encoder weights became non-finite; last good "
                                            r"checkpoint .*checkpoint\.pt \(pretrain, step 4\) is kept"):
        ckpt.save("pretrain", 5)
    assert (tmp_path / checkpoint.STATE_FILE).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.STATE_FILE]  # no temporary file left
