"""EMD vs a reference posterior: ``emdppl.infer(model, emdppl.EMD())`` with its defaults.

Models: NumPyro's examples (baseball logit, zero-inflated Poisson, GP hyperparameters; reference:
NUTS in the same process, 4 x 1000 draws; horseshoe regression, reference: the exact Gibbs
sampler of ``horseshoe_gibbs.py``, as NUTS diverges on it) and posteriordb posteriors
(eight schools, arK, kilpisjarvi, low_dim_gauss_mix, the seven earnings / kidiq regressions and
the two ODE models of ``posteriordb_models.py``; reference: posteriordb's draws). Per model:
max over scalar components of |mean - mean_ref| / sd_ref and of |log(sd / sd_ref)| of the
returned (importance-resampled) draws, and for references with draws (NUTS; posteriordb's
stored draws of the ODE models; the horseshoe's Gibbs draws) the same with every positive site
on the log scale
(``*_unconstrained``: a heavy right tail has no estimable sd on the natural scale);
``--no-importance-resampling`` for the raw generator's draws; skipped (NaN) steps, PSIS k-hat
and importance ESS, whether EMD warned, wall seconds; the two errors per site too
(``site_errors``).
Writes ``emd_posteriors.json`` and ``.png``.

    .venv/bin/python -m benchmarks.emd_posteriors            # all models, ~45 min on 2 cores
    .venv/bin/python -m benchmarks.emd_posteriors --smoke    # eight schools, 30 steps
    .venv/bin/python -m benchmarks.emd_posteriors --models baseball_logit --out DIR
    .venv/bin/python -m benchmarks.emd_posteriors --option num_estep_steps=4 --out DIR
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks.common import (  # noqa: E402
    argument_parser,
    make_report,
    output_dir,
    print_rows,
    save_report,
)
from benchmarks.models import (  # noqa: E402
    NUMPYRO_EXAMPLE_MODELS,
    SAMPLER_MODELS,
    BenchmarkModel,
)
from benchmarks.posteriordb_models import ARM_REGRESSIONS, ODE_MODELS  # noqa: E402

MODELS = {
    **NUMPYRO_EXAMPLE_MODELS,
    **{k: SAMPLER_MODELS[k] for k in ("eight_schools", "arK", "kilpisjarvi", "low_dim_gauss_mix")},
    **ARM_REGRESSIONS,
    **ODE_MODELS,
}

#: Models whose stored reference is an exact Gibbs sampler's draws, not posteriordb's.
GIBBS_REFERENCES = {"horseshoe_regression": "gibbs"}


def _flat(draws: np.ndarray) -> np.ndarray:
    """``(chain, draw, ...)`` -> ``(chain * draw, components)``."""
    return draws.reshape(draws.shape[0] * draws.shape[1], -1)


def nuts_reference(bench: BenchmarkModel, kwargs: dict, seed: int) -> dict:
    """``{site: {"mean", "sd"} (components,)}`` from emdppl NUTS, 4 chains x 1000 draws."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = emdppl.infer(
            bench.model, emdppl.MCMC("nuts"), model_kwargs=kwargs, rng_key=seed + 1000,
            progress_bar=False,
        )
    divergences = int(idata.sample_stats["diverging"].values.sum())
    draws = {site: _flat(idata.posterior[site].values) for site in bench.var_names}
    return {
        "sites": _moments(draws),
        "unconstrained": _moments(_unconstrained(draws)),
        "divergences": divergences,
    }


def _moments(draws: dict) -> dict:
    return {site: {"mean": x.mean(0), "sd": x.std(0)} for site, x in draws.items()}


def _unconstrained(draws: dict, positive: set | None = None) -> dict:
    """The draws with every positive site (all reference draws > 0; ``positive``, when
    given, names them) on the log scale, where a heavy right tail has a finite, estimable sd."""
    if positive is None:
        positive = {site for site, x in draws.items() if np.all(x > 0)}
    return {site: np.log(x) if site in positive else x for site, x in draws.items()}


def stored_reference(bench: BenchmarkModel) -> dict:
    """posteriordb's moments, flattened to components; with its draws where they are stored,
    the moments with every positive site on the log scale too."""
    ref = bench.reference()
    sites = {
        site: {"mean": np.ravel(ref[site]["mean"]), "sd": np.ravel(ref[site]["sd"])}
        for site in bench.var_names
    }
    out = {"sites": sites, "divergences": 0}
    if bench.reference_draws is not None:
        draws = bench.reference_draws()
        draws = {site: draws[site].reshape(len(draws[site]), -1) for site in bench.var_names}
        out["unconstrained"] = _moments(_unconstrained(draws))
    return out


def site_errors(draws: dict, reference: dict) -> dict[str, tuple[float, float]]:
    """``{site: (max |dm| / sd_ref, max |log sd ratio|)}`` over the site's components."""
    out = {}
    for site, ref in reference.items():
        mean, sd = draws[site].mean(0), draws[site].std(0)
        out[site] = (
            float(np.max(np.abs(mean - ref["mean"]) / ref["sd"])),
            float(np.max(np.abs(np.log(sd / ref["sd"])))),
        )
    return out


def errors(draws: dict, reference: dict) -> tuple[float, float]:
    """``(max |dm| / sd_ref, max |log sd ratio|)`` over every component of every site."""
    per_site = site_errors(draws, reference).values()
    return max(e[0] for e in per_site), max(e[1] for e in per_site)


def run_model(name: str, seed: int, emd_options: dict) -> dict:
    """One row: EMD with defaults (``emd_options`` added) against the model's reference."""
    bench = MODELS[name]
    kwargs = {k: np.asarray(v) for k, v in bench.load_kwargs().items()}
    t0 = time.perf_counter()
    reference = stored_reference(bench) if bench.reference else nuts_reference(bench, kwargs, seed)
    reference_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idata = emdppl.infer(
                bench.model, emdppl.EMD(num_samples=4000, **emd_options), model_kwargs=kwargs,
                rng_key=seed, progress_bar=False,
            )
            error = None
        except FloatingPointError as exc:
            idata, error = None, str(exc)
    wall = time.perf_counter() - t0
    emd_warnings = [str(w.message)[:160] for w in caught if "emdppl" in str(w.filename)
                    or "generator" in str(w.message)]
    label = GIBBS_REFERENCES.get(name, "posteriordb") if bench.reference else "nuts"
    row = {"model": name, "reference": label,
           "reference_divergences": reference["divergences"],
           "reference_seconds": round(reference_seconds, 1), "wall_seconds": round(wall, 1),
           "error": error, "warnings": emd_warnings}
    if idata is None:
        return row
    draws = {site: _flat(idata.posterior[site].values) for site in bench.var_names}
    row.update(
        zip(("max_abs_dm_over_sd", "max_abs_log_sd_ratio"), errors(draws, reference["sites"]),
            strict=True)
    )
    row["site_errors"] = site_errors(draws, reference["sites"])
    if "unconstrained" in reference:  # positive sites on the log scale too (references with draws)
        positive = {
            site for site in draws if not np.allclose(
                reference["unconstrained"][site]["mean"], reference["sites"][site]["mean"]
            )
        }
        row["positive_sites"] = sorted(positive)
        log_draws = _unconstrained(draws, positive)
        row.update(
            zip(
                ("max_abs_dm_over_sd_unconstrained", "max_abs_log_sd_ratio_unconstrained"),
                errors(log_draws, reference["unconstrained"]),
                strict=True,
            )
        )
        row["site_errors_unconstrained"] = site_errors(log_draws, reference["unconstrained"])
    row["generator"] = str(idata.posterior.attrs["generator"])
    if "fallback_pareto_k" in idata.posterior.attrs:
        row["fallback_pareto_k"] = float(idata.posterior.attrs["fallback_pareto_k"])
    row["importance_ess"] = float(idata.posterior.attrs["importance_ess"])
    row["importance_resampled"] = int(idata.posterior.attrs["importance_resampled"])
    row["pareto_k"] = float(idata.posterior.attrs["pareto_k"])
    row["skipped_steps"] = int(idata.posterior.attrs["num_skipped_steps"])
    return row


def _format(row: dict) -> str:
    if row.get("error"):
        return f"{row['model']:22s} ERROR {row['error'][:60]}"
    return (
        f"{row['model']:22s} {row['max_abs_dm_over_sd']:6.3f} {row['max_abs_log_sd_ratio']:6.3f} "
        f"{row['importance_ess']:7.0f} {row['pareto_k']:5.2f} "
        f"{row['skipped_steps']:4d} {row['wall_seconds']:7.1f} {len(row['warnings']):3d}"
        + (f"  log-scale {row['max_abs_dm_over_sd_unconstrained']:6.3f} "
           f"{row['max_abs_log_sd_ratio_unconstrained']:6.3f}"
           if "max_abs_dm_over_sd_unconstrained" in row else "")
    )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("error")]
    fig, ax = plt.subplots(figsize=(8, 3.5), constrained_layout=True)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["max_abs_dm_over_sd"] for r in rows], 0.4, label="max |dm|/sd")
    ax.bar(x + 0.2, [r["max_abs_log_sd_ratio"] for r in rows], 0.4, label="max |log sd ratio|")
    ax.set_xticks(x, [r["model"] for r in rows], rotation=30, ha="right")
    ax.axhline(0.2, color="k", lw=0.5)
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argument_parser(__doc__, "eight schools only, 30 EMD steps")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-importance-resampling", action="store_true")
    parser.add_argument("--update-z", action="store_true",
                        help="EMD(update_z=True): z sampled in the E-step (mass covering)")
    parser.add_argument("--option", nargs="*", default=[], metavar="NAME=VALUE",
                        help="more emdppl.EMD options, VALUE as JSON (num_estep_steps=4)")
    args = parser.parse_args()
    out = output_dir(args)
    names = args.models
    options = {"importance_resampling": not args.no_importance_resampling}
    if args.update_z:
        options["update_z"] = True
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    if args.smoke:
        names = ["eight_schools"]
        options.update(num_steps=30, num_probe_draws=5)
    rows = []
    for name in names:
        rows.append(run_model(name, args.seed, options))
        print(_format(rows[-1]), flush=True)
    print_rows(
        "model                  dm/sd  |lsr|  IS ess k-hat skip  wall s warn", rows,
        _format,
    )
    report = make_report({"seed": args.seed, "smoke": args.smoke, "emd_options": options},
                         rows=rows)
    save_report(out, "emd_posteriors", report, _plot, rows)


if __name__ == "__main__":
    main()
