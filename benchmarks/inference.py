"""MCMC vs SVI vs EMD through ``emdppl.infer``: accuracy against the reference vs wall time,
and the cost of 10k more posterior draws once the method is fitted.

Every method is one cold ``emdppl.infer`` call on the auxiliary form of the model: NUTS
(``emdppl.MCMC("nuts")``), SVI with a full-rank Gaussian guide
(``emdppl.SVI("auto_multivariate_normal")``) and EM distillation into a one-step generator
(``emdppl.EMD()``). The draws are scored against the model's reference (``models.py``) with
``samplers.score``. See ``benchmarks/README.md`` for the metrics and the measured table.

    python -m benchmarks.inference            # eight_schools, banana; ~10 min on 2 loaded cores
    python -m benchmarks.inference --smoke    # banana, small settings, ~1 min of CPU
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import jax
import matplotlib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.models import SAMPLER_MODELS, Reference  # noqa: E402
from benchmarks.samplers import score  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("mcmc", "svi", "emd")
DEFAULT_MODELS = ("eight_schools", "banana")
EXTRA_DRAWS = 10_000
SETTINGS = {
    "mcmc": {"num_chains": 4, "num_warmup": 500, "num_samples": 1000},
    "svi": {"num_steps": 5000, "num_samples": 4000},
    "emd": {"num_steps": 1000, "num_samples": 4000},
}
SMOKE_SETTINGS = {
    "mcmc": {"num_chains": 2, "num_warmup": 100, "num_samples": 200},
    "svi": {"num_steps": 300, "num_samples": 400},
    "emd": {"num_steps": 60, "num_samples": 400},
}


def algorithm(method: str, settings: dict):
    """The ``emdppl.infer`` algorithm object of ``method`` with ``settings[method]``."""
    options = settings[method]
    if method == "mcmc":
        return emdppl.MCMC("nuts", **options)
    if method == "svi":
        return emdppl.SVI("auto_multivariate_normal", **options)
    return emdppl.EMD(**options)


def standardized_error(draws: dict, reference: Reference, var_names: tuple[str, ...]) -> float:
    """max over scalars of |mean - mean_ref| / sd_ref: the error in posterior sds, which unlike
    z does not grow with the number of draws of a biased method."""
    errors = [
        np.ravel(np.abs(np.asarray(draws[k], float).mean(axis=(0, 1)) - reference[k]["mean"])
                 / reference[k]["sd"])
        for k in var_names
    ]
    return float(np.max(np.concatenate(errors)))


def _seconds(fn, key, repeats: int = 21) -> float:
    """Median wall seconds of ``repeats`` warm calls of ``fn(key)`` (a first call compiles it)."""
    jax.block_until_ready(fn(jax.random.fold_in(key, 0)))
    seconds = []
    for i in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(fn(jax.random.fold_in(key, i)))
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def extra_draws_seconds(method: str, name: str, kwargs: dict, settings: dict, idata, seed: int):
    """Seconds for ``EXTRA_DRAWS`` more constrained posterior draws after fitting, and how.

    MCMC: a second, warm ``emdppl.infer`` call (same shapes, so nothing recompiles); its
    ``sampling_seconds`` is pure sampling with the tuned kernel, scaled to 10k draws over all
    chains. SVI: ``SVIResult.sample_posterior(key, 10k)`` (guide draws pushed through the model)
    of the same guide, fitted for one step: the cost of a draw does not depend on the fitted
    values. EMD: ``EMDResult.sample_posterior(key, 10k)`` of the same generator, fitted for one
    step (raw one-step draws; importance resampling would add one log density per pool draw).
    """
    bench = SAMPLER_MODELS[name]
    key = jax.random.key(seed + 1000)
    if method == "mcmc":
        warm = emdppl.infer(bench.model, algorithm("mcmc", settings), model_kwargs=kwargs,
                            rng_key=seed + 1, progress_bar=False)
        attrs = warm.posterior.attrs
        num_draws = settings["mcmc"]["num_chains"] * settings["mcmc"]["num_samples"]
        return (float(attrs["sampling_seconds"]) * EXTRA_DRAWS / num_draws,
                f"warm infer: sampling_seconds x {EXTRA_DRAWS}/{num_draws}")
    if method == "svi":
        fitted = emdppl.SVI("auto_multivariate_normal", num_steps=1).fit(
            seed, bench.model, model_kwargs=kwargs, progress_bar=False
        )
        return (_seconds(lambda k: fitted.sample_posterior(k, EXTRA_DRAWS), key),
                "SVIResult.sample_posterior(key, 10k)")
    fitted = emdppl.EMD(num_steps=1, fallback_generator=None, num_samples=8).fit(
        seed, bench.model, model_kwargs=kwargs, progress_bar=False
    )

    def draw(k):
        return fitted.sample_posterior(k, EXTRA_DRAWS, importance_resampling=False)

    return _seconds(draw, key), "EMDResult.sample_posterior(key, 10k), one-step draws"


def run_method(method: str, name: str, settings: dict, seed: int) -> dict:
    """One cold ``emdppl.infer`` call, its scores, and the cost of 10k more draws."""
    bench = SAMPLER_MODELS[name]
    kwargs, reference = bench.load_kwargs(), bench.reference()
    start = time.perf_counter()
    idata = emdppl.infer(bench.model, algorithm(method, settings), model_kwargs=kwargs,
                         rng_key=seed, progress_bar=False)
    wall = time.perf_counter() - start
    draws = {k: idata.posterior[k].values for k in bench.var_names}
    extra, how = extra_draws_seconds(method, name, kwargs, settings, idata, seed)
    scores = score(draws, reference, bench.var_names)
    num_draws = int(idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"])
    # Effective draws: MCMC's smallest bulk ESS; SVI and EMD draws are independent.
    ess_fraction = min(1.0, scores["ess_bulk_min"] / num_draws) if method == "mcmc" else 1.0
    row = {
        "model": name,
        "method": method,
        "wall_seconds": wall,
        "compile_seconds": float(idata.posterior.attrs.get("compile_seconds", float("nan")))
        if method != "emd" else None,
        "num_draws": num_draws,
        "max_abs_z": scores["max_abs_z"],
        "max_std_error": standardized_error(draws, reference, bench.var_names),
        "sd_ratio_min": scores["sd_ratio_min"],
        "sd_ratio_max": scores["sd_ratio_max"],
        "rhat_max": scores["rhat_max"] if method == "mcmc" else None,
        "ess_bulk_min": scores["ess_bulk_min"],
        "extra_10k_seconds": extra,
        "extra_10k_effective_seconds": extra / ess_fraction if ess_fraction > 0 else float("inf"),
        "extra_10k_how": how,
    }
    print(_format_row(row), file=sys.stderr, flush=True)
    return row


_HEADER = (
    f"{'model':<14} {'method':<5} {'wall s':>7} {'max|z|':>7} {'max|dm|/sd':>10} "
    f"{'sd ratio':>11} {'10k draws s':>11} {'10k eff. s':>10} {'vs EMD':>8}"
)


def _format_row(r: dict) -> str:
    vs = f"{r['extra_vs_emd']:.0f}x" if "extra_vs_emd" in r else "-"
    return (
        f"{r['model']:<14} {r['method']:<5} {r['wall_seconds']:>7.1f} {r['max_abs_z']:>7.1f} "
        f"{r['max_std_error']:>10.3f} {r['sd_ratio_min']:>5.2f}-{r['sd_ratio_max']:<5.2f} "
        f"{r['extra_10k_seconds']:>11.2e} {r['extra_10k_effective_seconds']:>10.2e} {vs:>8}"
    )


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (max |mean diff| / sd_ref) vs wall seconds, one marker per method, one colour
    per model; and the seconds per 10k extra draws."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    markers = {"mcmc": "o", "svi": "s", "emd": "^"}
    for r in rows:
        ax.scatter(r["wall_seconds"], max(r["max_std_error"], 1e-4), color=colors[r["model"]],
                   marker=markers[r["method"]], s=60)
        ax.annotate(r["method"], (r["wall_seconds"], max(r["max_std_error"], 1e-4)), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="wall seconds of the cold infer call",
           ylabel="max |mean - mean_ref| / sd_ref", title="accuracy vs time (lower-left better)")
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        values = [next((r["extra_10k_seconds"] for r in rows
                        if r["model"] == m and r["method"] == method), np.nan) for m in models]
        bx.bar(np.arange(len(models)) + (i - 1) * width, values, width, label=method)
    bx.set_xticks(range(len(models)), models)
    bx.set(yscale="log", ylabel="seconds per 10k more draws", title="cost of extra draws")
    bx.legend()
    handles = [plt.Line2D([], [], ls="", marker=m, color="gray") for m in markers.values()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c) for c in colors.values()]
    ax.legend(handles, [*markers, *models], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(
        __doc__, smoke_help="banana; NUTS 2 x (100 + 200), SVI 300 steps, EMD 60 steps"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SAMPLER_MODELS),
                        default=list(DEFAULT_MODELS))
    args = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    if args.smoke:
        args.models = ["banana"]
    out = common.output_dir(args)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        rows = [run_method(m, name, settings, args.seed) for name in args.models for m in METHODS]
    for row in rows:
        emd_row = next(r for r in rows if r["model"] == row["model"] and r["method"] == "emd")
        row["extra_vs_emd"] = row["extra_10k_seconds"] / emd_row["extra_10k_seconds"]
    common.print_rows(_HEADER, rows, _format_row)
    report = common.make_report(
        {**settings, "seed": args.seed, "models": args.models, "mcmc_sampler": "nuts",
         "svi_guide": "auto_multivariate_normal", "extra_draws": EXTRA_DRAWS},
        total_seconds=time.perf_counter() - start,
        rows=rows,
    )
    common.save_report(out, "inference", report, plot, rows)
    return report


if __name__ == "__main__":
    main()
