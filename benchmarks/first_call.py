"""First call: what a user waits for in a fresh process, emdppl against NumPyro and blackjax.

Each run is a fresh Python process with JAX's persistent compilation cache off, so that it
compiles everything, as a user's first call does. It imports its library, builds the model and
runs NUTS once (4 chains, 1000 + 1000 by default, auxiliary form, the settings of
``nuts_speed.py``), and reports the seconds spent importing, compiling (JAX's monitoring events:
tracing, lowering, XLA compilation, inside the call) and in the whole call, and the smallest bulk
ESS. The three methods alternate (their order rotates from one repeat to the next), so that a
change of machine load hits all three alike; the table has medians over repeats and the ratios
of emdppl's first call to NumPyro's and of its compile seconds to the hand-written blackjax
loop's (which samples emdppl's ``Target`` log density: its import includes emdppl's).

    python -m benchmarks.first_call             # the grid's models, 3 repeats
    python -m benchmarks.first_call --smoke     # eight schools, 2 chains, 100 + 100, 1 repeat
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("emdppl", "numpyro", "blackjax")
ROOT = Path(__file__).resolve().parent.parent
_REPORTED = ("import_seconds", "compile_seconds", "call_seconds", "first_call_seconds", "ess")


def _child(method: str, model: str, seed: int, settings: dict) -> dict:
    """One first call in this (fresh) process: ``{import_seconds, compile_seconds,
    call_seconds, first_call_seconds, ess}``; ``first_call_seconds`` = import + call."""
    start = time.perf_counter()
    if method == "numpyro":
        import numpyro  # noqa: F401
        import numpyro.infer  # noqa: F401
    else:
        import emdppl  # noqa: F401
        if method == "blackjax":
            import blackjax  # noqa: F401
    import_seconds = time.perf_counter() - start
    from benchmarks import common, nuts_speed
    from benchmarks.models import BENCHMARK_MODELS
    from emdppl.timing import stopwatch

    bench = BENCHMARK_MODELS[model]
    kwargs = bench.load_kwargs()
    with warnings.catch_warnings(), stopwatch() as watch:
        warnings.simplefilter("ignore", RuntimeWarning)  # divergences: not this table's point
        if method == "numpyro":
            out = common.make_numpyro_runner(bench, settings)(kwargs, seed)
        elif method == "emdppl":
            out = nuts_speed.run_emdppl(bench, kwargs, seed, settings)
        else:
            out = nuts_speed.run_blackjax(bench, kwargs, seed, settings)
    ess_bulk, _ = common.min_ess(out["draws"], bench.var_names)
    return {
        "import_seconds": import_seconds,
        "compile_seconds": watch.compile_seconds,
        "call_seconds": watch.wall_seconds,
        "first_call_seconds": import_seconds + watch.wall_seconds,
        "ess": ess_bulk,
    }


def _child_environment() -> dict[str, str]:
    """This environment without the persistent compilation cache, and with bytecode caching on
    (a user's default; a machine that sets ``PYTHONDONTWRITEBYTECODE`` would make every child
    recompile emdppl's and the benchmarks' sources, but not the installed libraries')."""
    skip = ("JAX_COMPILATION_CACHE", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    return env


def _fresh_run(method: str, model: str, seed: int, settings: dict) -> dict:
    """:func:`_child` in a new interpreter without the persistent compilation cache."""
    env = _child_environment()
    command = [
        sys.executable,
        "-m",
        "benchmarks.first_call",
        "--child",
        json.dumps({"method": method, "model": model, "seed": seed, "settings": settings}),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} on {model} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark_model(model: str, settings: dict, seed: int, repeats: int) -> dict:
    """``repeats`` fresh runs per method, alternating; medians and ratios."""
    import numpy as np

    runs = {method: [] for method in METHODS}
    for repeat in range(repeats):
        order = METHODS[repeat % 3 :] + METHODS[: repeat % 3]
        for method in order:
            runs[method].append(_fresh_run(method, model, seed + repeat, settings))
            print(f"{model} {method} #{repeat}: {runs[method][-1]}", file=sys.stderr)
    median = {
        method: {k: float(np.median([r[k] for r in runs[method]])) for k in _REPORTED}
        for method in METHODS
    }
    ratios = {
        "first_call emdppl/numpyro": median["emdppl"]["first_call_seconds"]
        / median["numpyro"]["first_call_seconds"],
        "compile emdppl/blackjax": median["emdppl"]["compile_seconds"]
        / median["blackjax"]["compile_seconds"],
        "call emdppl/numpyro": median["emdppl"]["call_seconds"]
        / median["numpyro"]["call_seconds"],
        "compile emdppl/numpyro": median["emdppl"]["compile_seconds"]
        / median["numpyro"]["compile_seconds"],
    }
    return {"median": median, "ratios": ratios, "runs": runs}


def print_table(results: dict) -> None:
    from benchmarks import common

    rows = [
        {"model": model, "method": method, **result["median"][method]}
        for model, result in results.items()
        for method in METHODS
    ]
    common.print_rows(
        f"{'model':<16} {'method':<9} {'import s':>8} {'compile s':>9} {'call s':>7} "
        f"{'first call s':>12} {'ESS bulk':>8}",
        rows,
        lambda r: f"{r['model']:<16} {r['method']:<9} {r['import_seconds']:>8.2f} "
        f"{r['compile_seconds']:>9.2f} {r['call_seconds']:>7.2f} "
        f"{r['first_call_seconds']:>12.2f} {r['ess']:>8.0f}",
    )
    for model, result in results.items():
        print(f"{model}: " + ", ".join(f"{k} x{v:.2f}" for k, v in result["ratios"].items()))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(names), 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        x = np.arange(len(names)) + (i - 1) * width
        parts = [
            [results[n]["median"][method][k] for n in names]
            for k in ("import_seconds", "compile_seconds")
        ]
        rest = [
            results[n]["median"][method]["first_call_seconds"] - parts[0][j] - parts[1][j]
            for j, n in enumerate(names)
        ]
        bottom = np.zeros(len(names))
        for values, label, hatch in zip(
            (*parts, rest), ("import", "compile", "run"), ("", "//", ".."), strict=True
        ):
            ax.bar(x, values, width, bottom=bottom, color=f"C{i}", hatch=hatch,
                   edgecolor="white", label=f"{method} {label}")
            bottom += np.asarray(values)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("seconds, fresh process, no compile cache (median)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("NUTS first call: import + compile + run (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks import common
    from benchmarks.models import BENCHMARK_MODELS

    parser = common.argument_parser(__doc__, smoke_help="eight schools, 2 chains, 100 + 100, once")
    parser.add_argument("--models", nargs="+", choices=sorted(BENCHMARK_MODELS),
                        default=sorted(BENCHMARK_MODELS))
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-warmup", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="fresh runs per method and model")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.num_chains, args.num_warmup, args.num_samples, args.repeats = (
            ["eight_schools"], 2, 100, 100, 1
        )
    out = common.output_dir(args)
    settings = {
        "num_chains": args.num_chains,
        "num_warmup": args.num_warmup,
        "num_samples": args.num_samples,
    }
    subprocess.run(  # bytecode for emdppl and benchmarks, as an installed package has it
        [sys.executable, "-m", "compileall", "-q", "emdppl", "benchmarks"],
        cwd=ROOT, env=_child_environment(), capture_output=True, check=True,
    )
    results = {m: benchmark_model(m, settings, args.seed, args.repeats) for m in args.models}
    print_table(results)
    report = common.make_report({**settings, "repeats": args.repeats}, results=results)
    common.save_report(out, "first_call", report, plot, results)
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        job = json.loads(sys.argv[2])
        print(json.dumps(_child(job["method"], job["model"], job["seed"], job["settings"])))
    else:
        main()
