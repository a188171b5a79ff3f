"""The ``emdppl`` command: ``emdppl samplers``, ``emdppl demo``."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

__all__ = ["main"]


def _samplers(args: argparse.Namespace) -> int:
    from emdppl.samplers import get_sampler, samplers

    print(f"{'name':<8} {'kind':<11} {'input':<11} {'grads/step':<10} {'warm-up':<8} options")
    for name in samplers():
        s = get_sampler(name)
        kind = "exact" if s.is_exact else "unadjusted"
        needs = "logdensity" if s.needs_logdensity else "gradient"
        grads = str(s.grads_per_step) if s.grads_per_step is not None else "varies"
        warmup = "yes" if s.warmup is not None else "no"
        print(f"{name:<8} {kind:<11} {needs:<11} {grads:<10} {warmup:<8} {s.defaults}")
    return 0


def eight_schools_demo(out_dir: pathlib.Path, *, smoke: bool = False, rng_key: int = 0) -> dict:
    """NUTS on eight schools, auxiliary vs centered: ArviZ summaries, trace and rank plots.

    Writes ``eight_schools_summary.txt``, ``eight_schools_trace.png``, ``eight_schools_rank.png``
    and returns the headline numbers (divergences, max R-hat, min bulk ESS, tau's mean).
    """
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import emdppl
    from emdppl.demo import PLOT_LOCK
    from emdppl.models import EIGHT_SCHOOLS, eight_schools

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
                progress_bar=False,  # the distillation's bars run next to it (see _demo)
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


def _demo(args: argparse.Namespace) -> int:
    from emdppl.demo import format_table, run_demo

    _enable_compilation_cache()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The two parts are independent: run them in two threads, so that their (XLA, GIL-free)
    # compilations overlap on a multi-core machine (a first run is mostly compilation).
    with ThreadPoolExecutor(max_workers=1) as pool:
        distillation = pool.submit(
            run_demo, out_dir, smoke=args.smoke, rng_key=args.seed, progress_bar=True
        )
        schools = eight_schools_demo(out_dir, smoke=args.smoke, rng_key=args.seed)
        metrics = {"eight_schools": schools, "distillation": distillation.result()}
    for form, m in metrics["eight_schools"].items():
        print(
            f"eight schools NUTS, {form:9}: {m['divergences']:3d} divergences, max R-hat "
            f"{m['max_r_hat']:.2f}, min bulk ESS {m['min_ess_bulk']:.0f}, tau {m['tau_mean']:.2f}"
        )
    print(format_table(metrics["distillation"]))
    (out_dir / "demo_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {sorted(p.name for p in out_dir.iterdir())} to {out_dir}")
    return 0


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``~/.cache/emdppl/jax`` (compilation dominates a
    first run; a second run reuses it), unless ``JAX_COMPILATION_CACHE_DIR`` chooses another."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = pathlib.Path.home() / ".cache" / "emdppl" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(cache))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emdppl`` console script."""
    parser = argparse.ArgumentParser(
        prog="emdppl",
        description="MCMC (blackjax), SVI and EM distillation on NumPyro models in auxiliary form.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("samplers", help="list the registered samplers").set_defaults(func=_samplers)
    demo = sub.add_parser("demo", help="offline demo on embedded models; writes plots and JSON")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--smoke", action="store_true", help="tiny run (< 1 min)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
