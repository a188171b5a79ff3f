"""The ``emdppl`` command: ``emdppl samplers``, ``emdppl demo``, ``emdppl --version``."""

from __future__ import annotations

import argparse
import pathlib
import sys

from emdppl import __version__

__all__ = ["main"]


def _samplers(args: argparse.Namespace) -> int:
    from emdppl.samplers import get_sampler, samplers

    print(f"{'name':<8} {'kind':<11} {'input':<11} {'grads/step':<10} {'warm-up':<8} options")
    for name in samplers():
        s = get_sampler(name)
        kind = "exact" if s.is_exact else "unadjusted"
        needs = "logdensity" if s.needs_logdensity else "gradient"
        grads = str(s.grads_per_step) if s.grads_per_step is not None else "varies"
        warmup = "yes" if s.adapts else "no"
        print(f"{name:<8} {kind:<11} {needs:<11} {grads:<10} {warmup:<8} {s.defaults}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from emdppl.demo import run_all

    _enable_compilation_cache()
    run_all(pathlib.Path(args.out), smoke=args.smoke, rng_key=args.seed)
    return 0


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``~/.cache/emdppl/xla`` (compilation dominates a
    first run; a second run reuses it), unless ``JAX_COMPILATION_CACHE_DIR`` chooses another;
    with a size limit (16 GiB unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` sets one) where the
    ``filelock`` package is installed, which is what makes JAX lock the directory, so that a
    second demo can share it."""
    import importlib.util
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = pathlib.Path.home() / ".cache" / "emdppl" / "xla"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    locks = importlib.util.find_spec("filelock") is not None  # JAX needs it for a size limit
    if locks and jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", 16 * 2**30)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emdppl`` console script."""
    parser = argparse.ArgumentParser(
        prog="emdppl",
        description="MCMC (blackjax), SVI and EM distillation on NumPyro models in auxiliary form.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
