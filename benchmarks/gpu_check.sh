#!/usr/bin/env bash
# The GPU check: the CUDA tests, then a short real-shape bench, into one JSON with the device name.
# Run on a machine with a CUDA GPU (under 8 minutes on an H100/H200); never part of CI.
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: benchmarks/results)
# Synthetic checkpoints (random weights at Mixtral-8x7B's and Qwen3-30B-A3B's shapes, 2 layers,
# bfloat16) keep the real expert sizes, so copies cross the real PCIe/NVLink host link.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
work=$(mktemp -d)
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -m cuda tests/ 2>&1 | tee "$work/tests.txt"
for shape in mixtral-8x7b qwen3-30b-a3b; do
  timeout 150 moespec bench --synthetic "$shape" --layers 2 --device cuda --dtype bfloat16 \
    --cache-sizes 25%,50% --policies none,lookahead,auto --batch-sizes 1,4 \
    --prompt-tokens 16 --new-tokens 16 --repeats 3 --out "$work/$shape.json"
done
python - "$work" "$out" <<'PY'
import json, pathlib, sys, datetime, torch
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "tests": (work / "tests.txt").read_text().strip().splitlines()[-1],
       "bench": {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}}
path = out / "gpu-check.json"
path.write_text(json.dumps(doc, indent=2) + "\n")
print(f"written to {path}: {doc['device']}, tests: {doc['tests']}")
PY
