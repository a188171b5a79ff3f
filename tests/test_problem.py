"""``Problem``: one way from a model (NumPyro, Pyro or a Target) to a Target, for every
algorithm; backend recognition and argument errors before anything is traced."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import emdppl
from emdppl.models import EIGHT_SCHOOLS, eight_schools


def _gauss(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_numpyro_problem_gives_the_same_target_as_from_numpyro():
    data = dict(sigma=EIGHT_SCHOOLS["sigma"], y=EIGHT_SCHOOLS["y"])
    problem = emdppl.Problem.of(eight_schools, model_kwargs=data)
    assert problem.backend == "numpyro" and problem.is_auxiliary
    target = problem.target(3, jax.random.key(0))
    direct = emdppl.Target.from_numpyro(
        eight_schools, model_kwargs=data, num_chains=3, rng_key=jax.random.key(0)
    )
    for a, b in zip(
        jax.tree.leaves(target.initial_position),
        jax.tree.leaves(direct.initial_position),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    first = jax.tree.map(lambda x: x[0], target.initial_position)
    assert float(target.logdensity_fn(first)) == float(direct.logdensity_fn(first))


def test_target_problem_is_the_target_itself():
    target = emdppl.Target.from_logdensity(
        lambda x: -0.5 * jnp.sum(x**2), jnp.arange(8.0).reshape(4, 2)
    )
    problem = emdppl.Problem.of(target)
    assert problem.backend == "target" and not problem.is_auxiliary
    assert problem.target(4, 0) is target and problem.target(1, 0) is target


def test_every_algorithm_takes_a_target_or_says_why_not():
    """MCMC and EMD run on a Target (a plain log density); SVI needs model sites."""
    target = emdppl.Target.from_logdensity(
        lambda x: -0.5 * jnp.sum((x - 1.0) ** 2), jnp.zeros(2), num_chains=4
    )
    mcmc = emdppl.infer(target, emdppl.MCMC("mala", num_warmup=100, num_samples=100),
                        progress_bar=False)
    assert mcmc.posterior["x"].shape == (4, 100, 2)  # the Target's own four chains
    emd = emdppl.infer(target, emdppl.EMD(num_steps=5, num_samples=8, num_probe_draws=5),
                       progress_bar=False)
    assert emd.posterior["x"].shape == (4, 2, 2) and emd.posterior.attrs["auxiliary"] == 0
    with pytest.raises(TypeError, match="needs a NumPyro model"):
        emdppl.infer(target, emdppl.SVI(num_steps=5), progress_bar=False)


def test_bad_arguments_are_refused_before_tracing():
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        emdppl.Problem.of(_gauss, model_kwargs=[1.0])
    with pytest.raises(TypeError, match="model_args must be a tuple"):
        emdppl.Problem.of(_gauss, model_args=[1.0])
    with pytest.raises(ValueError, match="backend must be"):
        emdppl.Problem.of(_gauss, backend="stan")
    with pytest.raises(TypeError, match="a callable"):
        emdppl.Problem.of("model")
    with pytest.raises(ValueError, match=r"unknown model_kwargs \['z'\]"):
        emdppl.infer(_gauss, emdppl.EMD(num_steps=5), model_kwargs=dict(z=1.0))
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        emdppl.EMD(num_steps=0)
    with pytest.raises(ValueError, match="multiple of"):
        emdppl.EMD(num_chains=0)
