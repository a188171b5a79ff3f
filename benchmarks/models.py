"""Models shared by the benchmarks: each a centered NumPyro model and a loader of its data.

Every model is written the way people write it; a benchmark hands ``emdppl.auxiliary(model)``
to baselines so that every method samples the same non-centered log density emdppl builds
with ``emdppl.infer(..., auxiliary=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from emdppl.models import EIGHT_SCHOOLS, eight_schools

__all__ = ["BENCHMARK_MODELS", "BenchmarkModel", "german_credit", "load_german_credit"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def german_credit(features: jnp.ndarray, labels: jnp.ndarray | None = None) -> None:
    r"""Inference Gym's German credit logistic regression.

    :math:`w \sim N(0, I_{25})`,
    :math:`y_j \sim \mathrm{Bernoulli}(\mathrm{logit}^{-1}(x_j^\top w))`; ``features`` (N, 25)
    standardized features with the intercept column last, ``labels`` (N,) in {0, 1} or ``None``
    for the prior predictive.
    """
    weights = numpyro.sample("weights", dist.Normal(jnp.zeros(features.shape[-1]), 1.0).to_event(1))
    with numpyro.plate("N", features.shape[0]):
        numpyro.sample("labels", dist.Bernoulli(logits=features @ weights), obs=labels)


def load_german_credit(path: Path = DATA_DIR / "german.data-numeric") -> dict[str, np.ndarray]:
    """``{"features": (1000, 25) float32, "labels": (1000,) int32}`` as Inference Gym builds them.

    Features standardized with the population std (ddof=0) over all rows, a column of ones
    appended last (the intercept); labels ``class - 1`` (1 = bad credit).
    """
    raw = np.loadtxt(path)
    features, labels = raw[:, :-1], raw[:, -1]
    features = (features - features.mean(0)) / features.std(0)
    features = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    return {
        "features": features.astype(np.float32),
        "labels": (labels - 1).astype(np.int32),
    }


def _eight_schools_data() -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in EIGHT_SCHOOLS.items()}


class BenchmarkModel(NamedTuple):
    """A model, a loader of its keyword arguments, and the sites whose ESS is compared."""

    model: Callable
    load_kwargs: Callable[[], dict]
    var_names: tuple[str, ...]


BENCHMARK_MODELS: dict[str, BenchmarkModel] = {
    "eight_schools": BenchmarkModel(eight_schools, _eight_schools_data, ("mu", "tau", "theta")),
    "german_credit": BenchmarkModel(german_credit, load_german_credit, ("weights",)),
}
