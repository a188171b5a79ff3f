"""Sampler grid: models x samplers x {centered, auxiliary}, scored against gold standards.

Every cell is one cold ``emdppl.infer`` call (compile time reported apart from run time); each
model also gets NumPyro's own NUTS (vectorized chains, auxiliary form) as the baseline row. A
cell is "ok" when every posterior mean is within 4 MCSE of its reference (z uses the MCSE of
both sides; analytic and Kalman references have none), else "biased" with a reason. See
``benchmarks/README.md`` for the metrics and the measured grid.

    python -m benchmarks.samplers            # default grid, about 20 minutes on 2 cores
    python -m benchmarks.samplers --smoke    # banana, mala + ula, both forms, 2 chains, 200 + 200
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import arviz as az
import matplotlib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.models import SAMPLER_MODELS, BenchmarkModel, Reference  # noqa: E402
from emdppl.samplers import get_sampler  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FORMS = ("centered", "auxiliary")
#: The default grid fits in about 20 minutes on 2 shared cores; low_dim_gauss_mix, hmm_example,
#: diamonds and the samplers hmc, barker, mclmc, sgld, sghmc run when named.
DEFAULT_MODELS = (
    "eight_schools",
    "neals_funnel",
    "banana",
    "german_credit",
    "brownian_motion",
    "kilpisjarvi",
    "arK",
)
DEFAULT_SAMPLERS = ("nuts", "mala", "ula")
#: Unadjusted step, as a fraction of the adjusted sampler's step on the smallest posterior scale.
UNADJUSTED_STEP_SCALE = 0.5
Z_THRESHOLD = 4.0
RHAT_THRESHOLD = 1.05


def unadjusted_step_sizes(idata, sampler: str) -> dict[str, float]:
    r"""Step sizes of the unadjusted kernels from an adjusted run on the same model and form.

    The leapfrog step in the unpreconditioned coordinates, :math:`\epsilon_u = c\,\epsilon
    \min_i \sigma_i`, with :math:`c` = ``UNADJUSTED_STEP_SCALE``, :math:`\epsilon` the adapted
    step and :math:`\sigma_i^2` the adapted inverse mass matrix (NUTS; 1 for MALA, which has
    none), medians over chains. SGHMC moves by :math:`\epsilon_u` times a unit momentum; ULA and
    SGLD take the Langevin step :math:`h = \epsilon_u^2 / 2` (MALA's own parameterization).
    """
    parameters = json.loads(idata.posterior.attrs["sampler_parameters"])
    step = np.asarray(parameters["step_size"], float)
    if sampler == "nuts":
        inverse_mass = np.asarray(parameters["inverse_mass_matrix"], float)
        step = step * np.sqrt(inverse_mass.min(axis=-1))
    leapfrog = UNADJUSTED_STEP_SCALE * float(np.median(step))
    return {"ula": leapfrog**2 / 2, "sgld": leapfrog**2 / 2, "sghmc": leapfrog}


def run_cell(
    bench: BenchmarkModel,
    kwargs: dict,
    sampler: str,
    form: str,
    settings: dict,
    seed: int,
    step_size: float | None = None,
):
    """One cold ``emdppl.infer`` call; kernels without warm-up run ``num_warmup`` burn-in
    steps that are dropped, so every cell keeps ``num_samples`` draws after the same number of
    preliminary steps."""
    has_warmup = get_sampler(sampler).adapts
    options = {} if step_size is None else {"step_size": step_size}
    algorithm = emdppl.MCMC(
        sampler,
        num_warmup=settings["num_warmup"] if has_warmup else 0,
        num_samples=settings["num_samples"] + (0 if has_warmup else settings["num_warmup"]),
        num_chains=settings["num_chains"],
        **options,
    )
    idata = emdppl.infer(
        bench.model,
        algorithm,
        model_kwargs=kwargs,
        rng_key=seed,
        auxiliary=form == "auxiliary",
        progress_bar=False,
    )
    if not has_warmup:
        # drop the burn-in from every group with draws (both ArviZ generations; groups without
        # a draw dim, e.g. observed_data, are left as they are)
        idata = idata.isel(draw=slice(settings["num_warmup"], None), missing_dims="ignore")
    return idata


def score(draws: dict[str, np.ndarray], reference: Reference, var_names: tuple[str, ...]) -> dict:
    """ESS, R-hat, max |z| of the means and the sd ratio range over every scalar of
    ``var_names``; ``draws`` ``{site: (chain, draw, ...)}``."""
    dataset = az.convert_to_dataset({k: np.asarray(draws[k], float) for k in var_names})
    ess_bulk = az.ess(dataset, method="bulk")
    ess_tail = az.ess(dataset, method="tail")
    rhat = az.rhat(dataset)
    mcse = az.mcse(dataset, method="mean")
    z, sd_ratio = [], []
    for k in var_names:
        values = dataset[k].values
        ref = reference[k]
        diff = values.mean(axis=(0, 1)) - ref["mean"]
        z.append(np.ravel(diff / np.sqrt(mcse[k].values ** 2 + ref["mcse"] ** 2)))
        sd_ratio.append(np.ravel(values.std(axis=(0, 1)) / ref["sd"]))
    z, sd_ratio = np.abs(np.concatenate(z)), np.concatenate(sd_ratio)

    def low(stat):
        return float(min(np.nanmin(stat[k].values) for k in var_names))

    finite = bool(np.all(np.isfinite(z)))
    return {
        "ess_bulk_min": low(ess_bulk) if finite else 0.0,
        "ess_tail_min": low(ess_tail) if finite else 0.0,
        "rhat_max": float(max(np.max(rhat[k].values) for k in var_names)),
        "max_abs_z": float(np.max(z)) if finite else float("inf"),
        "sd_ratio_min": float(np.min(sd_ratio)),
        "sd_ratio_max": float(np.max(sd_ratio)),
        "is_finite": finite,
    }


def flag(row: dict, is_exact: bool) -> tuple[str, str]:
    """("ok", "") when max |z| < 4 and R-hat <= 1.05; ("unconverged", R-hat) when the means
    pass only because R-hat > 1.05 inflates their MCSE; else ("biased", the likely reasons)."""
    if row["max_abs_z"] < Z_THRESHOLD:
        if row["rhat_max"] <= RHAT_THRESHOLD:
            return "ok", ""
        return "unconverged", f"R-hat {row['rhat_max']:.2f} > {RHAT_THRESHOLD}"
    reasons = []
    if not row["is_finite"]:
        reasons.append("non-finite draws (unstable step)")
    if not is_exact:
        reasons.append("unadjusted kernel: step-size bias")
    if row["divergences"]:
        reasons.append(f"{row['divergences']} divergences")
    if not row["rhat_max"] <= RHAT_THRESHOLD:
        reasons.append(f"not converged (R-hat {row['rhat_max']:.2f})")
    return "biased", "; ".join(reasons) or "means off the reference"


def _rates(row: dict) -> dict:
    return {
        "ess_bulk_per_second": row["ess_bulk_min"] / row["run_seconds"],
        "ess_tail_per_second": row["ess_tail_min"] / row["run_seconds"],
        "ess_bulk_per_1000_grads": 1000.0 * row["ess_bulk_min"] / row["n_grad_evals"],
        "ess_tail_per_1000_grads": 1000.0 * row["ess_tail_min"] / row["n_grad_evals"],
    }


def emdppl_row(bench, reference, idata, sampler, form, step_size, step_source) -> dict:
    stats, attrs = idata.sample_stats, idata.posterior.attrs
    draws = {k: idata.posterior[k].values for k in bench.var_names}
    wall, compile_seconds = float(attrs["wall_seconds"]), float(attrs["compile_seconds"])
    row = {
        "sampler": sampler,
        "form": form,
        "step_size": step_size,
        "step_size_from": step_source,
        "n_grad_evals": int(stats["n_grad_evals"].values.sum()),
        "divergences": int(stats["diverging"].values.sum()) if "diverging" in stats else None,
        "wall_seconds": wall,
        "compile_seconds": compile_seconds,
        "run_seconds": wall - compile_seconds,
        **score(draws, reference, bench.var_names),
    }
    row.update(_rates(row))
    row["flag"], row["reason"] = flag(row, get_sampler(sampler).is_exact)
    return row


def numpyro_row(bench, reference, kwargs, settings, seed) -> dict:
    out = common.watched(lambda s: common.make_numpyro_runner(bench, settings)(kwargs, s), seed)
    row = {
        "sampler": "numpyro_nuts",
        "form": "auxiliary",
        "step_size": None,
        "step_size_from": None,
        "n_grad_evals": out["n_grad_evals"],
        "divergences": out["divergences"],
        "wall_seconds": out["seconds"],
        "compile_seconds": out["compile_seconds_in_run"],
        "run_seconds": out["seconds"] - out["compile_seconds_in_run"],
        **score(out["draws"], reference, bench.var_names),
    }
    row.update(_rates(row))
    row["flag"], row["reason"] = flag(row, is_exact=True)
    return row


def benchmark_model(name: str, samplers: list[str], forms: list[str], settings: dict, seed: int):
    """Rows of every (sampler, form) cell of one model, then its NumPyro baseline row."""
    bench = SAMPLER_MODELS[name]
    kwargs, reference = bench.load_kwargs(), bench.reference()
    forms = [f for f in forms if bench.has_centered_form or f == "auxiliary"]
    # Adjusted samplers first: the unadjusted ones take their step from them.
    samplers = sorted(samplers, key=lambda s: (not get_sampler(s).is_exact, s != "nuts"))
    rows = []
    for form in forms:
        steps, step_source = None, None
        for sampler in samplers:
            step_size = None
            # mclmc is unadjusted too, but tunes its own step.
            if sampler in ("ula", "sgld", "sghmc"):
                if steps is None:
                    step_source = "nuts warm-up (extra run)"
                    steps = unadjusted_step_sizes(
                        run_cell(bench, kwargs, "nuts", form, {**settings, "num_samples": 1}, seed),
                        "nuts",
                    )
                step_size = steps[sampler]
            idata = run_cell(bench, kwargs, sampler, form, settings, seed, step_size)
            if steps is None and sampler in ("nuts", "mala"):
                steps, step_source = unadjusted_step_sizes(idata, sampler), sampler
            source = step_source if step_size is not None else None
            row = emdppl_row(bench, reference, idata, sampler, form, step_size, source)
            print(_format_row(name, row), file=sys.stderr)
            rows.append(row)
    baseline = numpyro_row(bench, reference, kwargs, settings, seed)
    print(_format_row(name, baseline), file=sys.stderr)
    for row in rows + [baseline]:
        row["model"] = name
        row["bulk_per_second_vs_numpyro"] = (
            row["ess_bulk_per_second"] / baseline["ess_bulk_per_second"]
        )
    return rows + [baseline]


def aux_vs_centered(rows: list[dict]) -> list[dict]:
    """Per model with both forms and per sampler: auxiliary / centered ESS per gradient, and
    each form's divergences and R-hat."""
    cells = {(r["model"], r["sampler"], r["form"]): r for r in rows}
    out = []
    for (model, sampler, form), aux in cells.items():
        centered = cells.get((model, sampler, "centered"))
        if form != "auxiliary" or centered is None:
            continue
        out.append({
            "model": model,
            "sampler": sampler,
            "bulk_per_1000_grads_ratio": _ratio(
                aux["ess_bulk_per_1000_grads"], centered["ess_bulk_per_1000_grads"]
            ),
            "tail_per_1000_grads_ratio": _ratio(
                aux["ess_tail_per_1000_grads"], centered["ess_tail_per_1000_grads"]
            ),
            "divergences_centered": centered["divergences"],
            "divergences_auxiliary": aux["divergences"],
            "rhat_max_centered": centered["rhat_max"],
            "rhat_max_auxiliary": aux["rhat_max"],
            "max_abs_z_centered": centered["max_abs_z"],
            "max_abs_z_auxiliary": aux["max_abs_z"],
        })
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


_HEADER = (
    f"{'model':<17} {'sampler':<12} {'form':<9} {'step':>8} {'bulk/s':>8} {'tail/s':>8} "
    f"{'bulk/1kg':>8} {'tail/1kg':>8} {'R-hat':>6} {'div':>5} {'max|z|':>7} {'sd ratio':>11} "
    f"{'comp s':>6} {'run s':>6} {'x NP':>6} flag"
)


def _format_row(model: str, r: dict) -> str:
    step = f"{r['step_size']:.2g}" if r["step_size"] is not None else "-"
    div = "-" if r["divergences"] is None else str(r["divergences"])
    sd = f"{r['sd_ratio_min']:.2f}-{r['sd_ratio_max']:.2f}"
    vs = f"{r['bulk_per_second_vs_numpyro']:.2f}" if "bulk_per_second_vs_numpyro" in r else "-"
    return (
        f"{model:<17} {r['sampler']:<12} {r['form']:<9} {step:>8} "
        f"{r['ess_bulk_per_second']:>8.1f} {r['ess_tail_per_second']:>8.1f} "
        f"{r['ess_bulk_per_1000_grads']:>8.2f} {r['ess_tail_per_1000_grads']:>8.2f} "
        f"{r['rhat_max']:>6.3f} {div:>5} {r['max_abs_z']:>7.1f} {sd:>11} "
        f"{r['compile_seconds']:>6.1f} {r['run_seconds']:>6.1f} {vs:>6} "
        f"{r['flag']}{' (' + r['reason'] + ')' if r['reason'] else ''}"
    )


def print_table(rows: list[dict], comparisons: list[dict]) -> None:
    print(_HEADER)
    print("-" * len(_HEADER))
    for row in rows:
        print(_format_row(row["model"], row))
    if comparisons:
        print("\nauxiliary vs centered: ESS per gradient ratio (aux / centered), div, R-hat")
        for c in comparisons:
            print(
                f"{c['model']:<17} {c['sampler']:<8} bulk x{c['bulk_per_1000_grads_ratio']:.2f} "
                f"tail x{c['tail_per_1000_grads_ratio']:.2f}  div {c['divergences_centered']} -> "
                f"{c['divergences_auxiliary']}  R-hat {c['rhat_max_centered']:.3f} -> "
                f"{c['rhat_max_auxiliary']:.3f}"
            )


def plot(rows: list[dict], path: Path) -> None:
    """ESS bulk/s bars per sampler and form, one panel per model, log scale; flagged hatched."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    num_cols = min(3, len(models))
    num_rows = -(-len(models) // num_cols)
    fig, axes = plt.subplots(
        num_rows, num_cols, figsize=(5.2 * num_cols, 3.6 * num_rows), squeeze=False
    )
    colors = {"centered": "tab:orange", "auxiliary": "tab:blue"}
    for ax, model in zip(axes.flat, models, strict=False):
        cells = [r for r in rows if r["model"] == model and r["sampler"] != "numpyro_nuts"]
        samplers = list(dict.fromkeys(r["sampler"] for r in cells))
        for r in cells:
            i = samplers.index(r["sampler"])
            x = i + (-0.2 if r["form"] == "centered" else 0.2)
            biased = r["flag"] != "ok"
            value = max(r["ess_bulk_per_second"], 1e-2)
            ax.bar(x, value, 0.4, color=colors[r["form"]], hatch="//" if biased else None,
                   edgecolor="red" if biased else "black", alpha=0.5 if biased else 1.0)
            if biased:
                ax.text(x, value, r["flag"], rotation=90, ha="center", va="bottom", fontsize=7,
                        color="red")
        baseline = next(r for r in rows if r["model"] == model and r["sampler"] == "numpyro_nuts")
        ax.axhline(baseline["ess_bulk_per_second"], color="gray", ls="--", label="NumPyro NUTS")
        ax.set_xticks(range(len(samplers)), samplers)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("min bulk ESS / s (run)")
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    handles += [plt.Rectangle((0, 0), 1, 1, fc="white", ec="red", hatch="//"),
                plt.Line2D([], [], color="gray", ls="--")]
    fig.legend(handles, [*colors, "biased / unconverged", "NumPyro NUTS (aux)"],
               loc="lower center", ncol=4)
    fig.suptitle("Sampler grid: min bulk ESS per second of sampling run (higher is better)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(
        __doc__, smoke_help="banana, mala + ula, both forms, 2 chains, 200 + 200"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SAMPLER_MODELS),
                        default=list(DEFAULT_MODELS))
    parser.add_argument("--samplers", nargs="+", choices=emdppl.samplers(),
                        default=list(DEFAULT_SAMPLERS))
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS),
                        help="centered is skipped for models with nothing to center")
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.samplers, args.forms = ["banana"], ["mala", "ula"], list(FORMS)
        args.num_chains, args.num_warmup, args.num_samples = 2, 200, 200
    out = common.output_dir(args)

    settings = {
        "num_chains": args.num_chains,
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
    }
    with warnings.catch_warnings():
        # Divergences are in the table; centered sites left by auxiliary() are by design.
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        rows = [
            row
            for name in args.models
            for row in benchmark_model(name, args.samplers, args.forms, settings, args.seed)
        ]
    comparisons = aux_vs_centered(rows)
    print_table(rows, comparisons)
    report = common.make_report(
        {**settings, "seed": args.seed, "samplers": args.samplers, "forms": args.forms,
         "unadjusted_step_scale": UNADJUSTED_STEP_SCALE, "z_threshold": Z_THRESHOLD},
        rows=rows,
        aux_vs_centered=comparisons,
    )
    common.save_report(out, "samplers", report, plot, rows)
    return report


if __name__ == "__main__":
    main()
