"""Documentation: the API reference builds from the docstrings with warnings as errors, the tutorial
notebook runs on the bundled data, and what a user reads holds no paths outside the repository."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    out = tmp_path / "html"
    run = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          str(ROOT / "docs"), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    api = (out / "api.html").read_text()
    for name in ("schashformer.tl.cluster", "schashformer.tl.hash_neighbors", "schashformer.tl.annotate",
                 "schashformer.tl.trajectory", "schashformer.pl.embedding", "schashformer.SCHashFormer"):
        assert f'id="{name}"' in api, name
    assert "neighbors_key" in api  # parameters come from the docstrings


def test_user_facing_text_stays_inside_the_repository():
    texts = [README, ROOT / "docs" / "tutorial.ipynb", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "docs").glob("*.rst"))]
    for path in texts:
        assert "../shared" not in path.read_text(), path


def test_readme_first_screen():
    """What it is, the two set-up commands, a five-line example and one results table in the first screen."""
    lines = README.read_text().splitlines()
    first = "\n".join(lines[:60])
    setup = re.search(r"```bash\n(.*?)```", first, re.S).group(1)
    commands = [c for c in setup.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    assert len(commands) == 2 and commands[1].strip() == "bash .ci/run"
    assert "download.pytorch.org/whl/cpu" in commands[0] and "schashformer demo" in commands[0]
    assert "-c constraints.txt" in commands[0] and (ROOT / "constraints.txt").exists()
    example = re.search(r"```python\n(.*?)```", first, re.S).group(1).strip().splitlines()
    assert len(example) <= 5 and any("tl.cluster" in line for line in example)
    assert first.count("\n| ") >= 3  # a results table
    assert (ROOT / "LICENSE").read_text().startswith("MIT License") and (ROOT / "CHANGELOG.md").exists()


@pytest.mark.slow
def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    import os

    import schashformer

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "docs" / "tutorial.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    train = dict(FAST, stage1_steps=30, stage2_pretrain_steps=30, stage2_cluster_steps=30, progress=False)
    params[0].source = f"TRAIN = {train!r}\nN_CELLS = 1200"
    # the kernel imports the package this test imported (not another installed copy)
    src = str(Path(schashformer.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "counts read from: layers['counts']" in text
    scores = json.loads(re.search(r"\{'ari': [^}]*\}", text).group(0).replace("'", '"'))
    assert scores["ari"] > 0.3, scores
    transfer = re.search(r"(\d+)% of query cells called, ([\d.]+)% of them correct", text)
    assert int(transfer.group(1)) > 50 and float(transfer.group(2)) > 70, transfer.group(0)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 4  # UMAP, dot plot, PAGA, pseudotime UMAP, own plots
