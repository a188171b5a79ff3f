"""What one EMD step costs against the evaluations it is made of (issue #16, target 7).

One step of :func:`emdppl.emd.build_kernel` is ``S`` student DSM updates, an E-step of ``K``
kernel steps per chain (each: the teacher's and the student's score at ``x = g(z) + sigma eps``
and one VJP of the generator for the z block), the residual (one more teacher and student
score and a generator forward), the z step's Jacobian of the generator (one ``jacfwd`` per
chain, ``z_step_rule="jacobian"``) and the M-step (the generator loss's gradient and the optax
update). Each of these is timed alone over the batch, jitted and repeated in a ``lax.scan``;
the step is timed as ``emdppl.run`` runs it (warm, one chunk); every time is the best of 5.
The ratio step / (sum of the parts) is the overhead of everything else (drawing, clipping,
the finite checks, the bookkeeping); the issue's target is <= 1.3.

    python -m benchmarks.emd_cost            # ring8 and a digits-sized network, K = 1, 4, 16
    python -m benchmarks.emd_cost --smoke
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from emdppl import digits, emd, generators, teachers  # noqa: E402
from emdppl.demo import mixtures  # noqa: E402
from emdppl.losses import generator_loss  # noqa: E402


def _problem(name: str, key: jax.Array) -> teachers.AbstractTeacher:
    """``ring8``: the demo's exact 8-mode mixture (d = 2); ``digits``: an EDM teacher of the
    digits experiment's size (d = 64, MLP 256 x 3; untrained: the cost does not depend on the
    weights)."""
    if name == "ring8":
        return mixtures()["ring8"]
    return teachers.DiffusionModel(digits.teacher_network(key), sigma_data=0.6, data_dim=64)


def _per_call(fn: Callable, args: tuple, reps: int) -> float:
    """Warm seconds of one ``fn(i, *args)``, from a jitted ``lax.scan`` of ``reps`` calls whose
    outputs are summed into the carry (so none is dropped)."""

    @eqx.filter_jit
    def loop(args):
        def body(acc, i):
            out = fn(i, *args)
            leaves = [x for x in jax.tree.leaves(out) if eqx.is_inexact_array(x)]
            return acc + sum(jnp.sum(x) for x in leaves), None

        return jax.lax.scan(body, jnp.zeros(()), jnp.arange(reps))[0]

    jax.block_until_ready(loop(args))
    return _best_of(lambda: loop(args)) / reps


def _best_of(call: Callable, repeats: int = 5) -> float:
    """Smallest wall seconds of ``repeats`` warm calls (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, num_estep_steps: int, batch_size: int, reps: int, seed: int) -> dict:
    key = jax.random.key(seed)
    k_teacher, k_gen, k_student, k_init = jax.random.split(key, 4)
    teacher = _problem(name, k_teacher)
    config = emdppl.DistillConfig(num_estep_steps=num_estep_steps, batch_size=batch_size)
    config = config.for_teacher(teacher)
    generator = generators.from_teacher(teacher, key=k_gen)
    student = emd.default_student(teacher, generator, k_student)
    algorithm = emd.as_top_level_api(teacher, generator, student, config)
    state = algorithm.init(generator, k_init)
    kernel = algorithm.step.kernel

    # the step, as emdppl.run runs it (one chunk, warm)
    emdppl.run(0, algorithm, reps, state, progress_bar=False)
    step = _best_of(lambda: emdppl.run(1, algorithm, reps, state, progress_bar=False)) / reps

    sigma, eps, z = kernel.draw_batch(jax.random.key(seed + 1))
    x = jax.vmap(functools.partial(kernel.generate, state.theta))(z) + sigma[:, None] * eps
    shift = lambda i, a: a + 1e-6 * i  # noqa: E731 - a new input per repetition

    def teacher_score(i, teacher, x, sigma):
        return jax.vmap(teacher.score)(shift(i, x), sigma)

    def student_score(i, psi, x, sigma):
        student = kernel.estep_target(teacher, state.theta, psi).student_score_fn
        return jax.vmap(student)(shift(i, x), sigma)

    def generator_vjp(i, theta, z, x):
        gen = functools.partial(kernel.generate, theta)
        return jax.vmap(lambda z, c: jax.vjp(gen, z)[1](c)[0])(shift(i, z), x)

    def generator_forward(i, theta, z):
        return jax.vmap(functools.partial(kernel.generate, theta))(shift(i, z))

    def jacobian(i, theta, z):
        return jax.vmap(jax.jacfwd(functools.partial(kernel.generate, theta)))(shift(i, z))

    def student_updates(i, theta, psi, opt_state):
        key = jax.random.fold_in(jax.random.key(seed + 2), i)
        return kernel.update_student(
            key, theta, psi, opt_state, config.student_updates_per_step
        )[:2]

    def m_step(i, theta, opt_state, z, eps, sigma):
        grads = jax.grad(generator_loss, argnums=1)(
            kernel.generate, theta, shift(i, z), eps, sigma, config.weighting
        )
        return config.optimizer.update(grads, opt_state, theta)[0]

    times = {
        "teacher_score": _per_call(teacher_score, (teacher, x, sigma), reps),
        "student_score": _per_call(student_score, (state.psi, x, sigma), reps),
        "generator_vjp": _per_call(generator_vjp, (state.theta, z, x), reps),
        "generator_forward": _per_call(generator_forward, (state.theta, z), reps),
        "jacobian": _per_call(jacobian, (state.theta, z), reps),
        "student_updates": _per_call(
            student_updates, (state.theta, state.psi, state.psi_opt_state), reps
        ),
        "m_step": _per_call(m_step, (state.theta, state.theta_opt_state, z, eps, sigma), reps),
    }
    k = num_estep_steps
    counts = {
        "teacher_score": k + 1,  # K kernel steps and the residual
        "student_score": k + 1,
        "generator_vjp": k,
        "generator_forward": 1,
        "jacobian": 1,
        "student_updates": 1,
        "m_step": 1,
    }
    parts = sum(counts[n] * times[n] for n in times)
    return {
        "problem": name,
        "K": k,
        "batch_size": batch_size,
        "step_ms": 1e3 * step,
        "parts_ms": 1e3 * parts,
        "ratio": step / parts,
        "part_ms": {n: 1e3 * t for n, t in times.items()},
        "counts": counts,
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['problem']}\nK={r['K']}" for r in rows]
    ax.bar(labels, [r["ratio"] for r in rows], color="C0")
    ax.axhline(1.3, color="C3", ls="--", label="target 1.3")
    ax.set_ylabel("step / sum of its parts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = common.argument_parser(__doc__, "ring8 only, K = 4, 20 repetitions")
    parser.add_argument("--problems", nargs="+", default=["ring8", "digits"])
    parser.add_argument("--K", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args()
    if args.smoke:
        args.problems, args.K, args.reps = ["ring8"], [4], 20
    out = common.output_dir(args)
    rows = []
    for name in args.problems:
        for k in args.K:
            rows.append(measure(name, k, args.batch_size, args.reps, args.seed))
            print(rows[-1], flush=True)
    common.print_rows(
        f"{'problem':<8} {'K':>3} {'step ms':>9} {'parts ms':>9} {'ratio':>6}",
        rows,
        lambda r: f"{r['problem']:<8} {r['K']:>3} {r['step_ms']:>9.3f} {r['parts_ms']:>9.3f} "
        f"{r['ratio']:>6.2f}",
    )
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["out"] = str(out)
    max_ratio = float(np.max([r["ratio"] for r in rows]))
    report = common.make_report(settings, rows=rows, max_ratio=max_ratio)
    common.save_report(out, "emd_cost", report, _plot, rows)


if __name__ == "__main__":
    main()
