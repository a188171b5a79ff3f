"""Helpers shared by the benchmark scripts: ESS, the NumPyro NUTS baseline, timing, machine,
the shared command-line options and the JSON + PNG report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import arviz as az
import jax
import numpy as np
from numpyro.infer import MCMC as NumPyroMCMC
from numpyro.infer import NUTS

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import emdppl  # noqa: E402
from benchmarks.models import BenchmarkModel  # noqa: E402
from emdppl.inference_data import versions  # noqa: E402
from emdppl.timing import stopwatch  # noqa: E402

__all__ = [
    "RESULTS_DIR",
    "argument_parser",
    "machine",
    "make_numpyro_runner",
    "make_report",
    "min_ess",
    "output_dir",
    "print_rows",
    "save_report",
    "stopwatch",
    "watched",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def min_ess(draws: dict[str, np.ndarray], var_names: tuple[str, ...]) -> tuple[float, float]:
    """Smallest bulk and tail ESS over every scalar component of ``var_names``."""
    dataset = az.convert_to_dataset({k: np.asarray(draws[k]) for k in var_names})
    bulk = az.ess(dataset, method="bulk")
    tail = az.ess(dataset, method="tail")
    return (
        float(min(bulk[k].values.min() for k in var_names)),
        float(min(tail[k].values.min() for k in var_names)),
    )


def make_numpyro_runner(bench: BenchmarkModel, settings: dict) -> Callable:
    """NumPyro NUTS (vectorized chains) on ``emdppl.auxiliary(bench.model)``.

    One MCMC object per model, so its compiled sampler is reused across seeds;
    ``run_numpyro(kwargs, seed)`` returns wall ``seconds``, ``draws`` of ``bench.var_names``
    ``(chain, draw, ...)``, ``n_grad_evals`` and ``divergences`` of the sampling phase.
    """
    mcmc = NumPyroMCMC(
        NUTS(emdppl.auxiliary(bench.model), target_accept_prob=0.8, max_tree_depth=10),
        num_warmup=settings["num_warmup"],
        num_samples=settings["num_samples"],
        num_chains=settings["num_chains"],
        chain_method="vectorized",
        progress_bar=False,
    )

    def run_numpyro(kwargs: dict, seed: int) -> dict:
        start = time.perf_counter()
        mcmc.run(jax.random.key(seed), extra_fields=("num_steps", "diverging"), **kwargs)
        samples = jax.device_get(mcmc.get_samples(group_by_chain=True))
        extra = jax.device_get(mcmc.get_extra_fields(group_by_chain=True))
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "draws": {k: samples[k] for k in bench.var_names},
            "n_grad_evals": int(np.sum(extra["num_steps"])),
            "divergences": int(np.sum(extra["diverging"])),
        }

    return run_numpyro


def watched(runner: Callable, seed: int) -> dict:
    """Run, and add the seconds JAX spent tracing and compiling inside the run."""
    with stopwatch() as watch:
        out = runner(seed)
    return {**out, "compile_seconds_in_run": watch.compile_seconds}


def machine() -> dict:
    """Platform, CPU count, JAX devices and library versions, for the JSON reports."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_backend": jax.default_backend(),
        **versions(),
    }


def argument_parser(doc: str, smoke_help: str) -> argparse.ArgumentParser:
    """A script's parser, described by ``doc``'s first line, with the options every script has:
    ``--seed`` (default 0), ``--out`` (see :func:`output_dir`) and ``--smoke`` (``smoke_help``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results; temporary with --smoke)")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """``args.out``; by default a temporary folder with ``--smoke``, else :data:`RESULTS_DIR`.
    Created if missing."""
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_report(settings: dict, **sections: object) -> dict:
    """The JSON report: ``{"settings": settings, "machine": machine(), **sections}``."""
    return {"settings": settings, "machine": machine(), **sections}


def print_rows(header: str, rows: Iterable[dict], format_row: Callable[[dict], str]) -> None:
    """The final table on stdout: ``header``, a rule, then ``format_row(row)`` for each row."""
    print(header)
    print("-" * len(header))
    for row in rows:
        print(format_row(row))


def save_report(out: Path, name: str, report: dict, plot: Callable, plot_data: object) -> None:
    """Write ``out/name.json`` and ``out/name.png`` (``plot(plot_data, path)``) and say so."""
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(plot_data, out / f"{name}.png")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")
