#!/usr/bin/env bash
# Prepared GPU check (< 5 min on one H100): uses the machine's JAX, installs the missing pure-Python
# wheels carried in .whl/ (blackjax, arviz, ...), checks jax.devices(), runs the NUTS chain-scaling
# check on the GPU and on the CPU, and prints a table with CPU-vs-GPU ratios.
# Usage on the device: bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
out=${1:-benchmarks/results}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax; print('devices:', jax.devices())"
rm -f "$out/gpu_check.json"
python3 benchmarks/gpu_check.py --out "$out"
JAX_PLATFORMS=cpu python3 benchmarks/gpu_check.py --out "$out" --chains 4 64
python3 - "$out/gpu_check.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
cpu = {r["num_chains"]: r for r in rows if r["platform"] == "cpu"}
print(f"{'platform':<8} {'chains':>6} {'warm s':>8} {'min ESS':>9} {'ESS/s':>9} {'GPU/CPU ESS/s':>14}")
for r in rows:
    c = cpu.get(r["num_chains"])
    ratio = f"{r['ess_per_second'] / c['ess_per_second']:.2f}" if c and r["platform"] != "cpu" else ""
    print(f"{r['platform']:<8} {r['num_chains']:>6} {r['warm_seconds']:>8.2f} "
          f"{r['min_ess_bulk']:>9.0f} {r['ess_per_second']:>9.0f} {ratio:>14}")
PY
