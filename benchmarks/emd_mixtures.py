"""EMD vs Diff-Instruct on generated Gaussian mixtures that no default was tuned on.

Each problem is :func:`benchmarks.problems.random_mixture` of a seed (2-3-D, 4-14 modes by
default, to fit the CPU budget), a teacher and the library's default generator
(:func:`emdppl.generators.from_teacher`, optionally with a wider latent) and student. The teacher
is the exact :class:`~emdppl.teachers.GaussianMixture` (``--teacher exact``, the default) or a
diffusion model trained on 20k of its draws (``--teacher trained``,
:func:`benchmarks.problems.trained_teacher`, one per problem): then the generator copies a
network, as with a real diffusion model. Every setting is run for every problem seed and training
seed; the metrics are those of :func:`benchmarks.problems.mode_metrics` on 20k one-step draws.
The setting ``exact`` is the floor: the same metrics of as many exact draws of the mixture;
``teacher_heun18`` those of the teacher's own 35-NFE sampler (EDM Heun, 18 steps).

    .venv/bin/python benchmarks/emd_mixtures.py --problems 200 201 202 --seeds 0 1 2
    .venv/bin/python benchmarks/emd_mixtures.py --teacher trained --name emd_mixtures_trained
    .venv/bin/python benchmarks/emd_mixtures.py --smoke
    .venv/bin/python benchmarks/emd_mixtures.py --merge a.json b.json  # one table of earlier runs
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
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
from benchmarks.problems import (  # noqa: E402
    HELDOUT_SEEDS,
    generator_optimizer,
    mode_metrics,
    random_mixture,
    trained_teacher,
)
from emdppl import generators  # noqa: E402

#: name -> (distill options, generator latent dimension or None for the data's)
SETTINGS = {
    "diff_instruct": ({"method": "diff_instruct"}, None),
    "emd_defaults": ({}, None),  # method="emd" with every library default
    "emd_residual_k4": ({"num_estep_steps": 4, "noise_cancellation": "residual"}, None),
    "emd_residual_k4_jacobian": (
        {"num_estep_steps": 4, "noise_cancellation": "residual", "z_step_rule": "jacobian"},
        None,
    ),
    "emd_residual_k4_jacobian_latent8": (
        {"num_estep_steps": 4, "noise_cancellation": "residual", "z_step_rule": "jacobian"},
        8,
    ),
    # the K ablation: the library's defaults with K kernel steps per E-step (K = 4 is above)
    **{f"emd_k{k}": ({"num_estep_steps": k}, None) for k in (1, 2, 8, 16)},
}
METRICS = ("tv", "lightest_ratio", "off_mode")
#: the floor: the metrics of the mixture's own exact draws (sampling noise only)
EXACT = "exact"
#: the teacher's multi-step sampler (EDM Heun, 18 steps, 35 NFE): what distillation compresses
TEACHER_HEUN = "teacher_heun18"
FLOORS = (EXACT, TEACHER_HEUN)


def run_one(
    problem, name: str, seed: int, num_steps: int, num_draws: int,
    learning_rate: float | None = None, teacher=None,
) -> dict:
    """Distil ``teacher`` (default ``problem``'s exact one) with setting ``name`` and training
    ``seed``; ``learning_rate`` as in :func:`benchmarks.problems.generator_optimizer`."""
    teacher = problem.teacher() if teacher is None else teacher
    k_generator, k_run, k_draw = jax.random.split(jax.random.key(seed), 3)
    if name in FLOORS:
        if name == EXACT:
            x = problem.teacher().sample(k_draw, num_draws)
        else:
            x = teacher.sample_ode(k_draw, num_draws, num_steps=18)
        metrics = mode_metrics(np.asarray(x), problem)
        return {"setting": name, "problem": problem.seed, "seed": seed, **metrics}
    options, latent_dim = SETTINGS[name]
    options = {**options, **generator_optimizer(learning_rate, num_steps)}
    generator = generators.from_teacher(teacher, key=k_generator, latent_dim=latent_dim)
    start = time.perf_counter()
    try:
        result = emdppl.distill(
            teacher, generator, rng_key=k_run, num_steps=num_steps, num_probe_draws=0,
            progress_bar=False, **options,
        )
    except FloatingPointError as error:
        return {"setting": name, "problem": problem.seed, "seed": seed, "error": str(error)}
    metrics = mode_metrics(np.asarray(result.sample(k_draw, num_draws)), problem)
    return {
        "setting": name,
        "problem": problem.seed,
        "seed": seed,
        "learning_rate": learning_rate,  # None: the library's default optimiser
        "seconds": time.perf_counter() - start,
        "num_skipped": int(result.state.num_skipped),
        **metrics,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting: mean of each metric, and on how many (problem, seed) pairs the TV is at most
    Diff-Instruct's (paired by problem and seed)."""
    reference = {(r["problem"], r["seed"]): r for r in rows if r["setting"] == "diff_instruct"}
    summary = []
    for name in (*FLOORS, *SETTINGS):
        mine = [r for r in rows if r["setting"] == name and "tv" in r]
        if not mine:
            continue
        paired = [r for r in mine if (r["problem"], r["seed"]) in reference]
        wins = sum(r["tv"] <= reference[(r["problem"], r["seed"])]["tv"] for r in paired)
        summary.append({
            "setting": name,
            "runs": len(mine),
            "failed": sum(r["setting"] == name and "tv" not in r for r in rows),
            **{m: float(np.mean([r[m] for r in mine])) for m in METRICS},
            "median_tv": float(np.median([r["tv"] for r in mine])),
            "min_lightest_ratio": float(np.min([r["lightest_ratio"] for r in mine])),
            "tv_le_di": f"{wins}/{len(paired)}",
        })
    return summary


def plot(rows: list[dict], path: Path) -> None:
    """TV, lightest ratio and off-mode fraction of every run, one column per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (*FLOORS, *SETTINGS) if any(r["setting"] == n and "tv" in r for r in rows)]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, name in enumerate(names):
            values = [r[metric] for r in rows if r["setting"] == name and metric in r]
            ax.scatter(np.full(len(values), i) + np.linspace(-0.2, 0.2, len(values)), values, s=10)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=7)
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argument_parser(__doc__, "one problem, one seed, two settings, 50 steps")
    parser.add_argument("--problems", type=int, nargs="+", default=list(HELDOUT_SEEDS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=[EXACT, *SETTINGS],
                        choices=[*FLOORS, *SETTINGS])
    parser.add_argument("--teacher", choices=("exact", "trained"), default="exact",
                        help="the exact mixture, or a diffusion model trained on its draws")
    parser.add_argument("--num-steps", type=int, default=emdppl.DistillConfig().num_steps)
    parser.add_argument("--num-draws", type=int, default=20_000)
    parser.add_argument("--max-modes", type=int, default=14)
    parser.add_argument("--max-dim", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="generator: cosine Adam from this rate (default: the library's)")
    parser.add_argument("--name", default="emd_mixtures")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="rows of earlier JSON reports instead of new runs")
    args = parser.parse_args()
    if args.smoke:
        args.problems, args.seeds, args.num_steps, args.num_draws = args.problems[:1], [0], 50, 2000
        args.settings = [EXACT, "diff_instruct", "emd_defaults"]
    out = output_dir(args)
    rows = [row for path in args.merge or () for row in json.loads(path.read_text())["rows"]]
    for problem_seed in () if args.merge else args.problems:
        problem = random_mixture(
            problem_seed, modes_range=(4, args.max_modes), dim_range=(2, args.max_dim)
        )
        print(problem.describe(), flush=True)
        teacher = trained_teacher(problem, 0) if args.teacher == "trained" else problem.teacher()
        for seed in args.seeds:
            for name in args.settings:
                row = run_one(
                    problem, name, seed, args.num_steps, args.num_draws, args.learning_rate,
                    teacher,
                )
                row["teacher"] = args.teacher
                rows.append(row)
                print({k: v for k, v in row.items() if k != "masses"}, flush=True)
    summary = summarise(rows)
    settings = {k: str(v) if k == "merge" else v for k, v in vars(args).items() if k != "out"}
    report = make_report(settings, rows=rows, summary=summary,
                         options={k: v[0] for k, v in SETTINGS.items()})
    save_report(out, args.name, report, plot, rows)
    print_rows(
        f"{'setting':34s} {'runs':>4s} {'TV':>6s} {'medTV':>6s} {'light':>6s} {'minL':>5s} "
        f"{'off':>6s} {'TV<=DI':>7s}",
        summary,
        lambda s: (
            f"{s['setting']:34s} {s['runs']:4d} {s['tv']:6.3f} {s['median_tv']:6.3f} "
            f"{s['lightest_ratio']:6.3f} {s['min_lightest_ratio']:5.2f} {s['off_mode']:6.3f} "
            f"{s['tv_le_di']:>7s}"
        ),
    )


if __name__ == "__main__":
    main()
