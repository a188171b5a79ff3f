"""The ``emdppl demo`` command's work: a 2-D mixture distillation and NUTS on eight schools.

2-D mixtures (:func:`run_demo`): two exact Gaussian-mixture teachers (8 modes on a ring, 25 on
a grid) are distilled into one-step generators by EMD and by Diff-Instruct (same code,
``docs/EMD.md`` §6), and compared with exact draws and with the teacher's multi-step sampler
(DDIM at NFE 1, 2, 4, 18 and EDM Heun at NFE 35) on the exact score; writes a PNG panel,
``metrics.json`` and ArviZ summaries of the E-step chains.

Eight schools (:func:`eight_schools_demo`): NUTS on the auxiliary and the centered forms.
:func:`run_all` runs both parts side by side, prints their headline numbers and writes
``demo_metrics.json``.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import emdppl
from emdppl import digits, generators, schedule, teachers
from emdppl.base import as_key
from emdppl.models import EIGHT_SCHOOLS, eight_schools
from emdppl.timing import seconds_per_10k

__all__ = [
    "DISTILL_OPTIONS",
    "eight_schools_demo",
    "energy_distance",
    "mixtures",
    "mode_metrics",
    "format_table",
    "run_all",
    "run_demo",
    "teacher_draws",
]

#: Options of :func:`emdppl.distill` shared by both methods (``num_steps`` set by ``run_demo``).
DISTILL_OPTIONS: dict[str, Any] = {
    "batch_size": 128,
    "weighting": "sigma",
    "student_warmup_steps": 200,
}
#: EMD-only options: none, EMD runs at the library's defaults (K = 4, the residual estimator,
#: the Jacobian z step), which were chosen on generated mixtures, not on these two.
EMD_OPTIONS: dict[str, Any] = {}
LEARNING_RATE = 3e-3  # Adam, after clipping the gradient's global norm at 1
SIGMA_INIT = 0.5
#: Generator latent scale relative to ``sigma_data``, above ``from_teacher``'s default (~1.0),
#: which feeds the denoiser a Gaussian narrower than the grid's flat noisy marginal and so starves
#: its corner modes (measured at initialisation: see benchmarks/README.md).
INPUT_SCALE = 1.25
#: The teacher's multi-step sampler as ``(solver, num_steps)``: DDIM at NFE 1, 2, 4, 18 and Heun
#: at NFE 35 (EDM's default; at few steps DDIM is the more accurate, see ``ode_sample``).
TEACHER_SAMPLERS = (("ddim", 1), ("ddim", 2), ("ddim", 4), ("ddim", 18), ("heun", 18))
SOLVER_LABELS = {"ddim": "DDIM", "heun": "Heun"}
#: pyplot is not thread-safe: :func:`run_all` runs this demo next to the eight-schools one.
PLOT_LOCK = threading.Lock()


def mixtures() -> dict[str, teachers.GaussianMixture]:
    """The two teachers: ``ring8`` (radius 4, sd 0.25) and ``grid25`` (spacing 2, sd 0.2)."""
    angles = jnp.linspace(0, 2 * jnp.pi, 8, endpoint=False)
    ring = teachers.GaussianMixture(
        4 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1), jnp.full(8, 0.25), jnp.full(8, 1 / 8)
    )
    xx, yy = jnp.meshgrid(jnp.linspace(-4, 4, 5), jnp.linspace(-4, 4, 5))
    grid = teachers.GaussianMixture(
        jnp.stack([xx.ravel(), yy.ravel()], -1), jnp.full(25, 0.2), jnp.full(25, 1 / 25)
    )
    return {"ring8": ring, "grid25": grid}


def mode_metrics(teacher: teachers.GaussianMixture, x: Any) -> dict:
    """Mode masses of draws ``x (n, 2)``: a draw is on mode k when k is its nearest mode and it
    lies within ``3 sqrt(d)`` component sds of it; off-mode otherwise.

    Returns ``min_mass_ratio`` (min over modes of mass / weight), ``off_mode_fraction``,
    ``tv_mode_masses`` (total variation between on-mode masses and weights) and
    ``mass_ratios`` per mode.
    """
    x = np.asarray(x)
    locs, scales = np.asarray(teacher.locs), np.asarray(teacher.scales)[:, 0]
    weights = np.asarray(teacher.weights)
    dist = np.linalg.norm(x[:, None, :] - locs[None], axis=-1)
    nearest = dist.argmin(1)
    on_mode = dist[np.arange(len(x)), nearest] < 3 * np.sqrt(x.shape[1]) * scales[nearest]
    mass = np.bincount(nearest[on_mode], minlength=len(locs)) / len(x)
    return {
        "min_mass_ratio": float((mass / weights).min()),
        "off_mode_fraction": float(1 - on_mode.mean()),
        "tv_mode_masses": float(0.5 * np.abs(mass - weights).sum()),
        "mass_ratios": [round(float(r), 3) for r in mass / weights],
    }


@jax.jit
def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    r"""Energy distance :math:`2E\|X-Y\| - E\|X-X'\| - E\|Y-Y'\|` (V-statistic), ``x, y (n, d)``."""

    def mean_dist(a, b):
        return jnp.mean(jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1) + 1e-12))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def _row(teacher, x, exact, nfe, seconds, extra=None) -> dict:
    n = 2000
    return {
        "energy_distance": float(energy_distance(jnp.asarray(x[:n]), exact[:n])),
        "nfe": nfe,
        "seconds_per_10k_samples": seconds,
        **mode_metrics(teacher, x),
        **(extra or {}),
    }


def _distill(
    teacher, method, num_steps, rng_key, progress_bar=True
) -> tuple[emdppl.DistillResult, float]:
    generator = generators.from_teacher(
        teacher, key=jax.random.fold_in(rng_key, 7), sigma_init=SIGMA_INIT,
        input_scale=INPUT_SCALE * teacher.sigma_data,
    )
    options = {**DISTILL_OPTIONS, **(EMD_OPTIONS if method == "emd" else {})}
    start = time.perf_counter()
    result = emdppl.distill(
        teacher,
        generator,
        method=method,
        num_steps=num_steps,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(LEARNING_RATE)),
        rng_key=rng_key,
        progress_bar=progress_bar,
        num_probe_draws=100,
        **options,
    )
    return result, time.perf_counter() - start


def run_demo(
    out_dir: Path,
    *,
    smoke: bool = False,
    rng_key: int = 0,
    num_steps: int | None = None,
    progress_bar: bool = True,
) -> dict:
    """Run the demo and write ``panel.png``, ``metrics.json`` and ``estep_summary_*.csv``.

    Parameters
    ----------
    out_dir
        Output folder (created).
    smoke
        A short run that exercises every path: ring8 only, DDIM at NFE 1 and 2, and
        ``num_steps`` 30 by default (timing: see benchmarks/README.md).
    rng_key
        Seed.
    num_steps
        Distillation steps per run; default 1200 (30 with ``smoke``).
    progress_bar
        Show a tqdm bar per distillation run.

    Returns
    -------
    dict
        ``{mixture: {row: metrics}}`` with rows ``exact``, ``ddim_nfe{1,2,4,18}``,
        ``heun_nfe35``, ``emd``,
        ``diff_instruct``; as written to ``metrics.json``.
    """
    import arviz as az

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = as_key(rng_key)
    if num_steps is None:
        num_steps = 30 if smoke else 1200
    num_samples = 10_000  # also the timed batch: one compilation serves both
    teachers_ = mixtures()
    if smoke:
        teachers_ = {"ring8": teachers_["ring8"]}
    metrics: dict = {"num_distill_steps": num_steps, "distill_options": DISTILL_OPTIONS,
                     "emd_options": EMD_OPTIONS, "learning_rate": LEARNING_RATE,
                     "input_scale": INPUT_SCALE}
    draws: dict = {}
    for i, (name, teacher) in enumerate(teachers_.items()):
        k = jax.random.fold_in(key, i)
        exact = teacher.sample(jax.random.fold_in(k, 0), num_samples)
        rows = {"exact": _row(teacher, np.asarray(exact), teacher.sample(
            jax.random.fold_in(k, 1), num_samples), 0, float("nan"))}
        draws[name] = {"exact": np.asarray(exact)}
        samplers = TEACHER_SAMPLERS[:2] if smoke else TEACHER_SAMPLERS
        for row_name, label, nfe, x, seconds in teacher_draws(teacher, k, num_samples, samplers):
            rows[row_name] = _row(teacher, x, exact, nfe, seconds)
            draws[name][label] = x
        for method in ("emd", "diff_instruct"):
            result, train_seconds = _distill(
                teacher, method, num_steps, jax.random.fold_in(k, 3), progress_bar
            )
            x = np.asarray(result.sample(jax.random.fold_in(k, 4), num_samples))
            seconds = seconds_per_10k(lambda r, res=result: res.sample(r, 10_000), k)
            rows[method] = _row(teacher, x, exact, 1, seconds, {
                "train_seconds": train_seconds,
                "skipped_steps": int(result.state.num_skipped),
                "final_grad_norm": float(np.mean(result.history["grad_norm"][-50:])),
                "final_estep_drift": float(np.mean(result.history["estep_drift"][-50:])),
            })
            draws[name][method] = x
            summary = az.summary(result.estep_idata, kind="diagnostics")
            summary.to_csv(out_dir / f"estep_summary_{name}_{method}.csv")
        metrics[name] = rows
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with PLOT_LOCK:
        _panel(draws, out_dir / "panel.png")
    return metrics


def format_table(metrics: dict) -> str:
    """The rows of :func:`run_demo`'s ``metrics`` as a fixed-width text table."""
    lines = ["{:8} {:14} {:>8} {:>8} {:>6} {:>4} {:>8}".format(
        "mixture", "method", "energy", "min m/w", "off", "NFE", "s/10k")]
    for name, table in metrics.items():
        if not (isinstance(table, dict) and "exact" in table):
            continue
        for row, v in table.items():
            seconds = v["seconds_per_10k_samples"]
            lines.append(
                f"{name:8} {row:14} {v['energy_distance']:8.4f} {v['min_mass_ratio']:8.2f} "
                f"{v['off_mode_fraction']:6.3f} {v['nfe']:4d} {seconds:8.4f}"
            )
    return "\n".join(lines)


def teacher_draws(
    teacher: teachers.AbstractTeacher,
    rng_key: Any,
    num_samples: int,
    samplers: tuple[tuple[str, int], ...] = TEACHER_SAMPLERS,
):
    """The teacher's multi-step sampler at each ``(solver, num_steps)`` of ``samplers``.

    Yields ``(row_name, label, nfe, draws (num_samples, d), seconds per 10k draws)``, e.g.
    ``("ddim_nfe4", "DDIM NFE 4", 4, x, 0.01)``.
    """
    for solver, steps in samplers:
        nfe = schedule.num_function_evaluations(steps, solver)
        key = jax.random.fold_in(as_key(rng_key), nfe)
        x = np.asarray(teacher.sample_ode(key, num_samples, num_steps=steps, solver=solver))
        seconds = seconds_per_10k(
            lambda r, s=steps, v=solver: teacher.sample_ode(r, 10_000, num_steps=s, solver=v), key
        )
        yield f"{solver}_nfe{nfe}", f"{SOLVER_LABELS[solver]} NFE {nfe}", nfe, x, seconds


def _panel(draws: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(next(iter(draws.values())))
    fig, axes = plt.subplots(
        len(draws), len(columns), figsize=(2.6 * len(columns), 2.6 * len(draws)), squeeze=False
    )
    for row, (name, panels) in enumerate(draws.items()):
        for col, label in enumerate(columns):
            ax = axes[row, col]
            x = panels[label][:5000]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.3)
            ax.set(xlim=(-6, 6), ylim=(-6, 6), xticks=[], yticks=[])
            ax.set_title(f"{name}: {label}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eight_schools_demo(out_dir: Path, *, smoke: bool = False, rng_key: int = 0) -> dict:
    """NUTS on eight schools, auxiliary vs centered: ArviZ summaries, trace and rank plots.

    Writes ``eight_schools_summary.txt`` and ``eight_schools_{form}_{trace,rank}.png`` to
    ``out_dir`` (which must exist) and returns ``{form: headline numbers}`` (divergences, max
    R-hat, min bulk ESS, tau's mean, wall and compile seconds).
    """
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (
        dict(num_warmup=200, num_samples=200) if smoke else dict(num_warmup=1000, num_samples=1000)
    )
    algorithm = emdppl.MCMC("nuts", num_chains=4, target_accept=0.95, **size)
    results, text = {}, []
    for form, aux in (("auxiliary", True), ("centered", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the centered form's divergences
            idata = emdppl.infer(
                eight_schools,
                algorithm,
                model_kwargs=EIGHT_SCHOOLS,
                rng_key=rng_key,
                auxiliary=aux,
                progress_bar=False,  # the distillation's bars run next to it (see run_all)
            )
        summary = az.summary(idata, var_names=["mu", "tau", "theta"])
        results[form] = {
            "divergences": int(idata.sample_stats["diverging"].sum()),
            "max_r_hat": float(summary["r_hat"].max()),
            "min_ess_bulk": float(summary["ess_bulk"].min()),
            "tau_mean": float(summary.loc["tau", "mean"]),
            "wall_seconds": float(idata.posterior.attrs["wall_seconds"]),
            "compile_seconds": float(idata.posterior.attrs["compile_seconds"]),
        }
        text.append(f"== eight schools, {form} form, {algorithm}\n{summary.to_string()}\n")
        for kind, plot in (("trace", az.plot_trace), ("rank", az.plot_rank)):
            with PLOT_LOCK:
                plot(idata, var_names=["mu", "tau"])
                plt.gcf().suptitle(f"eight schools, {form} form: {kind}")
                plt.tight_layout()
                plt.savefig(out_dir / f"eight_schools_{form}_{kind}.png", dpi=90)
                plt.close("all")
    (out_dir / "eight_schools_summary.txt").write_text("\n".join(text))
    return results


def run_all(out_dir: Path, *, smoke: bool = False, rng_key: int = 0) -> dict:
    """The demos (``emdppl demo``): print their headline numbers, write ``demo_metrics.json``.

    Returns ``{"eight_schools": eight_schools_demo(...), "distillation": run_demo(...),
    "digits": run_digits(...)}``: the digits experiment of :mod:`emdppl.digits` at its
    ``"demo"`` scale (``"smoke"`` with ``smoke=True``), JAX teacher only, in ``out_dir/digits``.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The two parts are independent: run them in two threads, so that their (XLA, GIL-free)
    # compilations overlap on a multi-core machine (a first run is mostly compilation).
    with ThreadPoolExecutor(max_workers=1) as pool:
        distillation = pool.submit(
            run_demo, out_dir, smoke=smoke, rng_key=rng_key, progress_bar=True
        )
        schools = eight_schools_demo(out_dir, smoke=smoke, rng_key=rng_key)
        images = digits.run_digits(
            out_dir / "digits",
            scale="smoke" if smoke else "demo",
            rng_key=rng_key,
            torch_teacher=False,
            progress_bar=True,
        )
        metrics = {
            "eight_schools": schools,
            "distillation": distillation.result(),
            "digits": images,
        }
    for form, m in metrics["eight_schools"].items():
        print(
            f"eight schools NUTS, {form:9}: {m['divergences']:3d} divergences, max R-hat "
            f"{m['max_r_hat']:.2f}, min bulk ESS {m['min_ess_bulk']:.0f}, tau {m['tau_mean']:.2f}"
        )
    print(format_table(metrics["distillation"]))
    print(digits.format_table(metrics["digits"]))
    (out_dir / "demo_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {sorted(p.name for p in out_dir.iterdir())} to {out_dir}")
    return metrics
