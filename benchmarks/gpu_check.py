"""GPU vs CPU: emdppl NUTS on eight schools (auxiliary form) as the number of chains grows.

Run twice, once per platform (``JAX_PLATFORMS=cpu`` for the CPU row); each run appends its rows
to ``--out``/gpu_check.json and prints them. ``benchmarks/gpu_check.sh`` does both and prints
the CPU-vs-GPU ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import jax

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from emdppl.models import EIGHT_SCHOOLS, eight_schools  # noqa: E402

VAR_NAMES = ("mu", "tau", "theta")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 64, 1024])
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    rows = []
    for num_chains in args.chains:
        algorithm = emdppl.MCMC(
            "nuts", num_warmup=args.num_warmup, num_samples=args.num_samples, num_chains=num_chains
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for seed in (0, 1):  # the second run is warm: no compilation
                with common.stopwatch() as watch:
                    idata = emdppl.infer(
                        eight_schools, algorithm, model_kwargs=EIGHT_SCHOOLS, rng_key=seed,
                        progress_bar=False,
                    )
        seconds = watch.wall_seconds
        ess, _ = common.min_ess({k: idata.posterior[k].values for k in VAR_NAMES}, VAR_NAMES)
        rows.append(
            {
                "platform": platform,
                "device": str(jax.devices()[0]),
                "num_chains": num_chains,
                "warm_seconds": seconds,
                "min_ess_bulk": ess,
                "ess_per_second": ess / seconds,
                "divergences": int(idata.sample_stats["diverging"].sum()),
            }
        )
        print(json.dumps(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    previous = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(previous + rows, indent=2))


if __name__ == "__main__":
    main()
