"""NUTS speed: emdppl against NumPyro and a hand-written blackjax loop, in one process.

All three sample the same auxiliary (non-centered) log density with Stan-style window
adaptation (diagonal mass matrix, target acceptance 0.8, at most 10 doublings) and the same
chains, warm-up and draws. Each method is first run once to compile, then once per seed (the
three alternating within a seed); the reported numbers are medians over seeds. See
``benchmarks/README.md`` for the metrics.

    python -m benchmarks.nuts_speed            # full run: 4 chains, 1000 + 1000, 3 seeds
    python -m benchmarks.nuts_speed --smoke    # 2 chains, 100 + 100, eight schools, one seed
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import blackjax
import jax
import matplotlib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.models import SPEED_MODELS, BenchmarkModel  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("emdppl", "numpyro", "blackjax")
_COMPILE_SEED_OFFSET = 10_000


def run_emdppl(bench: BenchmarkModel, kwargs: dict, seed: int, settings: dict) -> dict:
    algorithm = emdppl.MCMC("nuts", **settings)
    start = time.perf_counter()
    idata = emdppl.infer(
        bench.model, algorithm, model_kwargs=kwargs, rng_key=seed, progress_bar=False
    )
    seconds = time.perf_counter() - start
    posterior = {k: idata.posterior[k].values for k in bench.var_names}
    stats = idata.sample_stats
    attrs = idata.posterior.attrs
    return {
        "seconds": seconds,
        "draws": posterior,
        "n_grad_evals": int(stats["n_grad_evals"].values.sum()),
        "divergences": int(stats["diverging"].values.sum()),
        "compile_seconds_attr": float(attrs["compile_seconds"]),
        "warmup_seconds_attr": float(attrs["warmup_seconds"]),
        "sampling_seconds_attr": float(attrs["sampling_seconds"]),
    }


def _blackjax_sample(
    rng_key: jax.Array, target: emdppl.Target, num_warmup: int, num_samples: int
) -> tuple[dict, jax.Array, jax.Array]:
    """Window adaptation vmapped over chains, then a ``lax.scan`` of the vmapped NUTS step."""
    logdensity_fn = target.logdensity_fn
    num_chains = target.num_chains
    warmup_key, sample_key = jax.random.split(rng_key)

    def warmup_one(key, position):
        adaptation = blackjax.window_adaptation(
            blackjax.nuts, logdensity_fn, target_acceptance_rate=0.8, max_num_doublings=10
        )
        (result, _) = adaptation.run(key, position, num_warmup)
        return result.state, result.parameters

    states, parameters = jax.vmap(warmup_one)(
        jax.random.split(warmup_key, num_chains), target.initial_position
    )

    def step_one(key, state, params):
        nuts = blackjax.nuts(
            logdensity_fn,
            step_size=params["step_size"],
            inverse_mass_matrix=params["inverse_mass_matrix"],
            max_num_doublings=10,
        )
        return nuts.step(key, state)

    def one_step(states, key):
        states, info = jax.vmap(step_one)(jax.random.split(key, num_chains), states, parameters)
        return states, (states.position, info.num_integration_steps, info.is_divergent)

    _, (positions, num_steps, divergent) = jax.lax.scan(
        one_step, states, jax.random.split(sample_key, num_samples)
    )
    positions = jax.tree.map(lambda x: x.swapaxes(0, 1), positions)  # -> (chain, draw, ...)
    return jax.vmap(jax.vmap(target.postprocess_fn))(positions), num_steps, divergent


_blackjax_sample_jit = jax.jit(_blackjax_sample, static_argnames=("num_warmup", "num_samples"))


def run_blackjax(bench: BenchmarkModel, kwargs: dict, seed: int, settings: dict) -> dict:
    target_key, sample_key = jax.random.split(jax.random.key(seed))
    start = time.perf_counter()
    target = emdppl.Target.from_numpyro(
        bench.model, model_kwargs=kwargs, num_chains=settings["num_chains"], rng_key=target_key
    )
    draws, num_steps, divergent = jax.device_get(
        _blackjax_sample_jit(
            sample_key, target, settings["num_warmup"], settings["num_samples"]
        )
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "draws": {k: draws[k] for k in bench.var_names},
        "n_grad_evals": int(np.sum(num_steps)),
        "divergences": int(np.sum(divergent)),
    }


def _metrics(out: dict, var_names: tuple[str, ...]) -> dict:
    ess_bulk, ess_tail = common.min_ess(out.pop("draws"), var_names)
    # NumPyro retraces and recompiles inside every MCMC.run; this excludes that.
    sampling_seconds = out["seconds"] - out["compile_seconds_in_run"]
    return {
        **out,
        "seconds_excluding_compile": sampling_seconds,
        "ess_bulk_min": ess_bulk,
        "ess_tail_min": ess_tail,
        "ess_bulk_per_second": ess_bulk / out["seconds"],
        "ess_tail_per_second": ess_tail / out["seconds"],
        "ess_bulk_per_second_excluding_compile": ess_bulk / sampling_seconds,
        "ess_bulk_per_1000_grads": 1000.0 * ess_bulk / out["n_grad_evals"],
    }


_REPORTED = (
    "seconds",
    "seconds_excluding_compile",
    "ess_bulk_per_second_excluding_compile",
    "ess_bulk_min",
    "ess_tail_min",
    "ess_bulk_per_second",
    "ess_tail_per_second",
    "ess_bulk_per_1000_grads",
    "n_grad_evals",
    "divergences",
    "compile_seconds_in_run",
)


def benchmark_model(name: str, settings: dict, seeds: list[int]) -> dict:
    """Compile run, then one run per seed, of each method; medians over seeds."""
    bench = SPEED_MODELS[name]
    kwargs = bench.load_kwargs()
    run_numpyro = common.make_numpyro_runner(bench, settings)
    runners = {
        "emdppl": lambda seed: run_emdppl(bench, kwargs, seed, settings),
        "numpyro": lambda seed: run_numpyro(kwargs, seed),
        "blackjax": lambda seed: run_blackjax(bench, kwargs, seed, settings),
    }
    # Methods alternate within each seed, so a change of machine load hits all three alike.
    cold = {
        method: common.watched(runner, seeds[0] + _COMPILE_SEED_OFFSET)
        for method, runner in runners.items()
    }
    runs = {method: [] for method in runners}
    for seed in seeds:
        for method, runner in runners.items():
            runs[method].append(_metrics(common.watched(runner, seed), bench.var_names))
    result = {}
    for method in runners:
        print(
            f"{name} {method}: compile run {cold[method]['seconds']:.1f} s, timed runs "
            + ", ".join(f"{r['seconds']:.2f}" for r in runs[method])
            + " s",
            file=sys.stderr,
        )
        summary = {k: float(np.median([r[k] for r in runs[method]])) for k in _REPORTED}
        summary["compile_seconds"] = cold[method]["seconds"] - runs[method][0]["seconds"]
        summary["compile_seconds_in_compile_run"] = cold[method]["compile_seconds_in_run"]
        if method == "emdppl":
            summary["compile_seconds_attr"] = cold[method]["compile_seconds_attr"]
            summary["compile_seconds_attr_warm"] = runs[method][0]["compile_seconds_attr"]
            for key in ("warmup_seconds_attr", "sampling_seconds_attr"):
                summary[key] = float(np.median([r[key] for r in runs[method]]))
        result[method] = {
            "median": summary,
            "runs": runs[method],
            "cold_seconds": cold[method]["seconds"],
        }
    emd = result["emdppl"]["median"]
    result["ratios"] = {
        f"emdppl/{base}": {
            key: emd[key] / result[base]["median"][key]
            for key in (
                "ess_bulk_per_second",
                "ess_tail_per_second",
                "ess_bulk_per_second_excluding_compile",
                "ess_bulk_per_1000_grads",
            )
        }
        for base in ("numpyro", "blackjax")
    }
    return result


def print_table(results: dict) -> None:
    header = (
        f"{'model':<14} {'method':<9} {'run s':>7} {'in-run compile s':>16} {'compile s':>9} "
        f"{'ESS bulk':>9} {'ESS tail':>9} {'bulk/s':>8} {'tail/s':>8} {'bulk/s excl':>11} "
        f"{'bulk/1k grad':>12} {'div':>4}"
    )
    print(header)
    print("-" * len(header))
    for name, result in results.items():
        for method in METHODS:
            m = result[method]["median"]
            print(
                f"{name:<14} {method:<9} {m['seconds']:>7.2f} "
                f"{m['compile_seconds_in_run']:>16.2f} {m['compile_seconds']:>9.2f} "
                f"{m['ess_bulk_min']:>9.0f} {m['ess_tail_min']:>9.0f} "
                f"{m['ess_bulk_per_second']:>8.1f} {m['ess_tail_per_second']:>8.1f} "
                f"{m['ess_bulk_per_second_excluding_compile']:>11.1f} "
                f"{m['ess_bulk_per_1000_grads']:>12.2f} {m['divergences']:>4.0f}"
            )
        for pair, ratio in result["ratios"].items():
            print(
                f"{name:<14} {pair:<17} ESS bulk/s x{ratio['ess_bulk_per_second']:.2f}, "
                f"ESS tail/s x{ratio['ess_tail_per_second']:.2f}, "
                f"ESS bulk/s excl. compile x{ratio['ess_bulk_per_second_excluding_compile']:.2f}, "
                f"ESS bulk/1k grad x{ratio['ess_bulk_per_1000_grads']:.2f}"
            )


def plot(results: dict, path: Path) -> None:
    panels = (
        ("ess_bulk_per_second", "min bulk ESS / s"),
        ("ess_bulk_per_second_excluding_compile", "min bulk ESS / s, in-run compile excluded"),
        ("ess_bulk_per_1000_grads", "min bulk ESS / 1000 gradients"),
    )
    names = list(results)
    width = 0.8 / len(METHODS)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for i, method in enumerate(METHODS):
            values = [results[name][method]["median"][key] for name in names]
            ax.bar(np.arange(len(names)) + (i - 1) * width, values, width, label=method)
        ax.set_xticks(np.arange(len(names)), names)
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle("NUTS, auxiliary form; median over seeds (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(
        __doc__, smoke_help="2 chains, 100 + 100, eight schools, one seed"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SPEED_MODELS),
                        default=sorted(SPEED_MODELS))
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-seeds", type=int, default=3,
                        help="timed runs per method (seeds seed, seed+1, ...); medians reported")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.num_chains, args.num_warmup, args.num_samples = (
            ["eight_schools"], 2, 100, 100
        )
        args.num_seeds = 1
    out = common.output_dir(args)

    settings = {
        "num_chains": args.num_chains,
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
    }
    seeds = [args.seed + i for i in range(args.num_seeds)]
    with warnings.catch_warnings():
        # Divergences are counted in the table; the per-run warnings would only repeat them.
        warnings.simplefilter("ignore", RuntimeWarning)
        results = {name: benchmark_model(name, settings, seeds) for name in args.models}

    print_table(results)
    report = common.make_report({**settings, "seeds": seeds}, results=results)
    common.save_report(out, "nuts_speed", report, plot, results)
    return report


if __name__ == "__main__":
    main()
