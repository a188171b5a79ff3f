#!/usr/bin/env bash
# Prepared GPU check: uses the machine's own JAX, installs the pure-Python wheels `make gpu-wheels`
# put in .whl/ (blackjax, arviz, numpyro, emdppl, ...; no package index needed), names any
# compiled package the image lacks, then runs benchmarks/gpu_check.py on the GPU and on the CPU
# (NUTS chains and EMD batches of 1, 16, 256, 4096; the CPU rows up to 256) and prints one
# table with GPU/CPU ratios. Usage on the device: bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
out=${1:-benchmarks/results}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  python3 - .whl/image-needs.txt <<'PY'
import sys
from importlib import metadata
missing = []
for name in open(sys.argv[1]).read().split():
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"this image lacks compiled packages emdppl needs: {', '.join(missing)}")
PY
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, emdppl; print('jax', jax.__version__, 'emdppl', emdppl.__version__, 'devices:', jax.devices())"
rm -f "$out/gpu_check.json"
python3 benchmarks/gpu_check.py --out "$out"
JAX_PLATFORMS=cpu python3 benchmarks/gpu_check.py --out "$out" --chains 1 16 256 --batches 16 256
python3 - "$out/gpu_check.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
rate = {"mcmc": "ess_per_second", "emd": "steps_per_second"}
cpu = {(r["kind"], r["size"]): r for r in rows if r["platform"] == "cpu"}
print(f"{'kind':<5} {'platform':<8} {'size':>5} {'warm s':>8} {'rate':>10} {'GPU/CPU':>8}   (rate: ESS/s or EMD steps/s)")
for r in rows:
    c = cpu.get((r["kind"], r["size"]))
    key = rate[r["kind"]]
    ratio = f"{r[key] / c[key]:.2f}" if c and r["platform"] != "cpu" else ""
    print(f"{r['kind']:<5} {r['platform']:<8} {r['size']:>5} {r['warm_seconds']:>8.2f} {r[key]:>10.1f} {ratio:>8}")
PY
