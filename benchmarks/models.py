"""Models shared by the benchmarks: each a centered NumPyro model and a loader of its data.

Every model is written the way people write it; a benchmark hands ``emdppl.auxiliary(model)``
to baselines so that every method samples the same non-centered log density emdppl builds
with ``emdppl.infer(..., auxiliary=True)``.
"""

from __future__ import annotations

import functools
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import biject_to, constraints

from emdppl.models import EIGHT_SCHOOLS, eight_schools

__all__ = [
    "BENCHMARK_MODELS",
    "NUMPYRO_EXAMPLE_MODELS",
    "SAMPLER_MODELS",
    "SPEED_MODELS",
    "BenchmarkModel",
    "arK",
    "banana",
    "baseball_logit",
    "brownian_motion",
    "diamonds",
    "german_credit",
    "gp_regression",
    "hmm_example",
    "horseshoe_regression",
    "kilpisjarvi",
    "load_german_credit",
    "low_dim_gauss_mix",
    "neals_funnel",
    "sparse_german_credit",
    "zero_inflated_poisson",
]

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


def sparse_german_credit(features: jnp.ndarray, labels: jnp.ndarray | None = None) -> None:
    r"""Inference Gym's sparse logistic regression on German credit, 51 parameters.

    :math:`\tau \sim \mathrm{Gamma}(0.5, 0.5)` (global scale),
    :math:`\lambda_k \sim \mathrm{Gamma}(0.5, 0.5)` (local scales, 25),
    :math:`w_k \sim N(0, \tau\lambda_k)`, a Bernoulli-logit likelihood as
    :func:`german_credit`; written centered (Inference Gym writes the weights non-centered, which
    is this model's auxiliary form). ``features`` (N, 25), ``labels`` (N,) or ``None``.
    """
    global_scale = numpyro.sample("global_scale", dist.Gamma(0.5, 0.5))
    local_scales = numpyro.sample(
        "local_scales", dist.Gamma(0.5 * jnp.ones(features.shape[-1]), 0.5).to_event(1)
    )
    weights = numpyro.sample("weights", dist.Normal(0.0, global_scale * local_scales).to_event(1))
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


def flat(name: str, support: constraints.Constraint, shape: tuple[int, ...] = ()) -> jax.Array:
    """A latent with a flat density on ``support``, as a Stan parameter without a prior.

    Sampled as a standard normal pushed through ``biject_to(support)`` and its density taken
    back out with a factor, since NumPyro's ``ImproperUniform`` cannot draw initial values.
    """
    base = dist.Normal(jnp.zeros(shape), 1.0).to_event(len(shape))
    flat = dist.TransformedDistribution(base, biject_to(support))
    value = numpyro.sample(name, flat)
    numpyro.factor(f"{name}_flat", -flat.log_prob(value))
    return value


def neals_funnel() -> None:
    r"""Neal's funnel in 10 dimensions (Inference Gym), centered.

    :math:`z \sim N(0, 3)`, :math:`x_i \sim N(0, e^{z/2})` for :math:`i = 1..9`; no data.
    """
    z = numpyro.sample("z", dist.Normal(0.0, 3.0))
    with numpyro.plate("i", 9):
        numpyro.sample("x", dist.Normal(0.0, jnp.exp(z / 2)))


def banana() -> None:
    r"""Inference Gym's banana (curvature 0.03), centered.

    :math:`x_0 \sim N(0, 10)`, :math:`x_1 \sim N(0.03 (x_0^2 - 100), 1)`; no data.
    """
    x0 = numpyro.sample("x0", dist.Normal(0.0, 10.0))
    numpyro.sample("x1", dist.Normal(0.03 * (x0**2 - 100.0), 1.0))


def brownian_motion(observed_locs: jnp.ndarray) -> None:
    r"""Inference Gym's Brownian motion with missing middle observations, centered.

    :math:`l_0 \sim N(0, 0.1)`, :math:`l_t \sim N(l_{t-1}, 0.1)`,
    :math:`o_t \sim N(l_t, 0.15)` where ``observed_locs`` (T,) is not NaN. One site per step
    (``loc_0``, ...), collected in the deterministic site ``locs`` (T,).
    """
    locs, previous = [], 0.0
    for t in range(observed_locs.shape[0]):
        previous = numpyro.sample(f"loc_{t}", dist.Normal(previous, 0.1))
        locs.append(previous)
    locs = numpyro.deterministic("locs", jnp.stack(locs))
    is_observed = ~jnp.isnan(observed_locs)
    with numpyro.plate("T", observed_locs.shape[0]):
        numpyro.sample(
            "observed_locs",
            dist.Normal(locs, 0.15).mask(is_observed),
            obs=jnp.where(is_observed, observed_locs, 0.0),
        )


def arK(lags: jnp.ndarray, y: jnp.ndarray) -> None:  # noqa: N802 (posteriordb's name)
    r"""posteriordb ``arK``: AR(K) with :math:`\alpha, \beta_k \sim N(0, 10)`,
    :math:`\sigma \sim \mathrm{HalfCauchy}(2.5)`, :math:`y_t \sim N(\alpha + \beta^\top
    y_{t-1:t-K}, \sigma)`; ``lags`` (T-K, K) with ``lags[t, k] = y[t + K - k - 1]``, ``y`` (T-K,).
    """
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    with numpyro.plate("K", lags.shape[1]):
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    with numpyro.plate("T", lags.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y)


def kilpisjarvi(
    x: jnp.ndarray,
    y: jnp.ndarray,
    pmualpha: jnp.ndarray,
    psalpha: jnp.ndarray,
    pmubeta: jnp.ndarray,
    psbeta: jnp.ndarray,
) -> None:
    r"""posteriordb ``kilpisjarvi``: :math:`y \sim N(\alpha + \beta x, \sigma)` on the raw years
    ``x`` (N,) near 2000 (hence the alpha-beta correlation), flat prior on :math:`\sigma > 0`."""
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = flat("sigma", constraints.positive)
    with numpyro.plate("N", x.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def low_dim_gauss_mix(y: jnp.ndarray) -> None:
    r"""posteriordb ``low_dim_gauss_mix``: two-component normal mixture, ordered means.

    :math:`\mu` ordered with :math:`N(0, 2)` densities,
    :math:`\sigma_k \sim \mathrm{HalfNormal}(2)`,
    :math:`\theta \sim \mathrm{Beta}(5, 5)`, the labels summed out; ``y`` (N,).
    """
    mu = flat("mu", constraints.ordered_vector, (2,))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    with numpyro.plate("components", 2):
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    log_weights = jnp.stack([jnp.log(theta), jnp.log1p(-theta)])
    log_lik = dist.Normal(mu, sigma).log_prob(y[:, None]) + log_weights
    numpyro.factor("y", jax.nn.logsumexp(log_lik, axis=-1).sum())


def hmm_example(y: jnp.ndarray) -> None:
    r"""posteriordb ``hmm_example``: two-state HMM, unit-variance normal emissions.

    Transition rows ``theta1``, ``theta2`` uniform on the simplex, ``mu`` positive ordered with
    :math:`N(3, 1)` and :math:`N(10, 1)` densities; the states summed out by the forward
    algorithm (``lax.scan``); ``y`` (N,).
    """
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(2)))
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(2)))
    mu = flat("mu", constraints.positive_ordered_vector, (2,))
    numpyro.factor("mu_prior", dist.Normal(jnp.array([3.0, 10.0]), 1.0).log_prob(mu).sum())
    log_transition = jnp.log(jnp.stack([theta1, theta2]))  # [from, to]
    log_emission = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (N, K)

    def forward(gamma, log_emission_t):
        gamma = jax.nn.logsumexp(gamma[:, None] + log_transition, axis=0) + log_emission_t
        return gamma, None

    gamma, _ = jax.lax.scan(forward, log_emission[0], log_emission[1:])
    numpyro.factor("y", jax.nn.logsumexp(gamma))


def diamonds(Xc: jnp.ndarray, Y: jnp.ndarray) -> None:  # noqa: N803 (brms's names)
    r"""posteriordb ``diamonds`` (brms): :math:`Y \sim N(\mathrm{Intercept} + X_c b, \sigma)`.

    :math:`b \sim N(0, 1)`, :math:`\mathrm{Intercept} \sim t_3(8, 10)`, :math:`\sigma \sim
    t_3^+(0, 10)`; ``Xc`` (N, K-1) the column-centered design without its intercept, ``Y`` (N,).
    """
    with numpyro.plate("K", Xc.shape[1]):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    sigma = flat("sigma", constraints.positive)
    numpyro.factor("sigma_prior", dist.StudentT(3.0, 0.0, 10.0).log_prob(sigma) + jnp.log(2.0))
    with numpyro.plate("N", Xc.shape[0]):
        numpyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


def posteriordb_data(name: str) -> dict:
    with zipfile.ZipFile(DATA_DIR / "posteriordb" / "data" / f"{name}.json.zip") as archive:
        return json.loads(archive.read(archive.namelist()[0]))


def _arK_data() -> dict[str, np.ndarray]:  # noqa: N802
    data = posteriordb_data("arK")
    y, num_lags = np.asarray(data["y"]), data["K"]
    lags = np.stack([y[num_lags - k - 1 : len(y) - k - 1] for k in range(num_lags)], axis=1)
    return {"lags": lags.astype(np.float32), "y": y[num_lags:].astype(np.float32)}


def _kilpisjarvi_data() -> dict[str, np.ndarray]:
    data = posteriordb_data("kilpisjarvi_mod")
    keys = ("x", "y", "pmualpha", "psalpha", "pmubeta", "psbeta")
    return {k: np.asarray(data[k], np.float32) for k in keys}


def _gauss_mix_data() -> dict[str, np.ndarray]:
    return {"y": np.asarray(posteriordb_data("low_dim_gauss_mix")["y"], np.float32)}


def _hmm_data() -> dict[str, np.ndarray]:
    return {"y": np.asarray(posteriordb_data("hmm_example")["y"], np.float32)}


def _diamonds_data() -> dict[str, np.ndarray]:
    data = posteriordb_data("diamonds")
    x = np.asarray(data["X"])[:, 1:]
    return {"Xc": (x - x.mean(0)).astype(np.float32), "Y": np.asarray(data["Y"], np.float32)}


def _gym_json(name: str) -> dict:
    return json.loads((DATA_DIR / "inference_gym" / f"{name}.json").read_text())


def _brownian_data() -> dict[str, np.ndarray]:
    observed = _gym_json("brownian_motion_missing_middle_observations")["data"]["observed_locs"]
    return {"observed_locs": np.array([np.nan if o is None else o for o in observed], np.float32)}


def _no_data() -> dict:
    return {}


Reference = dict[str, dict[str, np.ndarray]]
"""``{site: {"mean", "sd", "mcse"}}``, arrays of the site's shape (``mcse`` 0 when exact)."""


def posteriordb_moments(posterior: str) -> Reference:
    """Means (with MCSE) and sds from posteriordb's summary statistics of its reference draws."""
    folder = DATA_DIR / "posteriordb"
    means = json.loads((folder / "mean_value" / f"{posterior}.json").read_text())
    squares = json.loads((folder / "mean_squared_value" / f"{posterior}.json").read_text())
    sites: dict[str, dict[str, list]] = {}
    for i, name in enumerate(means["names"]):
        mean = means["mean_value"][i]
        entry = sites.setdefault(name.split("[")[0], {"mean": [], "sd": [], "mcse": []})
        entry["mean"].append(mean)
        entry["sd"].append(np.sqrt(squares["mean_squared_value"][i] - mean**2))
        entry["mcse"].append(means["mcse_mean"][i])
    vectors = {name.split("[")[0] for name in means["names"] if "[" in name}
    return {
        site: {k: np.asarray(v if site in vectors else v[0]) for k, v in entry.items()}
        for site, entry in sites.items()
    }


def posteriordb_draws(posterior: str) -> dict[str, np.ndarray]:
    """posteriordb's reference draws of ``posterior`` (``data/posteriordb/draws/``), chains
    pooled: ``{site: (draws,) or (draws, length)}``; Stan's ``x[i]`` (1-based) is column
    ``i - 1`` of ``x``."""
    path = DATA_DIR / "posteriordb" / "draws" / f"{posterior}.json.zip"
    with zipfile.ZipFile(path) as archive:
        chains = json.loads(archive.read(archive.namelist()[0]))
    columns: dict[str, list[np.ndarray]] = {}
    for name in chains[0]:
        pooled = np.concatenate([np.asarray(chain[name], float) for chain in chains])
        columns.setdefault(name.split("[")[0], []).append(pooled)
    vectors = {name.split("[")[0] for name in chains[0] if "[" in name}
    return {
        site: np.stack(cols, axis=1) if site in vectors else cols[0]
        for site, cols in columns.items()
    }


def _gym_reference(name: str, sites: tuple[tuple[str, int | None], ...], exact: bool) -> Reference:
    """Split Inference Gym's flat ground truth into ``sites`` ((name, length or None), in order);
    ``exact``: the analytic / Kalman values (MCSE 0), else Stan's estimates with their MCSE."""
    gym = _gym_json(name)
    mean = np.asarray(gym.get("exact_mean", gym["flat_mean"]))
    sd = np.asarray(gym.get("exact_standard_deviation", gym["flat_standard_deviation"]))
    mcse = np.zeros_like(mean) if exact else np.asarray(gym["flat_mean_standard_error"])
    out, start = {}, 0
    for site, length in sites:
        stop = start + (length or 1)
        pick = slice(start, stop) if length else start
        out[site] = {"mean": mean[pick], "sd": sd[pick], "mcse": mcse[pick]}
        start = stop
    return out


def _eight_schools_data() -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in EIGHT_SCHOOLS.items()}


class BenchmarkModel(NamedTuple):
    """A model, a loader of its keyword arguments, the sites compared, and their reference.

    ``reference()`` returns the gold-standard posterior moments of ``var_names`` (see
    :data:`Reference`), ``reference_draws()`` (where stored) the draws they come from;
    ``has_centered_form``: the model has a latent whose prior scale is another
    latent (a hierarchy or a funnel), so its centered and auxiliary forms differ in geometry.
    """

    model: Callable
    load_kwargs: Callable[[], dict]
    var_names: tuple[str, ...]
    reference: Callable[[], Reference] | None = None
    has_centered_form: bool = False
    reference_draws: Callable[[], dict[str, np.ndarray]] | None = None


BENCHMARK_MODELS: dict[str, BenchmarkModel] = {
    "eight_schools": BenchmarkModel(
        eight_schools,
        _eight_schools_data,
        ("mu", "tau", "theta"),
        lambda: posteriordb_moments("eight_schools-eight_schools_noncentered"),
        has_centered_form=True,
    ),
    "german_credit": BenchmarkModel(
        german_credit,
        load_german_credit,
        ("weights",),
        lambda: _gym_reference(
            "german_credit_numeric_logistic_regression", (("weights", 25),), exact=False
        ),
    ),
}
"""The models of the sampler grid (``nuts_speed.py``, ``first_call.py``)."""

SPEED_MODELS: dict[str, BenchmarkModel] = {
    **BENCHMARK_MODELS,
    "sparse_german_credit": BenchmarkModel(
        sparse_german_credit,
        load_german_credit,
        ("global_scale", "local_scales", "weights"),
        has_centered_form=True,
    ),
}
"""``nuts_speed.py``'s models: the grid and a held-out one (issue #15's 51-parameter sparse
logistic regression; no reference posterior, only speed is compared)."""

SAMPLER_MODELS: dict[str, BenchmarkModel] = {
    **BENCHMARK_MODELS,
    "neals_funnel": BenchmarkModel(
        neals_funnel,
        _no_data,
        ("z", "x"),
        lambda: _gym_reference("neals_funnel", (("z", None), ("x", 9)), exact=True),
        has_centered_form=True,
    ),
    "banana": BenchmarkModel(
        banana,
        _no_data,
        ("x0", "x1"),
        lambda: _gym_reference("banana", (("x0", None), ("x1", None)), exact=True),
        has_centered_form=True,
    ),
    "brownian_motion": BenchmarkModel(
        brownian_motion,
        _brownian_data,
        ("locs",),
        lambda: _gym_reference(
            "brownian_motion_missing_middle_observations", (("locs", 30),), exact=True
        ),
        has_centered_form=True,
    ),
    "kilpisjarvi": BenchmarkModel(
        kilpisjarvi,
        _kilpisjarvi_data,
        ("alpha", "beta", "sigma"),
        lambda: posteriordb_moments("kilpisjarvi_mod-kilpisjarvi"),
    ),
    "arK": BenchmarkModel(
        arK, _arK_data, ("alpha", "beta", "sigma"), lambda: posteriordb_moments("arK-arK")
    ),
    "low_dim_gauss_mix": BenchmarkModel(
        low_dim_gauss_mix,
        _gauss_mix_data,
        ("mu", "sigma", "theta"),
        lambda: posteriordb_moments("low_dim_gauss_mix-low_dim_gauss_mix"),
    ),
    "hmm_example": BenchmarkModel(
        hmm_example,
        _hmm_data,
        ("theta1", "theta2", "mu"),
        lambda: posteriordb_moments("hmm_example-hmm_example"),
    ),
    "diamonds": BenchmarkModel(
        diamonds,
        _diamonds_data,
        ("b", "Intercept", "sigma"),
        lambda: posteriordb_moments("diamonds-diamonds"),
    ),
}
"""The models of ``samplers.py``, each with its reference posterior."""


# ------------------------------------------------------------------------------------------
# NumPyro's examples (examples/baseball.py, horseshoe_regression.py, zero_inflated_poisson.py,
# gp.py), for ``emd_posteriors.py``; their references are NUTS runs (no gold standard), except
# the horseshoe's: an exact Gibbs sampler (NUTS diverges on it).

#: Efron and Morris (1975): hits in each of 18 players' first 45 at bats of the 1970 season
#: (Clemente, F. Robinson, F. Howard, Johnstone, Berry, Spencer, Kessinger, L. Alvarado, Santo,
#: Swoboda, Unser, Williams, Scott, Petrocelli, E. Rodriguez, Campaneris, Munson, Alvis).
BASEBALL_HITS = (18, 17, 16, 15, 14, 14, 13, 12, 11, 11, 10, 10, 10, 10, 10, 9, 8, 7)


def baseball_logit(at_bats: jnp.ndarray, hits: jnp.ndarray | None = None) -> None:
    r"""NumPyro's ``partially_pooled_with_logit`` (examples/baseball.py).

    :math:`\mathrm{loc} \sim N(-1, 1)`, :math:`\mathrm{scale} \sim \mathrm{HalfCauchy}(1)`,
    :math:`\alpha_i \sim N(\mathrm{loc}, \mathrm{scale})`,
    :math:`\mathrm{hits}_i \sim \mathrm{Binomial}(\mathrm{at\_bats}_i, \mathrm{logit}^{-1}
    \alpha_i)`; ``at_bats``, ``hits`` (18,).
    """
    loc = numpyro.sample("loc", dist.Normal(-1.0, 1.0))
    scale = numpyro.sample("scale", dist.HalfCauchy(1.0))
    with numpyro.plate("num_players", at_bats.shape[0]):
        alpha = numpyro.sample("alpha", dist.Normal(loc, scale))
        numpyro.sample("obs", dist.Binomial(at_bats, logits=alpha), obs=hits)


def horseshoe_regression(X: jnp.ndarray, Y: jnp.ndarray) -> None:  # noqa: N803 (NumPyro's names)
    r"""NumPyro's ``model_normal_likelihood`` (examples/horseshoe_regression.py).

    :math:`\lambda_j, \tau \sim \mathrm{HalfCauchy}(1)`, :math:`\tilde\beta_j \sim N(0, 1)`,
    :math:`\beta = \tau\lambda\tilde\beta`, precision :math:`\sim \mathrm{Gamma}(3, 1)`,
    :math:`Y \sim N(X\beta, \mathrm{precision}^{-1/2})`; ``X`` (N, D), ``Y`` (N,).
    """
    num_features = X.shape[1]
    lambdas = numpyro.sample("lambdas", dist.HalfCauchy(jnp.ones(num_features)))
    tau = numpyro.sample("tau", dist.HalfCauchy(jnp.ones(1)))
    unscaled_betas = numpyro.sample("unscaled_betas", dist.Normal(0.0, jnp.ones(num_features)))
    betas = numpyro.deterministic("betas", tau * lambdas * unscaled_betas)
    prec_obs = numpyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    numpyro.sample("Y", dist.Normal(X @ betas, 1.0 / jnp.sqrt(prec_obs)), obs=Y)


def zero_inflated_poisson(X: jnp.ndarray, Y: jnp.ndarray) -> None:  # noqa: N803
    r"""NumPyro's zero-inflated Poisson regression (examples/zero_inflated_poisson.py).

    :math:`b_1, b_2 \sim N(0, I)`, gate :math:`\mathrm{logit}^{-1}(X b_1)`, rate
    :math:`\exp(X b_2)`; ``X`` (N, D), ``Y`` (N,) counts.
    """
    num_features = X.shape[1]
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([num_features]).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([num_features]).to_event(1))
    gate, rate = jax.nn.sigmoid(X @ b1), jnp.exp(X @ b2)
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("Y", dist.ZeroInflatedPoisson(gate=gate, rate=rate), obs=Y)


def gp_regression(X: jnp.ndarray, Y: jnp.ndarray) -> None:  # noqa: N803
    r"""NumPyro's GP hyperparameter model (examples/gp.py): squared-exponential kernel,
    :math:`\mathrm{LogNormal}(0, 10)` priors on variance, noise and length scale, the marginal
    MVN likelihood :math:`Y \sim N(0, K + (\mathrm{noise} + 10^{-6}) I)`; ``X``, ``Y`` (N,)."""
    var = numpyro.sample("kernel_var", dist.LogNormal(0.0, 10.0))
    noise = numpyro.sample("kernel_noise", dist.LogNormal(0.0, 10.0))
    length = numpyro.sample("kernel_length", dist.LogNormal(0.0, 10.0))
    k = var * jnp.exp(-0.5 * ((X[:, None] - X) / length) ** 2)
    k = k + (noise + 1e-6) * jnp.eye(X.shape[0])
    numpyro.sample("Y", dist.MultivariateNormal(jnp.zeros(X.shape[0]), covariance_matrix=k), obs=Y)


def _baseball_data() -> dict[str, np.ndarray]:
    hits = np.asarray(BASEBALL_HITS, np.float32)
    return {"at_bats": np.full_like(hits, 45.0), "hits": hits}


def _horseshoe_data(num_data: int = 100, num_features: int = 32) -> dict[str, np.ndarray]:
    """The example's ``get_data`` (continuous response, sigma_obs 0.05, legacy seed 0)."""
    rng = np.random.RandomState(0)
    x = rng.randn(num_data, num_features)
    y = x[:, :3] @ np.array([2.0, -1.0, 0.5])
    y = y - y.mean() + 0.05 * rng.randn(num_data)
    return {"X": x.astype(np.float32), "Y": y.astype(np.float32)}


def _zip_data(num_data: int = 250) -> dict[str, np.ndarray]:
    """Synthetic stand-in for the example's Stata fish data (not stored offline): columns
    livebait, camper (binary), persons (1-4), child (0-3), intercept; seed 0."""
    rng = np.random.RandomState(0)
    x = np.stack(
        [
            rng.binomial(1, 0.86, num_data),
            rng.binomial(1, 0.59, num_data),
            rng.randint(1, 5, num_data),
            rng.randint(0, 4, num_data),
            np.ones(num_data),
        ],
        axis=1,
    ).astype(np.float64)
    gate = 1 / (1 + np.exp(-(x @ np.array([-0.5, 0.3, -0.6, 1.0, 0.2]))))
    rate = np.exp(x @ np.array([0.8, 0.5, 0.6, -1.0, -1.0]))
    y = np.where(rng.uniform(size=num_data) < gate, 0, rng.poisson(rate))
    return {"X": x.astype(np.float32), "Y": y.astype(np.float32)}


def _gp_data(num_data: int = 25) -> dict[str, np.ndarray]:
    """The example's ``get_data`` (sigma_obs 0.15, legacy seed 0, standardised Y)."""
    x = np.linspace(-1, 1, num_data)
    y = x + 0.2 * x**3 + 0.5 * (0.5 + x) ** 2 * np.sin(4.0 * x)
    y = y + 0.15 * np.random.RandomState(0).randn(num_data)
    y = (y - y.mean()) / y.std()
    return {"X": x.astype(np.float32), "Y": y.astype(np.float32)}


@functools.cache
def _horseshoe_gibbs_draws() -> dict[str, np.ndarray]:
    """The exact Gibbs sampler's draws (``horseshoe_gibbs.py``, seed 0), ``{site: (8, 5000,
    ...)}``: R-hat 1.00 and bulk ESS >= 4000 on every component (log scales included)."""
    from benchmarks.horseshoe_gibbs import horseshoe_gibbs

    return horseshoe_gibbs(**_horseshoe_data())


def _horseshoe_reference_draws() -> dict[str, np.ndarray]:
    """:func:`_horseshoe_gibbs_draws` with chains pooled, ``{site: (40000, ...)}``."""
    return {site: x.reshape(-1, *x.shape[2:]) for site, x in _horseshoe_gibbs_draws().items()}


def _horseshoe_reference() -> Reference:
    """Means, sds and MCSE (ArviZ, from the chains) of the Gibbs draws."""
    import arviz as az

    draws = _horseshoe_gibbs_draws()
    mcse = az.mcse(az.from_dict(posterior=draws))
    return {
        site: {"mean": x.mean((0, 1)), "sd": x.std((0, 1)), "mcse": mcse[site].values}
        for site, x in draws.items()
    }


NUMPYRO_EXAMPLE_MODELS: dict[str, BenchmarkModel] = {
    "baseball_logit": BenchmarkModel(
        baseball_logit, _baseball_data, ("loc", "scale", "alpha"), has_centered_form=True
    ),
    "horseshoe_regression": BenchmarkModel(
        horseshoe_regression,
        _horseshoe_data,
        ("lambdas", "tau", "unscaled_betas", "prec_obs"),
        _horseshoe_reference,
        has_centered_form=True,
        reference_draws=_horseshoe_reference_draws,
    ),
    "zero_inflated_poisson": BenchmarkModel(zero_inflated_poisson, _zip_data, ("b1", "b2")),
    "gp_regression": BenchmarkModel(
        gp_regression, _gp_data, ("kernel_var", "kernel_noise", "kernel_length")
    ),
}
"""NumPyro's example models (reference: a NUTS run in ``emd_posteriors.py``; for the horseshoe,
the exact Gibbs sampler of ``horseshoe_gibbs.py``)."""
