"""Eight schools, centered vs auxiliary form, with any registered sampler.

    python examples/eight_schools.py --sampler nuts --num-chains 4
    python examples/eight_schools.py --sampler mala --num-warmup 2000 --smoke

Prints the ArviZ summary of each form and writes a rank plot per form.
"""

from __future__ import annotations

import argparse
import pathlib
import warnings

import arviz as az
import matplotlib

import emdppl
from emdppl.models import EIGHT_SCHOOLS, eight_schools

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sampler", default="nuts", choices=emdppl.samplers())
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/eight_schools")
    parser.add_argument("--smoke", action="store_true", help="100 warm-up and 100 draws")
    args = parser.parse_args()
    if args.smoke:
        args.num_warmup = args.num_samples = 100
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    algorithm = emdppl.MCMC(
        args.sampler,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
    )
    for form in ("auxiliary", "centered"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            idata = emdppl.infer(
                eight_schools,
                algorithm,
                model_kwargs=EIGHT_SCHOOLS,
                rng_key=args.seed,
                auxiliary=form == "auxiliary",
            )
        print(f"\n== {form} form, {algorithm}")
        print(az.summary(idata, var_names=["mu", "tau", "theta"]))
        for w in caught:
            print("warning:", w.message)
        az.plot_rank(idata, var_names=["mu", "tau"])
        plt.savefig(out / f"rank_{form}.png", dpi=90)
        plt.close("all")
    print(f"\nplots in {out}")


if __name__ == "__main__":
    main()
