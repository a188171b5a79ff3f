"""Gradient norm and mode coverage over training, per noise-cancellation option (issue #16, item 5).

The EMD paper's ablation of its M-step estimator at small scale: on generated mixtures that no
default was tuned on (:func:`benchmarks.problems.random_mixture`, held-out seeds), each setting
below distils the exact teacher into :func:`emdppl.generators.from_teacher`'s generator with the
library's defaults otherwise, through the blackjax-shaped API (``emdppl.emd.as_top_level_api``,
``emdppl.run`` in chunks of ``--eval-every`` steps). After every chunk it records the mean and
standard deviation of the generator's gradient norm over the chunk (``EMDInfo.grad_norm``) and
the mode metrics of :func:`benchmarks.problems.mode_metrics` on fresh one-step draws.

    .venv/bin/python benchmarks/emd_training_curves.py --problems 200 201 202 203 --seeds 0 1 2
    .venv/bin/python benchmarks/emd_training_curves.py --learning-rate 3e-2 \
        --settings diff_instruct emd_residual emd_full --name emd_training_curves_cosine
    .venv/bin/python benchmarks/emd_training_curves.py --smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import equinox as eqx
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
)
from emdppl import emd, generators  # noqa: E402
from emdppl.base import Algorithm  # noqa: E402

#: name -> distill options (K = 4 everywhere but Diff-Instruct's K = 1)
SETTINGS = {
    "diff_instruct": {"method": "diff_instruct"},
    "emd_residual": {},  # the library's default: z sampled, Stein residual
    "emd_none": {"noise_cancellation": "none"},
    "emd_initial": {"noise_cancellation": "initial"},
    "emd_full": {"noise_cancellation": "full"},  # full cancellation with z moving (biased)
    "emd_frozen_full": {"update_z": False},  # "K-step Diff-Instruct": z frozen, full
}
METRICS = ("tv", "lightest_ratio", "off_mode")


def run_one(
    problem, name: str, seed: int, num_steps: int, eval_every: int, num_draws: int,
    learning_rate: float | None = None,
) -> dict:
    """One training run of setting ``name``; the curves at steps ``eval_every, 2 eval_every,
    ... num_steps`` (and the initialisation at step 0); ``learning_rate`` as in
    :func:`benchmarks.problems.generator_optimizer`."""
    teacher = problem.teacher()
    k_generator, k_student, k_warmup, k_run, k_draw = jax.random.split(jax.random.key(seed), 5)
    generator = generators.from_teacher(teacher, key=k_generator)
    options = {**SETTINGS[name], **generator_optimizer(learning_rate, num_steps)}
    config = emdppl.DistillConfig(num_steps=num_steps, **options).for_teacher(teacher)
    student = emd.default_student(teacher, generator, k_student)
    algorithm = emd.as_top_level_api(teacher, generator, student, config)
    warmup = Algorithm(algorithm.init, emd.build_student_kernel(config, generator, student))
    state, _ = emdppl.run(
        k_warmup, warmup, config.student_warmup_steps, algorithm.init(generator), progress_bar=False
    )
    static = generators.partition(generator)[1]

    def metrics(state, step):
        result = emdppl.DistillResult(eqx.combine(state.theta, static), None, {}, None, state)
        x = np.asarray(result.sample(jax.random.fold_in(k_draw, step), num_draws))
        values = mode_metrics(x, problem)
        return {m: values[m] for m in METRICS}

    curve = {"step": [0], **{m: [v] for m, v in metrics(state, 0).items()}}
    curve.update(grad_norm_mean=[np.nan], grad_norm_sd=[np.nan], num_skipped=[0])
    start = time.perf_counter()
    for step in range(eval_every, num_steps + 1, eval_every):
        state, trace = emdppl.run(
            jax.random.fold_in(k_run, step), algorithm, eval_every, state, progress_bar=False
        )
        norms = trace.grad_norm[np.isfinite(trace.grad_norm)]
        curve["step"].append(step)
        curve["grad_norm_mean"].append(float(np.mean(norms)) if norms.size else np.nan)
        curve["grad_norm_sd"].append(float(np.std(norms)) if norms.size else np.nan)
        curve["num_skipped"].append(int(state.num_skipped))
        for m, v in metrics(state, step).items():
            curve[m].append(v)
    return {
        "setting": name,
        "problem": problem.seed,
        "seed": seed,
        "learning_rate": learning_rate,  # None: the library's default optimiser
        "seconds": time.perf_counter() - start,
        **curve,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Per setting: mean over runs of the final metrics, of the gradient norm over the last chunk
    and of its coefficient of variation (sd / mean: the M-step gradient's noise)."""
    summary = []
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        summary.append({
            "setting": name,
            "runs": len(mine),
            **{m: float(np.mean([r[m][-1] for r in mine])) for m in METRICS},
            "grad_norm": float(np.mean([r["grad_norm_mean"][-1] for r in mine])),
            "grad_norm_cv": float(
                np.mean([r["grad_norm_sd"][-1] / r["grad_norm_mean"][-1] for r in mine])
            ),
            "num_skipped": int(sum(r["num_skipped"][-1] for r in mine)),
        })
    return summary


def plot(rows: list[dict], path: Path) -> None:
    """Four panels against the step: gradient norm, its coefficient of variation, TV and the
    off-mode fraction; one line per setting (mean over runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("grad_norm_mean", "gradient norm (chunk mean)", True),
        ("grad_norm_cv", "gradient norm sd / mean", False),
        ("tv", "TV of mode masses", True),
        ("off_mode", "off-mode fraction", False),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4))
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for name in SETTINGS:
            mine = [r for r in rows if r["setting"] == name]
            if not mine:
                continue
            first = 1 if key.startswith("grad") else 0  # no gradient before the first step
            if key == "grad_norm_cv":
                values = [np.divide(r["grad_norm_sd"], r["grad_norm_mean"]) for r in mine]
            else:
                values = [np.array(r[key], dtype=float) for r in mine]
            steps = mine[0]["step"][first:]
            ax.plot(steps, np.mean(np.stack(values)[:, first:], axis=0), label=name)
        ax.set_xlabel("generator step")
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argument_parser(__doc__, "one problem, one seed, two settings, 100 steps")
    parser.add_argument("--problems", type=int, nargs="+", default=list(HELDOUT_SEEDS[:4]))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-steps", type=int, default=emdppl.DistillConfig().num_steps)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--num-draws", type=int, default=10_000)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="generator: cosine Adam from this rate (default: the library's)")
    parser.add_argument("--name", default="emd_training_curves")
    args = parser.parse_args()
    if args.smoke:
        args.problems, args.seeds, args.settings = args.problems[:1], [0], list(SETTINGS)[:2]
        args.num_steps, args.eval_every, args.num_draws = 100, 50, 2000
    if args.num_steps % args.eval_every:
        parser.error(f"--num-steps {args.num_steps} must be a multiple of --eval-every.")
    out = output_dir(args)
    rows = []
    for problem_seed in args.problems:
        problem = random_mixture(problem_seed, modes_range=(4, 14), dim_range=(2, 3))
        print(problem.describe(), flush=True)
        for seed in args.seeds:
            for name in args.settings:
                row = run_one(
                    problem, name, seed, args.num_steps, args.eval_every, args.num_draws,
                    args.learning_rate,
                )
                rows.append(row)
                print(
                    f"{name} seed {seed}: TV {row['tv'][-1]:.3f}, off-mode "
                    f"{row['off_mode'][-1]:.3f}, grad norm {row['grad_norm_mean'][-1]:.3g} "
                    f"({row['seconds']:.0f} s)",
                    flush=True,
                )
    summary = summarise(rows)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    save_report(out, args.name, make_report(settings, rows=rows, summary=summary,
                                            options=SETTINGS), plot, rows)
    print_rows(
        f"{'setting':18s} {'runs':>4s} {'TV':>6s} {'light':>6s} {'off':>6s} {'|grad|':>8s} "
        f"{'cv':>5s} {'skip':>4s}",
        summary,
        lambda s: (
            f"{s['setting']:18s} {s['runs']:4d} {s['tv']:6.3f} {s['lightest_ratio']:6.3f} "
            f"{s['off_mode']:6.3f} {s['grad_norm']:8.3g} {s['grad_norm_cv']:5.2f} "
            f"{s['num_skipped']:4d}"
        ),
    )


if __name__ == "__main__":
    main()
