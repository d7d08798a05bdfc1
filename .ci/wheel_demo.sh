#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a fresh virtual environment (torch first,
# then the wheel with constraints.txt), check the demo data is inside, and run `schashformer demo`
# from a directory outside the repository. About 4 minutes on 2 cores (the demo is ~2.5 of them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rm -rf dist .ci-wheel-venv
python3 -m pip wheel -q --no-deps -w dist .
wheel=$(ls dist/schashformer-*.whl)
python3 -m zipfile -l "$wheel" > dist/contents.txt
grep "schashformer/data/10X_PBMC_top2000.h5" dist/contents.txt
grep "LICENSE" dist/contents.txt
python3 -m venv .ci-wheel-venv
.ci-wheel-venv/bin/python -m pip install -q --upgrade pip
.ci-wheel-venv/bin/python -m pip install -q torch==2.13.0
.ci-wheel-venv/bin/python -m pip install -q -c constraints.txt "$wheel"
work=$(mktemp -d)
cd "$work"
# DEMO_ARGS: extra arguments, e.g. "--param stage1_steps=40" on a busy machine; CI runs the demo as a user would.
"$root/.ci-wheel-venv/bin/schashformer" demo --out demo_out ${DEMO_ARGS:-} | tee demo.log
grep -q "ARI" demo.log
test -s demo_out/metrics.json && test -s demo_out/result.h5ad && test -s demo_out/umap.png
# the installed package, not the repository, was imported
"$root/.ci-wheel-venv/bin/python" -c "import schashformer, sys; p = schashformer.__file__; print(p); sys.exit('$root/src' in p)"
echo "wheel demo OK: $wheel"
