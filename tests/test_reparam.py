"""auxiliary() keeps the prior law of every site (NumPyro's test_reparam pattern) and reports
what it did; check_auxiliary names offending sites."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import Predictive
from scipy import stats

import emdppl

N = 20_000
# Two-sample KS test on 20k vs 20k draws: reject when p < 1e-4 (a correct reparam fails this
# with probability 1e-4 per site; a wrong scale or location fails with certainty).
P_MIN = 1e-4

FAMILIES = {
    "normal": lambda loc, scale: dist.Normal(loc, scale),
    "student_t": lambda loc, scale: dist.StudentT(4.0, loc, scale),
    "cauchy": lambda loc, scale: dist.Cauchy(loc, scale),
    "laplace": lambda loc, scale: dist.Laplace(loc, scale),
    "logistic": lambda loc, scale: dist.Logistic(loc, scale),
    "gumbel": lambda loc, scale: dist.Gumbel(loc, scale),
    "lognormal": lambda loc, scale: dist.LogNormal(loc / 4.0, scale / 2.0),
    "half_cauchy": lambda loc, scale: dist.HalfCauchy(scale),
    "half_normal": lambda loc, scale: dist.HalfNormal(scale),
    "exponential": lambda loc, scale: dist.Exponential(1.0 / scale),
    "gamma": lambda loc, scale: dist.Gamma(2.5, 1.0 / scale),
}


def hierarchical(family):
    def model():
        loc = numpyro.sample("loc", dist.Normal(1.0, 2.0))
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
        with numpyro.plate("i", 3):
            numpyro.sample("x", FAMILIES[family](loc, scale))

    return model


def prior_draws(model, seed):
    return Predictive(model, num_samples=N)(jax.random.key(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auxiliary_keeps_prior_law(family):
    model = hierarchical(family)
    centered = prior_draws(model, 0)
    aux = prior_draws(emdppl.auxiliary(model), 1)
    assert "x_decentered" in aux or "x_base_decentered" in aux
    for site in ("loc", "scale", "x"):
        a = np.asarray(centered[site]).reshape(N, -1)[:, 0]
        b = np.asarray(aux[site]).reshape(N, -1)[:, 0]
        assert stats.ks_2samp(a, b).pvalue > P_MIN, site


def test_multivariate_normal_moments():
    cov = jnp.array([[2.0, 0.8, 0.0], [0.8, 1.0, -0.3], [0.0, -0.3, 0.5]])

    def model():
        loc = numpyro.sample("loc", dist.Normal(jnp.array([1.0, -1.0, 0.0]), 1.0).to_event(1))
        numpyro.sample("x", dist.MultivariateNormal(loc, cov))

    aux = prior_draws(emdppl.auxiliary(model), 2)
    assert aux["x_decentered"].shape == (N, 3)
    x = np.asarray(aux["x"])
    # Var(x) = I + cov. Mean: z-test with sd sqrt(diag)/sqrt(N), |z| < 4 (p ~ 6e-5).
    expected_cov = np.eye(3) + np.asarray(cov)
    z = (x.mean(0) - [1.0, -1.0, 0.0]) / np.sqrt(np.diag(expected_cov) / N)
    assert np.all(np.abs(z) < 4.0)
    # Sample covariance entries: sd of each entry <= sqrt((S_ii S_jj + S_ij^2) / N).
    sd = np.sqrt((np.outer(np.diag(expected_cov), np.diag(expected_cov)) + expected_cov**2) / N)
    assert np.all(np.abs(np.cov(x.T) - expected_cov) < 4.0 * sd)


def test_observed_sites_untouched_and_no_recursion():
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    trace = numpyro.handlers.trace(
        numpyro.handlers.seed(emdppl.auxiliary(model), jax.random.key(0))
    ).get_trace(y=jnp.ones(2))
    sample_sites = [k for k, s in trace.items() if s["type"] == "sample"]
    assert sorted(sample_sites) == ["mu_decentered", "y"]
    assert trace["y"]["is_observed"]


def test_check_auxiliary_reports_and_strict_names_sites():
    def model():
        numpyro.sample("a", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Beta(2.0, 2.0))
        numpyro.sample("k", dist.Poisson(3.0))

    report = emdppl.check_auxiliary(model)
    assert report["a"]["status"] == "auxiliary"
    assert report["b"]["status"] == "centered" and "Beta" in report["b"]["detail"]
    assert report["k"]["status"] == "discrete"
    with pytest.raises(ValueError, match=r"(?s)2 latent site.*- b \(Beta.*- k \(Poisson"):
        emdppl.check_auxiliary(model, strict=True)
