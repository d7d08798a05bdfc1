"""benchmarks/gpu.sh, the prepared GPU run of issue 22, run on the CPU at a small size (CI has no GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
           "CLUSTER_ARGS": "--param stage1_steps=40 --param stage2_pretrain_steps=20 --param stage2_cluster_steps=20"}
    done = subprocess.run(["bash", str(SCRIPT), "1500", "cpu"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert result["cells"] == 1500 and result["device"] == "cpu"
    # every stage of the fit is timed, and the run clusters the simulated types well above chance
    assert {"stage1_hashing", "stage2_encoder", "stage2_clustering"} <= set(result["stages_s"])
    assert result["ari"] > 0.5
    assert "| stage | seconds |" in (tmp_path / "out" / "gpu.md").read_text()
    assert not list(tmp_path.glob("schf-gpu.*")), "the script leaves no work directory behind"


def test_gpu_script_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT), "1000", "cuda"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr
