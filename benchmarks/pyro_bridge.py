"""The torch bridge on eight schools and German credit: per-call cost and NUTS ESS per second.

Two models, each a Pyro model with its NumPyro twin: eight schools (10 parameters, a funnel in
centered form) and Inference Gym's German credit logistic regression (25 weights, N = 1000,
``benchmarks.models.german_credit``), the regression the bridge was not developed on.

1. Per call, value and gradient of the auxiliary log density: the Pyro model through
   ``emdppl.bridge.target_from_pyro``, compiled to JAX (``evaluate="jax"``) and on the host
   (``evaluate="torch"``: one host round trip for all chains, ``torch.func.vmap``-ed), against
   the NumPyro twin (``emdppl.Target.from_numpyro``, native JAX), for 1, 4, 16 and 64 chains
   (vmapped).
2. NUTS (target acceptance 0.95, same warm-up and draws, auxiliary form): emdppl on both Pyro
   targets and on the NumPyro twin, for each ``--num-chains`` (chains vmapped; on the host
   every leapfrog step is one round trip for all of them), and Pyro's own ``pyro.infer.NUTS`` on
   the same auxiliary Pyro model, ``--pyro-chains`` chains run one after another (so its ESS
   per second does not depend on their number). ESS is the minimum bulk ESS over the model's
   latent sites; seconds are wall-clock of the whole run (compilation and the
   postprocessing to every site included; building the targets is timed apart). Ratios:
   each bridge / Pyro NUTS and / NumPyro at the same number of chains.

    python benchmarks/pyro_bridge.py            # 4 and 64 chains (Pyro: 2), 500 + 1000
    python benchmarks/pyro_bridge.py --models german_credit --num-chains 4
    python benchmarks/pyro_bridge.py --smoke    # 4 chains (Pyro: 1), 50 + 50, fewer timing calls
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import matplotlib
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402

import emdppl  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.models import german_credit, load_german_credit  # noqa: E402
from emdppl.bridge.pyro_model import auxiliary_pyro  # noqa: E402
from emdppl.bridge.pyro_target import target_from_pyro  # noqa: E402
from emdppl.models import EIGHT_SCHOOLS, eight_schools  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pyro_eight_schools(sigma, y=None):
    """The Pyro twin of ``emdppl.models.eight_schools``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("J", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def pyro_german_credit(features, labels=None):
    """The Pyro twin of ``benchmarks.models.german_credit``."""
    weights = pyro.sample(
        "weights", dist.Normal(torch.zeros(features.shape[-1]), 1.0).to_event(1)
    )
    with pyro.plate("N", features.shape[0]):
        pyro.sample("labels", dist.Bernoulli(logits=features @ weights), obs=labels)


class BridgeModel(NamedTuple):
    """A Pyro model, its NumPyro twin, their data and the sites whose ESS is reported."""

    pyro_model: Callable
    numpyro_model: Callable
    data: dict
    var_names: tuple[str, ...]


def _german_credit_data() -> dict:
    data = load_german_credit()
    return {"features": data["features"], "labels": data["labels"].astype(np.float32)}


MODELS = {
    "eight_schools": lambda: BridgeModel(
        pyro_eight_schools, eight_schools, EIGHT_SCHOOLS, ("mu", "tau", "theta")
    ),
    "german_credit": lambda: BridgeModel(
        pyro_german_credit, german_credit, _german_credit_data(), ("weights",)
    ),
}


def microseconds_per_call(target: emdppl.Target, num_chains: int, num_calls: int) -> float:
    """Median over 5 repeats of the mean time of one jitted (vmapped) value-and-gradient."""
    position = jax.tree.map(lambda x: x[:num_chains], target.initial_position)
    fn = jax.jit(jax.vmap(jax.value_and_grad(target.logdensity_fn)))
    jax.block_until_ready(fn(position))
    repeats = []
    for _ in range(5):
        with common.stopwatch() as watch:
            for _ in range(num_calls):
                jax.block_until_ready(fn(position))
        repeats.append(watch.wall_seconds / num_calls * 1e6)
    return float(np.median(repeats))


def run_emdppl(target: emdppl.Target, settings: dict, seed: int, var_names: tuple) -> dict:
    with common.stopwatch() as watch:
        result = emdppl.MCMC("nuts", target_accept=0.95, **settings).sample(
            seed, target, progress_bar=False
        )
        draws = target.postprocess(result.positions)
    return {"seconds": watch.wall_seconds, "ess": common.min_ess(draws, var_names)[0],
            "grad_evals": int(np.sum(result.stats["n_grad_evals"]))}


def run_pyro_nuts(bench: BridgeModel, settings: dict, num_chains: int, seed: int) -> dict:
    """Pyro's NUTS on the same auxiliary model (emdppl's reparam strategy), chains in turn."""
    from pyro.infer import MCMC, NUTS

    data = {k: torch.as_tensor(v) for k, v in bench.data.items()}
    model = auxiliary_pyro(bench.pyro_model)
    draws = {k: [] for k in bench.var_names}
    with common.stopwatch() as watch:
        for chain in range(num_chains):
            pyro.set_rng_seed(seed + chain)
            mcmc = MCMC(
                NUTS(model, target_accept_prob=0.95),
                num_samples=settings["num_samples"],
                warmup_steps=settings["num_warmup"],
                num_chains=1,
                disable_progbar=True,
            )
            mcmc.run(**data)
            trace_draws = _pyro_sites(model, mcmc.get_samples(), data, bench.var_names)
            for k in bench.var_names:
                draws[k].append(trace_draws[k])
    return {"seconds": watch.wall_seconds,
            "ess": common.min_ess({k: np.stack(v) for k, v in draws.items()}, bench.var_names)[0]}


def _pyro_sites(model, samples: dict, data: dict, var_names: tuple) -> dict:
    """The constrained ``var_names`` of each draw (deterministic in auxiliary form)."""
    from pyro import poutine

    num = next(iter(samples.values())).shape[0]
    out = {k: [] for k in var_names}
    for i in range(num):
        values = {k: v[i] for k, v in samples.items()}
        trace = poutine.trace(poutine.condition(model, values)).get_trace(**data)
        for k in var_names:
            out[k].append(trace.nodes[k]["value"].detach().numpy())
    return {k: np.stack(v) for k, v in out.items()}


def print_table(results: dict) -> None:
    for name, model in results["models"].items():
        print(f"\n{name}: per call, value + gradient (microseconds)")
        labels = list(next(iter(model["per_call_us"].values())))
        print(f"{'chains':>7} " + " ".join(f"{label:>10}" for label in labels))
        for chains, row in model["per_call_us"].items():
            print(f"{chains:>7} " + " ".join(f"{row[label]:>10.1f}" for label in labels))
        print(f"\n{name}: NUTS (auxiliary form)")
        print(f"{'method':<48} {'seconds':>9} {'min ESS':>9} {'ESS/s':>9}")
        for method, row in model["nuts"].items():
            print(f"{method:<48} {row['seconds']:>9.1f} {row['ess']:>9.0f} "
                  f"{row['ess_per_s']:>9.2f}")
        for chains, row in model["ratios"].items():
            print(f"{chains:>4} chains: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))


def plot(results: dict, path: Path) -> None:
    models = results["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.5 * len(models)), squeeze=False)
    for (name, model), (left, right) in zip(models.items(), axes, strict=True):
        chains = list(model["per_call_us"])
        labels = list(model["per_call_us"][chains[0]])
        width = 0.8 / len(labels)
        for i, key in enumerate(labels):
            left.bar(np.arange(len(chains)) + (i - (len(labels) - 1) / 2) * width,
                     [model["per_call_us"][c][key] for c in chains], width, label=key)
        left.set(xticks=range(len(chains)), xticklabels=[f"{c} chain(s)" for c in chains],
                 ylabel="microseconds per value+grad", yscale="log", title=name)
        left.legend()
        methods = list(model["nuts"])
        right.barh(methods, [model["nuts"][m]["ess_per_s"] for m in methods])
        right.set(xlabel="min bulk ESS per second", xscale="log", title=name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: How the Pyro model is evaluated: ``target_from_pyro``'s ``evaluate``, or the NumPyro twin.
EVALUATIONS = {"compiled": "jax", "host": "torch"}


def run_model(bench: BridgeModel, args: argparse.Namespace, settings: dict) -> dict:
    """Per-call costs, then NUTS: Pyro's own, and emdppl on the bridge (compiled to JAX and
    on the host) and on the NumPyro twin."""
    call_chains = (1, 4, 16, 64)
    most = max(*args.num_chains, *call_chains)
    targets, build_seconds = {}, {}
    for label, evaluate in EVALUATIONS.items():
        with common.stopwatch() as watch:
            targets[label] = target_from_pyro(
                bench.pyro_model, model_kwargs=bench.data, num_chains=most, evaluate=evaluate
            )
        build_seconds[label] = watch.wall_seconds
    targets["native"] = emdppl.Target.from_numpyro(
        bench.numpyro_model, model_kwargs=bench.data, num_chains=most
    )
    per_call = {
        chains: {
            label: microseconds_per_call(target, chains, args.num_calls)
            for label, target in targets.items()
        }
        for chains in call_chains
    }

    def chains_of(target, num_chains):
        return target.with_initial_position(
            jax.tree.map(lambda x: x[:num_chains], target.initial_position)
        )

    pyro_row = f"Pyro NUTS, {args.pyro_chains} chain(s) in turn"
    nuts = {pyro_row: run_pyro_nuts(bench, settings, args.pyro_chains, args.seed)}
    for chains in args.num_chains:
        for label, target in targets.items():
            nuts[_row(label, chains)] = run_emdppl(
                chains_of(target, chains), settings, args.seed, bench.var_names
            )
    for row in nuts.values():
        row["ess_per_s"] = row["ess"] / row["seconds"]
    ratios = {
        chains: {
            f"{label}_over_{baseline}": nuts[_row(label, chains)]["ess_per_s"] / reference
            for label in EVALUATIONS
            for baseline, reference in (
                ("pyro_nuts", nuts[pyro_row]["ess_per_s"]),
                ("numpyro", nuts[_row("native", chains)]["ess_per_s"]),
            )
        }
        for chains in args.num_chains
    }
    host = targets["host"].logdensity_fn.host
    return {
        "per_call_us": per_call,
        "target_build_seconds": build_seconds,
        "nuts": nuts,
        "ratios": ratios,
        "batching": host.batching,
        "traced_batch_sizes": sorted(k for k, v in host.traced.items() if v is not None),
        "postprocess_batching": targets["host"].postprocess_fn.host.batching,
    }


def _row(label: str, chains: int) -> str:
    name = {"compiled": "Pyro bridge compiled", "host": "Pyro bridge on host"}.get(label, "NumPyro")
    return f"emdppl NUTS, {name}, {chains} chains"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--num-chains", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--pyro-chains", type=int, default=2)
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--num-calls", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="50 + 50 draws, 10 timing calls")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_chains, args.pyro_chains = [4], 1
        args.num_warmup, args.num_samples, args.num_calls = 50, 50, 10
    torch.set_num_threads(1)
    settings = {"num_warmup": args.num_warmup, "num_samples": args.num_samples}
    models = {name: run_model(MODELS[name](), args, settings) for name in args.models}
    results = common.make_report(
        {**settings, "models": args.models, "num_chains": args.num_chains,
         "pyro_chains": args.pyro_chains, "num_calls": args.num_calls, "smoke": args.smoke},
        models=models,
    )
    results["machine"].update(torch_version=torch.__version__, pyro_version=pyro.__version__)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pyro_bridge_smoke" if args.smoke else "pyro_bridge"
    common.save_report(args.out, stem, results, plot, results)
    return results


if __name__ == "__main__":
    main()
