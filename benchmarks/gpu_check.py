"""GPU vs CPU: emdppl NUTS chains per second and EMD steps per second as the work grows.

Two sweeps on the default device (``JAX_PLATFORMS=cpu`` for the CPU rows):

- **MCMC**: eight schools (auxiliary form), NUTS 500 + 500 draws for ``--chains`` chains; per
  row the warm call's seconds, draws per second (chains x draws / s) and min bulk ESS per
  second.
- **EMD**: ``emdppl.distill`` (library defaults) on the demo's exact ``ring8`` mixture with
  ``--batches`` E-step chains per step, ``--emd-steps`` steps; per row the warm call's steps
  per second.

Each run appends its rows to ``--out``/gpu_check.json and prints them; the warm call is the
second of two identical calls (the first compiles). ``benchmarks/gpu_check.sh`` runs both
platforms and prints the GPU/CPU ratios.
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
from emdppl.demo import mixtures  # noqa: E402
from emdppl.models import EIGHT_SCHOOLS, eight_schools  # noqa: E402

VAR_NAMES = ("mu", "tau", "theta")
SWEEP = [1, 16, 256, 4096]


def _warm(call) -> tuple[object, float]:
    """``call(seed)`` twice (the first compiles); the second's result and wall seconds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(0)
        with common.stopwatch() as watch:
            result = call(1)
    return result, watch.wall_seconds


def mcmc_row(num_chains: int, num_warmup: int, num_samples: int) -> dict:
    algorithm = emdppl.MCMC(
        "nuts", num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains
    )
    idata, seconds = _warm(
        lambda seed: emdppl.infer(
            eight_schools, algorithm, model_kwargs=EIGHT_SCHOOLS, rng_key=seed,
            progress_bar=False,
        )
    )
    ess, _ = common.min_ess({k: idata.posterior[k].values for k in VAR_NAMES}, VAR_NAMES)
    return {
        "kind": "mcmc",
        "size": num_chains,
        "warm_seconds": seconds,
        "draws_per_second": num_chains * num_samples / seconds,
        "min_ess_bulk": ess,
        "ess_per_second": ess / seconds,
        "divergences": int(idata.sample_stats["diverging"].sum()),
    }


def emd_row(batch_size: int, num_steps: int) -> dict:
    teacher = mixtures()["ring8"]
    result, seconds = _warm(
        lambda seed: emdppl.distill(
            teacher, rng_key=seed, num_steps=num_steps, batch_size=batch_size,
            student_warmup_steps=0, num_probe_draws=0, progress_bar=False,
        )
    )
    return {
        "kind": "emd",
        "size": batch_size,
        "warm_seconds": seconds,
        "steps_per_second": num_steps / seconds,
        "skipped_steps": int(result.state.num_skipped),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, nargs="*", default=SWEEP)
    parser.add_argument("--batches", type=int, nargs="*", default=SWEEP)
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--emd-steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args()
    device = jax.devices()[0]
    rows = []
    jobs = [(mcmc_row, (n, args.num_warmup, args.num_samples)) for n in args.chains]
    jobs += [(emd_row, (b, args.emd_steps)) for b in args.batches]
    for job, job_args in jobs:
        row = {"platform": device.platform, "device": str(device), **job(*job_args)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    previous = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(previous + rows, indent=2))


if __name__ == "__main__":
    main()
