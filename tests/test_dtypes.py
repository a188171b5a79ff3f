"""float32 and x64 everywhere: MCMC, SVI, EMD, ``distill`` and the Pyro bridge run with
``jax.enable_x64`` on and off and with float32 or float64 data, and give the same answer.

The regression ``y = X beta + noise`` has the exact posterior mean (X'X + I/100)^{-1} X'y / ...;
each run's mean of beta is compared with NUTS in float32 (within 5 posterior sds: a loose
check that catches dtype bugs, which give garbage or crash, not small biases)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

import emdppl
from emdppl import generators, teachers

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 2))
Y = X @ np.array([1.0, -0.5]) + 0.5 * RNG.normal(size=40)
# conjugate posterior of beta with sigma fixed at 0.5 and prior N(0, 10^2): mean and sd
_PRECISION = X.T @ X / 0.25 + np.eye(2) / 100
BETA_MEAN = np.linalg.solve(_PRECISION, X.T @ Y / 0.25)
BETA_SD = np.sqrt(np.diag(np.linalg.inv(_PRECISION)))


def regression(x, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
    numpyro.sample("y", dist.Normal(x @ beta, 0.5), obs=y)


ALGORITHMS = {
    "mcmc": lambda: emdppl.MCMC("nuts", num_warmup=200, num_samples=200, num_chains=2),
    "svi": lambda: emdppl.SVI("auto_normal", num_steps=2000, num_samples=400),
    "emd": lambda: emdppl.EMD(num_steps=60, num_samples=400, num_probe_draws=10),
}


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_infer_under_x64_and_float32(algorithm, dtype, x64):
    data = dict(x=X.astype(dtype), y=Y.astype(dtype))
    with jax.enable_x64(x64):
        idata = emdppl.infer(regression, ALGORITHMS[algorithm](), model_kwargs=data,
                             rng_key=0, progress_bar=False)
        beta = np.asarray(idata.posterior["beta"]).reshape(-1, 2)
    assert np.isfinite(beta).all()
    # z < 5 posterior sds of the exact mean: p ~ 6e-7 per coordinate for a correct sampler;
    # SVI/EMD are approximate but exact for this Gaussian posterior's mean.
    assert np.all(np.abs(beta.mean(0) - BETA_MEAN) < 5 * BETA_SD), (beta.mean(0), BETA_MEAN)


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_distill_under_x64(x64):
    with jax.enable_x64(x64):
        teacher = teachers.GaussianMixture(jnp.array([[1.0]]), jnp.array([0.5]), jnp.array([1.0]))
        result = emdppl.distill(
            teacher, generators.affine(1), num_steps=30, batch_size=32, num_estep_steps=2,
            num_probe_draws=5, optimizer=optax.adam(0.05), progress_bar=False, rng_key=0,
        )
    assert np.isfinite(result.history["loss"]).all() and int(result.state.num_skipped) == 0
    assert float(result.generator.loc[0]) > 0  # moved from 0 towards the teacher's mean 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pyro_bridge_follows_the_models_dtype(dtype):
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pdist

    tdtype = getattr(torch, dtype)

    def model(x, y=None):
        beta = pyro.sample("beta", pdist.Normal(torch.zeros(2, dtype=tdtype), 10.0).to_event(1))
        pyro.sample("y", pdist.Normal(x @ beta, 0.5).to_event(1), obs=y)

    data = dict(x=torch.tensor(X, dtype=tdtype), y=torch.tensor(Y, dtype=tdtype))
    target = emdppl.bridge.target_from_pyro(model, model_kwargs=data, num_chains=2)
    result = emdppl.MCMC("nuts", num_warmup=200, num_samples=200, num_chains=2).sample(
        0, target, progress_bar=False
    )
    beta = np.asarray(target.postprocess(result.positions)["beta"]).reshape(-1, 2)
    assert np.all(np.abs(beta.mean(0) - BETA_MEAN) < 5 * BETA_SD), (beta.mean(0), BETA_MEAN)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("in_event", [True, False], ids=["event_dims", "batch_dims_without_plate"])
def test_pyro_log_likelihood_and_predictive_in_the_models_dtype(dtype, in_event):
    """ArviZ's Pyro groups are computed in the model's dtype (a float32 model used to fail on
    ``x @ beta`` with float64 draws): log_likelihood equals the Gaussian log density of each
    observation at each draw, computed here in float64 (to float32 round-off)."""
    torch = pytest.importorskip("torch")
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pdist

    tdtype = getattr(torch, dtype)

    def model(x, y=None):
        beta = pyro.sample("beta", pdist.Normal(torch.zeros(2, dtype=tdtype), 10.0).to_event(1))
        likelihood = pdist.Normal(x @ beta, 0.5)
        pyro.sample("y", likelihood.to_event(1) if in_event else likelihood, obs=y)

    data = dict(x=torch.tensor(X, dtype=tdtype), y=torch.tensor(Y, dtype=tdtype))
    mcmc = emdppl.MCMC("nuts", num_warmup=100, num_samples=50, num_chains=2)
    idata = emdppl.infer(model, mcmc, model_kwargs=data, rng_key=0, progress_bar=False,
                         posterior_predictive=True)
    beta = np.asarray(idata.posterior["beta"].values, np.float64)  # (chain, draw, 2)
    mean = beta @ np.asarray(X, np.float64).T  # (chain, draw, n)
    pointwise = -0.5 * ((np.asarray(Y) - mean) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))
    expected = pointwise.sum(-1) if in_event else pointwise
    np.testing.assert_allclose(idata.log_likelihood["y"].values, expected, rtol=1e-4, atol=1e-3)
    assert idata.posterior_predictive["y"].shape == (2, 50, len(Y))
