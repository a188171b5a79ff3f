"""EM distillation (K, noise cancellation) vs Diff-Instruct vs the teacher's DDIM/Heun sampler.

Problems: the demo's exact 2-D mixtures (``ring8``, ``grid25``; ``emdppl.demo.mixtures``),
diffusion teachers trained by ``emdppl.teachers.train_diffusion`` on a swiss roll and a
checkerboard (numpy data; scored against held-out data), and an exact 10-D Gaussian mixture
(``mix10d``). Metrics from ``emdppl.demo`` (energy distance, mode masses). See
``benchmarks/README.md`` for the measured table.

    python -m benchmarks.distillation            # reduced sweep (README), ~8 min on 2 cores
    python -m benchmarks.distillation --full     # every problem x K x noise cancellation
    python -m benchmarks.distillation --smoke    # ring8, 20 steps, EMD K=2 + Diff-Instruct
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from emdppl import demo, teachers  # noqa: E402
from emdppl.demo import energy_distance, mode_metrics, teacher_draws  # noqa: E402
from emdppl.timing import seconds_per_10k  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROBLEMS = ("ring8", "grid25", "swissroll", "checkerboard", "mix10d")
DEFAULT_PROBLEMS = ("ring8", "swissroll", "mix10d")
ALL_KS = (1, 2, 4, 8, 16)
NOISE_CANCELLATIONS = ("none", "initial", "full")
#: Teacher's multi-step sampler: DDIM at NFE 1, 2, 4, 8, 18 and EDM Heun at NFE 35.
TEACHER_SAMPLERS = (("ddim", 1), ("ddim", 2), ("ddim", 4), ("ddim", 8), ("ddim", 18), ("heun", 18))
NUM_EVAL = 2000  # draws per energy distance (O(n^2) memory)
NUM_SAMPLES = 10_000


def swiss_roll(rng: np.random.Generator, n: int) -> np.ndarray:
    """2-D swiss roll, t in [1.5 pi, 4.5 pi], scaled by 1/2.5, Gaussian noise 0.1."""
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], -1) / 2.5
    return (x + 0.1 * rng.normal(size=x.shape)).astype(np.float32)


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    """2-D 4x4 checkerboard on [-4, 4]^2 (8 filled unit-2 squares), uniform within squares."""
    x1 = rng.uniform(-2, 2, size=n)
    x2 = rng.uniform(size=n) - rng.integers(0, 2, size=n) * 2 + np.floor(x1) % 2
    return (2 * np.stack([x1, x2], -1)).astype(np.float32)


def mixture_10d(seed: int = 0) -> teachers.GaussianMixture:
    """Exact 10-D mixture: 6 equal-weight modes, locations N(0, 3^2 I) (fixed seed), sd 0.5."""
    locs = 3.0 * np.random.default_rng(seed).normal(size=(6, 10))
    return teachers.GaussianMixture(
        jnp.asarray(locs, jnp.float32), jnp.full(6, 0.5), jnp.full(6, 1 / 6)
    )


def build_problem(name: str, seed: int, teacher_steps: int) -> dict:
    """``{"teacher", "reference" (NUM_SAMPLES, d) exact or held-out draws, "mixture" (for mode
    metrics, else None), "teacher_train_seconds"}``."""
    key = jax.random.key(seed)
    if name in ("ring8", "grid25", "mix10d"):
        teacher = demo.mixtures()[name] if name != "mix10d" else mixture_10d()
        reference = np.asarray(teacher.sample(jax.random.fold_in(key, 0), NUM_SAMPLES))
        return {"teacher": teacher, "reference": reference, "mixture": teacher,
                "teacher_train_seconds": None}
    make = {"swissroll": swiss_roll, "checkerboard": checkerboard}[name]
    rng = np.random.default_rng(seed)
    train, held_out = make(rng, 20_000), make(rng, NUM_SAMPLES)
    start = time.perf_counter()
    teacher = teachers.train_diffusion(train, rng_key=seed, num_steps=teacher_steps,
                                       progress_bar=False)
    return {"teacher": teacher, "reference": held_out, "mixture": None,
            "teacher_train_seconds": time.perf_counter() - start}


def metrics(problem: dict, x: np.ndarray, nfe: int, seconds: float) -> dict:
    """Energy distance to the reference (NUM_EVAL draws each), mode masses, NFE, s / 10k."""
    row = {
        "energy_distance": float(energy_distance(jnp.asarray(x[:NUM_EVAL]),
                                                 jnp.asarray(problem["reference"][:NUM_EVAL]))),
        "nfe": nfe,
        "seconds_per_10k_samples": seconds,
    }
    if problem["mixture"] is not None:
        modes = mode_metrics(problem["mixture"], x)
        row.update({k: modes[k] for k in ("min_mass_ratio", "off_mode_fraction",
                                          "tv_mode_masses")})
    return row


def distill_row(problem: dict, method: str, k: int | None, noise: str | None, num_steps: int,
                seed: int, smoke: bool) -> tuple[dict, np.ndarray]:
    teacher = problem["teacher"]
    key = jax.random.key(seed + 3)
    sigma_init = demo.SIGMA_INIT if problem["mixture"] is not None else None
    generator = emdppl.generators.from_teacher(
        teacher, key=jax.random.fold_in(key, 7), sigma_init=sigma_init
    )
    options = dict(demo.DISTILL_OPTIONS)
    if smoke:
        options["student_warmup_steps"] = 20
    if method == "emd":
        options.update(demo.EMD_OPTIONS, num_estep_steps=k, noise_cancellation=noise)
    with common.stopwatch() as watch:
        result = emdppl.distill(
            teacher, generator, method=method, num_steps=num_steps,
            optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(demo.LEARNING_RATE)),
            rng_key=key, progress_bar=False, num_probe_draws=0, **options,
        )
    x = np.asarray(result.sample(jax.random.fold_in(key, 4), NUM_SAMPLES))
    seconds = seconds_per_10k(lambda r: result.sample(r, NUM_SAMPLES), key)
    steps_run = num_steps + options["student_warmup_steps"]
    row = {
        "method": method,
        "num_estep_steps": k if method == "emd" else 1,
        "noise_cancellation": noise if method == "emd" else "full",
        **metrics(problem, x, 1, seconds),
        "train_seconds": watch.wall_seconds,
        "train_compile_seconds": watch.compile_seconds,
        # Steady-state cost: compilation excluded; student warm-up steps counted as steps.
        "train_seconds_per_1000_steps": 1000 * (watch.wall_seconds - watch.compile_seconds)
        / steps_run,
        "skipped_steps": int(result.state.num_skipped),
    }
    return row, x


def configs(problem: str, ks: list[int], full: bool, smoke: bool) -> list[tuple]:
    """(method, K, noise) of one problem. Default: the K sweep (noise "none") and K=8 with
    full cancellation on ring8, K=8 (none) elsewhere; ``--full``: every K x noise option."""
    out = [("diff_instruct", None, None)]
    if smoke:
        return out + [("emd", 2, "none")]
    if full:
        return out + [("emd", k, nc) for k in ks for nc in NOISE_CANCELLATIONS]
    if problem == "ring8":
        return out + [("emd", k, "none") for k in ks] + [("emd", 8, "full")]
    return out + [("emd", 8, "none")]


def run_problem(name: str, args) -> tuple[list[dict], dict]:
    problem = build_problem(name, args.seed, args.teacher_steps)
    teacher = problem["teacher"]
    key = jax.random.key(args.seed + 2)
    rows, panels = [], {"reference": problem["reference"]}
    base = {"problem": name, "dim": int(problem["reference"].shape[1]),
            "teacher_train_seconds": problem["teacher_train_seconds"]}
    ref = {**base, "method": "reference", "num_estep_steps": None, "noise_cancellation": None,
           **metrics(problem, problem["reference"][NUM_EVAL:], 0, float("nan"))}
    ref["seconds_per_10k_samples"] = None
    rows.append(ref)
    samplers = TEACHER_SAMPLERS[:2] if args.smoke else TEACHER_SAMPLERS
    for row_name, label, nfe, x, seconds in teacher_draws(teacher, key, NUM_SAMPLES, samplers):
        row = {**base, "method": row_name, "num_estep_steps": None,
               "noise_cancellation": None, **metrics(problem, x, nfe, seconds)}
        rows.append(row)
        print(_format_row(row), file=sys.stderr, flush=True)
        panels[label] = x
    for method, k, noise in configs(name, args.ks, args.full, args.smoke):
        try:
            row, x = distill_row(problem, method, k, noise, args.num_steps, args.seed, args.smoke)
        except FloatingPointError as error:  # 20 NaN steps in a row: a result, not a crash
            row, x = {"method": method, "num_estep_steps": k, "noise_cancellation": noise,
                      "nfe": 1, "failed": str(error).split(";")[0]}, None
        row = {**base, **row}
        rows.append(row)
        print(_format_row(row), file=sys.stderr, flush=True)
        if x is not None:
            panels[_label(row)] = x
    return rows, panels


def _label(r: dict) -> str:
    if r["method"] == "emd":
        return f"EMD K={r['num_estep_steps']} nc={r['noise_cancellation']}"
    return {"diff_instruct": "Diff-Instruct", "reference": "reference"}.get(r["method"],
                                                                            r["method"])


_HEADER = (
    f"{'problem':<12} {'method':<24} {'NFE':>3} {'energy d':>9} {'min mass':>8} {'off':>6} "
    f"{'TV':>6} {'s/10k':>8} {'train s':>7} {'s/1k st':>7}"
)


def _format_row(r: dict) -> str:
    def f(key, fmt):
        value = r.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    return (
        f"{r['problem']:<12} {_label(r):<24} {r['nfe']:>3} {f('energy_distance', '9.4f')} "
        f"{f('min_mass_ratio', '8.2f'):>8} {f('off_mode_fraction', '6.3f'):>6} "
        f"{f('tv_mode_masses', '6.3f'):>6} {f('seconds_per_10k_samples', '8.4f'):>8} "
        f"{f('train_seconds', '7.1f'):>7} {f('train_seconds_per_1000_steps', '7.1f'):>7}"
    )


def plot(panels: dict, path: Path) -> None:
    """One row of scatter panels (first two coordinates) per problem."""
    num_cols = max(len(p) for p in panels.values())
    fig, axes = plt.subplots(len(panels), num_cols, figsize=(2.3 * num_cols, 2.4 * len(panels)),
                             squeeze=False)
    for row, (name, draws) in enumerate(panels.items()):
        lim = 1.15 * np.abs(draws["reference"][:, :2]).max()
        for col in range(num_cols):
            ax = axes[row, col]
            ax.set(xticks=[], yticks=[])
            if col >= len(draws):
                ax.axis("off")
                continue
            label, x = list(draws.items())[col]
            ax.scatter(x[:4000, 0], x[:4000, 1], s=0.4, alpha=0.3)
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
            ax.set_title(f"{name}: {label}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(
        __doc__, smoke_help="ring8, DDIM NFE 1 and 2, 20 steps of Diff-Instruct and EMD K=2"
    )
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=None,
                        help=f"default {' '.join(DEFAULT_PROBLEMS)}; every problem with --full")
    parser.add_argument("--ks", nargs="+", type=int, default=None,
                        help="E-step lengths K; default 1 8 (1 2 4 8 16 with --full)")
    parser.add_argument("--num-steps", type=int, default=600, help="distillation steps per run")
    parser.add_argument("--teacher-steps", type=int, default=2000,
                        help="train_diffusion steps of the swiss roll / checkerboard teachers")
    parser.add_argument("--full", action="store_true",
                        help="every problem, K in --ks (default 1 2 4 8 16) x none/initial/full")
    args = parser.parse_args(argv)
    if args.problems is None:
        args.problems = list(PROBLEMS if args.full else DEFAULT_PROBLEMS)
    if args.ks is None:
        args.ks = list(ALL_KS if args.full else (1, 8))
    if args.smoke:
        args.problems, args.num_steps = ["ring8"], 20
    out = common.output_dir(args)

    start = time.perf_counter()
    rows, panels = [], {}
    print(_HEADER, file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in args.problems:
            problem_rows, panels[name] = run_problem(name, args)
            rows += problem_rows
    common.print_rows(_HEADER, rows, _format_row)
    settings = {"problems": args.problems, "ks": args.ks, "full": args.full,
                "num_steps": args.num_steps, "teacher_steps": args.teacher_steps,
                "seed": args.seed, "teacher_samplers": TEACHER_SAMPLERS, "num_eval": NUM_EVAL,
                "distill_options": demo.DISTILL_OPTIONS, "emd_options": demo.EMD_OPTIONS,
                "learning_rate": demo.LEARNING_RATE}
    report = common.make_report(settings, total_seconds=time.perf_counter() - start, rows=rows)
    common.save_report(out, "distillation", report, plot, panels)
    return report


if __name__ == "__main__":
    main()
