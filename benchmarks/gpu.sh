#!/usr/bin/env bash
# GPU run of issue 22: simulate CELLS cells like 10x PBMC and cluster them end to end on DEVICE,
# with bfloat16 mixed precision in training (TrainConfig.mixed_precision, on by default on CUDA).
# Writes OUT/gpu.md and OUT/gpu.json: wall time per step and per stage (metrics.json), peak GPU
# memory, ARI against the simulated types, the GPU's name.
#
#   bash benchmarks/gpu.sh [CELLS] [DEVICE]     # defaults: 1000000 cuda; OUT=benchmarks/results/gpu
#   bash benchmarks/gpu.sh 3000 cpu             # the same script at a small size on a CPU (its test)
#
# It installs what it needs when the package is not importable (torch first, then the package);
# PYTHON picks the interpreter (default: python3); CLUSTER_ARGS adds options to `schashformer cluster`
# (the test shortens training with it). Runs in well under 10 minutes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CELLS=${1:-1000000}
DEVICE=${2:-cuda}
OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/schf-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

if ! "$PYTHON" -c "import schashformer, torch" 2>/dev/null; then
  echo "installing torch and the package into $PYTHON's environment"
  "$PYTHON" -m pip install --quiet torch==2.13.0
  "$PYTHON" -m pip install --quiet -c constraints.txt -e .
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: DEVICE=cuda but torch sees no CUDA GPU (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi
mkdir -p "$OUT"

now() { date +%s.%N; }
t0=$(now)
"$PYTHON" -m schashformer simulate --cells "$CELLS" --like PBMC --seed 0 --out "$WORK/sim.h5ad" --quiet
t1=$(now)
# 8 simulated types: K given, as in benchmarks/scale.py; the file is clustered where it lies (out of core
# above train_cells), so the read, every pass and the writing of the result are all in the time.
"$PYTHON" -m schashformer cluster "$WORK/sim.h5ad" --out "$WORK/run" --n-clusters 8 --labels-key cell_type \
  --device "$DEVICE" --no-umap --quiet ${CLUSTER_ARGS:-}
t2=$(now)

"$PYTHON" - "$WORK/run/metrics.json" "$OUT" "$CELLS" "$DEVICE" "$t0" "$t1" "$t2" <<'EOF'
import json, platform, sys
from pathlib import Path

import torch

metrics_path, out, cells, device, t0, t1, t2 = sys.argv[1:]
report = json.loads(Path(metrics_path).read_text())
simulate_s, cluster_s = float(t1) - float(t0), float(t2) - float(t1)
gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (CPU run)"
stages = {name: t["seconds"] for name, t in report["timings"].items()}
scores = report.get("metrics", {})
result = {"cells": int(cells), "device": device, "gpu": gpu, "torch": torch.__version__,
          "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores",
          "simulate_s": round(simulate_s, 1), "cluster_end_to_end_s": round(cluster_s, 1),
          "stages_s": stages, "ari": scores.get("ari"), "nmi": scores.get("nmi"),
          "peak_gpu_gib": report.get("peak_gpu_gib")}
Path(out, "gpu.json").write_text(json.dumps(result, indent=2))
lines = [f"# GPU run: {int(cells):,} simulated cells (like 10x PBMC, 8 types), device {device}", "",
         f"GPU: {gpu}; host {result['machine']}; torch {torch.__version__}. Command: "
         f"`bash benchmarks/gpu.sh {cells} {device}`", "",
         f"- simulate (write the .h5ad): {simulate_s:.1f} s",
         f"- cluster, end to end (process start to result files): {cluster_s:.1f} s",
         f"- ARI {scores.get('ari')}, NMI {scores.get('nmi')}", "", "| stage | seconds |", "|---|---:|"]
lines += [f"| {name} | {s:.1f} |" for name, s in stages.items()]
Path(out, "gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
