"""Correct or loud: every posterior with a reference x every exact sampler, at default settings.

Each cell is one cold ``emdppl.infer(model, emdppl.MCMC(sampler), model_kwargs=..., rng_key=seed)``
call with every setting at its default (4 chains, 1000 warm-up + 1000 draws, the sampler's
default start). A cell **agrees** with the reference when, for every scalar of the compared
sites,

- ``|z| < 4`` for the mean and for E[x^2], ``z = (estimate - reference) / sqrt(mcse^2 +
  mcse_ref^2)``, the run's MCSE from its ESS (ArviZ), the reference's from posteriordb (or
  Inference Gym; 0 for analytic and quadrature references). A correct sampler fails one such
  check with two-sided probability 6.3e-5, so a cell of ``k`` scalars falsely disagrees with
  probability at most ``2 k * 6.3e-5`` (Bonferroni; 0.3% for diamonds' 26 scalars);
- the sd within 10% of the reference sd (``|log(sd / sd_ref)| < 0.1``), widened to 4 relative
  MCSEs of the run's own sd where that is wider (a z-test on log sd: a heavy-tailed site's sd
  is not known to 10% from 4000 draws).

A cell **warned** when emdppl said so: ``idata.posterior.attrs["warnings"]`` is non-empty or
an ``emdppl.*`` RuntimeWarning was raised. Cells: "ok" (agrees, no warning), "warned (right)",
"warned (wrong)", "SILENT WRONG" (disagrees, no warning: the failure this sweep counts), and
"error" (the call raised, which is loud too). Posteriors are split into those the defaults were
tuned on (``TUNED``) and held-out ones. See ``benchmarks/README.md`` for the measured table.

    python -m benchmarks.sweep                  # everything, about 1-2 h on 2 shared cores
    python -m benchmarks.sweep --smoke          # the regression, mala + nuts, 2 x (200 + 200)
    python -m benchmarks.sweep --posteriors regression eight_schools --samplers mala barker
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import arviz as az
import jax
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.models import DATA_DIR, SAMPLER_MODELS  # noqa: E402
from benchmarks.posteriordb_models import ARM_POSTERIORS, ARM_REGRESSIONS  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SAMPLERS = ("nuts", "hmc", "mala", "barker", "mclmc")
Z_MAX = 4.0  # two-sided p = 6.3e-5 per check under a correct sampler
SD_TOLERANCE = 0.10
#: The posteriors the defaults were tuned on; every other one is held out.
TUNED = ("regression", "eight_schools")
POSTERIORDB = DATA_DIR / "posteriordb"
CELLS = ("ok", "warned (right)", "warned (wrong)", "SILENT WRONG", "error")


class Reference(NamedTuple):
    """Per site, arrays of the site's shape: E[x] and E[x^2] with their MCSE (0 when exact)."""

    mean: dict[str, np.ndarray]
    mean_mcse: dict[str, np.ndarray]
    square: dict[str, np.ndarray]
    square_mcse: dict[str, np.ndarray]


class Posterior(NamedTuple):
    """A model, a loader of its keyword arguments, the sites compared and their reference;
    ``mean_only`` sites are compared on their means alone (see :data:`POSTERIORS`)."""

    model: Callable
    load_kwargs: Callable[[], dict]
    var_names: tuple[str, ...]
    reference: Callable[[], Reference]
    mean_only: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# The regression of the issue "Correct or loud", with an exact reference by quadrature


def regression(X, y=None):  # noqa: N803
    r""":math:`\beta \sim N(0, 10^2 I_5)`, :math:`\sigma \sim \mathrm{HalfNormal}(10)`,
    :math:`y \sim N(X \beta, \sigma^2)`; ``X`` (100, 5) with column scale 200, ``y`` (100,)."""
    beta = numpyro.sample("beta", dist.Normal(0, 10).expand([X.shape[1]]))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10))
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def _regression_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5)) * 200
    return {"X": x, "y": x @ rng.normal(size=5) * 0.01 + rng.normal(size=100)}


def _regression_reference() -> Reference:
    r"""Exact moments: :math:`\beta \mid \sigma, y` is Gaussian and :math:`p(\sigma \mid y)
    \propto \mathrm{HalfNormal}(\sigma; 10)\, N(y; 0, \sigma^2 I + 100 X X^\top)` is integrated on a
    grid of 20001 points over :math:`\pm 12` posterior sds (float64)."""
    data = _regression_data()
    x, y = data["X"], data["y"]
    xtx, xty = x.T @ x, x.T @ y
    eig = np.linalg.eigvalsh(100.0 * x @ x.T)
    u = np.linalg.eigh(100.0 * x @ x.T)[1]
    uy2 = (u.T @ y) ** 2

    def log_post(s):
        var = s**2 + eig
        return -0.5 * np.sum(np.log(var) + uy2 / var) - s**2 / 200.0

    coarse = np.linspace(0.2, 5.0, 2001)
    lp = np.array([log_post(s) for s in coarse])
    w = np.exp(lp - lp.max())
    mean0 = np.sum(w * coarse) / w.sum()
    sd0 = np.sqrt(np.sum(w * coarse**2) / w.sum() - mean0**2)
    grid = np.linspace(max(mean0 - 12 * sd0, 1e-6), mean0 + 12 * sd0, 20001)
    lp = np.array([log_post(s) for s in grid])
    w = np.exp(lp - lp.max())
    w /= w.sum()
    beta_mean, beta_square = np.zeros(5), np.zeros(5)
    for s, weight in zip(grid, w, strict=True):
        cov = np.linalg.inv(xtx / s**2 + np.eye(5) / 100.0)
        m = cov @ xty / s**2
        beta_mean += weight * m
        beta_square += weight * (m**2 + np.diag(cov))
    mean = {"beta": beta_mean, "sigma": np.sum(w * grid)}
    square = {"beta": beta_square, "sigma": np.sum(w * grid**2)}
    zero = {k: np.zeros_like(v) for k, v in mean.items()}
    return Reference(mean, zero, square, zero)


def posteriordb_reference(posterior: str) -> Reference:
    """E[x] and E[x^2], each with its MCSE, from posteriordb's summary statistics; Stan's
    ``beta[i]`` (1-based) becomes ``beta[i - 1]``."""
    means = json.loads((POSTERIORDB / "mean_value" / f"{posterior}.json").read_text())
    squares = json.loads((POSTERIORDB / "mean_squared_value" / f"{posterior}.json").read_text())
    assert means["names"] == squares["names"], posterior
    out: tuple[dict, ...] = ({}, {}, {}, {})
    values = (
        means["mean_value"],
        means["mcse_mean"],
        squares["mean_squared_value"],
        squares["mcse_mean"],
    )
    for i, name in enumerate(means["names"]):
        site = name.split("[")[0]
        for table, column in zip(out, values, strict=True):
            table.setdefault(site, []).append(column[i])
    vectors = {name.split("[")[0] for name in means["names"] if "[" in name}
    return Reference(
        *(
            {k: np.asarray(v if k in vectors else v[0], float) for k, v in table.items()}
            for table in out
        )
    )


def _from_benchmark(name: str) -> Reference:
    """A ``benchmarks.models`` reference (mean, sd, MCSE of the mean) as E[x] and E[x^2].

    The MCSE of E[x^2] is taken from the reference's own ESS, ``ESS = sd^2 / mcse^2``, and the
    normal approximation ``Var(x^2) = 2 sd^4 + 4 mean^2 sd^2`` (0 for exact references)."""
    reference = SAMPLER_MODELS[name].reference()
    mean = {k: np.asarray(v["mean"], float) for k, v in reference.items()}
    sd = {k: np.asarray(v["sd"], float) for k, v in reference.items()}
    mcse = {k: np.asarray(v["mcse"], float) for k, v in reference.items()}
    square = {k: sd[k] ** 2 + mean[k] ** 2 for k in mean}
    square_mcse = {}
    for k in mean:
        ess = np.where(mcse[k] > 0, sd[k] ** 2 / np.where(mcse[k] > 0, mcse[k], 1.0) ** 2, np.inf)
        square_mcse[k] = np.sqrt((2 * sd[k] ** 4 + 4 * mean[k] ** 2 * sd[k] ** 2) / ess)
    return Reference(mean, mcse, square, square_mcse)


def _benchmark(name: str, mean_only: tuple[str, ...] = ()) -> Posterior:
    bench = SAMPLER_MODELS[name]
    return Posterior(
        bench.model, bench.load_kwargs, bench.var_names, lambda: _from_benchmark(name), mean_only
    )


def _arm(name: str) -> Posterior:
    bench = ARM_REGRESSIONS[name]
    posterior = ARM_POSTERIORS[name]
    return Posterior(
        bench.model, bench.load_kwargs, bench.var_names, lambda: posteriordb_reference(posterior)
    )


POSTERIORS: dict[str, Posterior] = {
    "regression": Posterior(regression, _regression_data, ("beta", "sigma"), _regression_reference),
    **{
        name: _benchmark(name)
        for name in (
            "eight_schools",
            "arK",
            "kilpisjarvi",
            "low_dim_gauss_mix",
            "hmm_example",
            "diamonds",
        )
    },
    **{name: _arm(name) for name in ARM_REGRESSIONS},
    **{name: _benchmark(name) for name in ("german_credit", "banana", "brownian_motion")},
    "neals_funnel": _benchmark("neals_funnel", mean_only=("x",)),
}
"""Every posterior of ``/work/shared/reference`` that ports to NumPyro without an ODE solver.

Neal's funnel's ``x = exp(z / 2) * noise`` (``z ~ N(0, 3)``) is compared on its means only: its
E[x^2] = E[e^z] has an estimator whose variance rests on E[x^4] = 3 e^18 and whose MCSE,
estimated from 4000 draws, is far too small (the tail that carries it is rarely drawn), so the
z-test of E[x^2] fails for exact iid draws too (as in ``tests/test_samplers.py``). ``z`` is
compared in full."""


# --------------------------------------------------------------------------------------------
# Scoring


def agreement(
    draws: dict[str, np.ndarray], reference: Reference, mean_only: tuple[str, ...] = ()
) -> dict:
    """The checks of the module docstring on ``draws`` ``{site: (chain, draw, ...)}``: worst
    ``|z|`` of the means and of E[x^2], the sd ratios, and whether everything passed; the
    ``mean_only`` sites are checked on their means alone."""
    sites = list(reference.mean)
    x = az.convert_to_dataset({k: np.asarray(draws[k], float) for k in sites})
    x2 = az.convert_to_dataset({k: np.asarray(draws[k], float) ** 2 for k in sites})
    mcse, mcse2 = az.mcse(x, method="mean"), az.mcse(x2, method="mean")
    mcse_sd = az.mcse(x, method="sd")
    ess = az.ess(x, method="bulk")
    z_mean, z_square, ratio, ratio_tolerance = [], [], [], []
    for k in sites:
        values = x[k].values
        mean, square = values.mean(axis=(0, 1)), (values**2).mean(axis=(0, 1))
        z_mean.append(
            np.ravel((mean - reference.mean[k]) / np.hypot(mcse[k].values, reference.mean_mcse[k]))
        )
        if k in mean_only:
            continue
        z_square.append(
            np.ravel(
                (square - reference.square[k]) / np.hypot(mcse2[k].values, reference.square_mcse[k])
            )
        )
        sd_ref = np.sqrt(reference.square[k] - reference.mean[k] ** 2)
        sd = values.std(axis=(0, 1))
        ratio.append(np.ravel(sd / sd_ref))
        # |log(sd / sd_ref)| < 0.1, or < 4 relative MCSEs of the run's own sd (a z-test on
        # log sd) where that is wider: a heavy-tailed site's sd is not known to 10%
        ratio_tolerance.append(np.ravel(np.maximum(SD_TOLERANCE, Z_MAX * mcse_sd[k].values / sd)))
    z_mean, z_square = np.abs(np.concatenate(z_mean)), np.abs(np.concatenate(z_square))
    ratio, ratio_tolerance = np.concatenate(ratio), np.concatenate(ratio_tolerance)
    finite = bool(np.all(np.isfinite(z_mean)) and np.all(np.isfinite(z_square)))
    sd_ok = np.abs(np.log(ratio)) < ratio_tolerance
    return {
        "num_scalars": int(z_mean.size),
        "mean_only": list(mean_only),
        "max_abs_z_mean": float(np.max(z_mean)) if finite else float("inf"),
        "max_abs_z_square": float(np.max(z_square)) if finite else float("inf"),
        "sd_ratio_min": float(np.min(ratio)) if finite else 0.0,
        "sd_ratio_max": float(np.max(ratio)) if finite else 0.0,
        "sd_within_10_percent": bool(finite and np.all(np.abs(np.log(ratio)) < SD_TOLERANCE)),
        "min_ess_bulk": float(min(np.nanmin(ess[k].values) for k in sites)),
        "agrees": bool(
            finite and np.all(z_mean < Z_MAX) and np.all(z_square < Z_MAX) and np.all(sd_ok)
        ),
    }


def cell_label(agrees: bool, warned: bool) -> str:
    """One of :data:`CELLS` (but "error")."""
    if agrees:
        return "warned (right)" if warned else "ok"
    return "warned (wrong)" if warned else "SILENT WRONG"


def _attrs_warnings(idata) -> list[str]:
    found = idata.posterior.attrs.get("warnings", [])
    return json.loads(found) if isinstance(found, str) else list(found)


def run_cell(name: str, sampler: str, seed: int, settings: dict) -> dict:
    """One cold ``emdppl.infer`` call at default settings (``settings`` only shortens runs for
    ``--smoke``), scored against the reference."""
    posterior = POSTERIORS[name]
    row = {"posterior": name, "sampler": sampler, "tuned": name in TUNED}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            idata = emdppl.infer(
                posterior.model,
                emdppl.MCMC(sampler, **settings),
                model_kwargs=posterior.load_kwargs(),
                rng_key=seed,
                progress_bar=False,
            )
        except Exception as err:  # noqa: BLE001 (an error is a loud outcome, recorded)
            return {
                **row,
                "cell": "error",
                "error": f"{type(err).__name__}: {err}"[:500],
                "seconds": time.perf_counter() - start,
            }
    seconds = time.perf_counter() - start
    raised = [
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and str(w.message).startswith("emdppl.")
    ]
    messages = _attrs_warnings(idata)
    draws = {k: idata.posterior[k].values for k in posterior.reference().mean}
    score = agreement(draws, posterior.reference(), posterior.mean_only)
    warned = bool(messages or raised)
    return {
        **row,
        **score,
        "warned": warned,
        "warnings": messages or raised,
        "cell": cell_label(score["agrees"], warned),
        "seconds": seconds,
        "compile_seconds": float(idata.posterior.attrs.get("compile_seconds", 0.0)),
    }


# --------------------------------------------------------------------------------------------
# Report


def table(rows: list[dict], samplers: list[str]) -> str:
    """The markdown table: rows posteriors (tuned first), columns samplers."""
    cells = {(r["posterior"], r["sampler"]): r for r in rows}
    posteriors = list(dict.fromkeys(r["posterior"] for r in rows))
    posteriors.sort(key=lambda p: p not in TUNED)
    lines = [
        "| posterior | set | " + " | ".join(samplers) + " |",
        "|---|---|" + "---|" * len(samplers),
    ]
    for p in posteriors:
        entries = []
        for s in samplers:
            r = cells.get((p, s))
            if r is None:
                entries.append("-")
            elif r["cell"] == "error":
                entries.append("error")
            else:
                z = f"{r['max_abs_z_mean']:.1f}/{r['max_abs_z_square']:.1f}"
                entries.append(f"{r['cell']} ({z})")
        part = "tuned" if p in TUNED else "held-out"
        lines.append(f"| {p} | {part} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def counts(rows: list[dict]) -> dict:
    """Cells of each kind, for the tuned and the held-out posteriors."""
    out = {}
    for part, keep in (("tuned", True), ("held_out", False)):
        part_rows = [r for r in rows if r["tuned"] == keep]
        out[part] = {kind: sum(r["cell"] == kind for r in part_rows) for kind in CELLS}
    return out


def plot(rows: list[dict], path: Path) -> None:
    """The table as a coloured grid, one colour per kind of cell."""
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    posteriors = list(dict.fromkeys(r["posterior"] for r in rows))
    posteriors.sort(key=lambda p: p not in TUNED)
    colours = {
        "ok": "#4caf50",
        "warned (right)": "#c5e1a5",
        "warned (wrong)": "#ffb74d",
        "SILENT WRONG": "#d32f2f",
        "error": "#9e9e9e",
    }
    cells = {(r["posterior"], r["sampler"]): r["cell"] for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 * len(samplers) + 3, 0.42 * len(posteriors) + 1.5))
    for i, p in enumerate(posteriors):
        for j, s in enumerate(samplers):
            kind = cells.get((p, s))
            if kind is None:
                continue
            ax.add_patch(plt.Rectangle((j, i), 1, 1, color=colours[kind], ec="white"))
            ax.text(j + 0.5, i + 0.5, kind, ha="center", va="center", fontsize=6.5)
    ax.set_xlim(0, len(samplers))
    ax.set_ylim(len(posteriors), 0)
    ax.set_xticks(np.arange(len(samplers)) + 0.5, samplers)
    labels = [f"{p} (tuned)" if p in TUNED else p for p in posteriors]
    ax.set_yticks(np.arange(len(posteriors)) + 0.5, labels)
    ax.set_title("Default settings: agrees with the reference, or emdppl warned")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(
        __doc__, smoke_help="the regression, mala + nuts, 2 chains, 200 + 200"
    )
    parser.add_argument(
        "--posteriors", nargs="+", choices=sorted(POSTERIORS), default=list(POSTERIORS)
    )
    parser.add_argument("--samplers", nargs="+", choices=emdppl.samplers(), default=list(SAMPLERS))
    args = parser.parse_args(argv)
    settings: dict = {}  # the defaults: the point of the sweep
    if args.smoke:
        args.posteriors, args.samplers = ["regression"], ["nuts", "mala"]
        settings = {"num_chains": 2, "num_warmup": 200, "num_samples": 200}
    out = common.output_dir(args)
    # Rows are appended to a JSON-lines file as they finish, and a rerun with the same --out
    # skips the cells already there: a long sweep survives being stopped.
    progress = out / "sweep_rows.jsonl"
    done = (
        [json.loads(line) for line in progress.read_text().splitlines()]
        if (progress.exists() and not args.smoke)
        else []
    )
    done = {(r["posterior"], r["sampler"]): r for r in done}
    rows = []
    for name in args.posteriors:
        for sampler in args.samplers:
            if (name, sampler) in done:
                rows.append(done[name, sampler])
                continue
            row = run_cell(name, sampler, args.seed, settings)
            rows.append(row)
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
            detail = (
                row.get("error")
                or f"z {row['max_abs_z_mean']:.1f}/{row['max_abs_z_square']:.1f} sd "
                f"{row['sd_ratio_min']:.2f}-{row['sd_ratio_max']:.2f}"
            )
            print(
                f"{name:<24} {sampler:<7} {row['cell']:<15} {detail} ({row['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        jax.clear_caches()  # compiled code of every model would otherwise pile up in memory
    markdown = table(rows, args.samplers)
    summary = counts(rows)
    print(markdown)
    print(json.dumps(summary))
    report = common.make_report(
        {
            **settings,
            "seed": args.seed,
            "samplers": args.samplers,
            "z_max": Z_MAX,
            "sd_tolerance": SD_TOLERANCE,
            "tuned": list(TUNED),
        },
        rows=rows,
        counts=summary,
        table=markdown,
    )
    common.save_report(out, "sweep", report, plot, rows)
    return report


if __name__ == "__main__":
    main()
