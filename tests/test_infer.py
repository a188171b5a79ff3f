"""emdppl.infer on eight schools, both forms, against the posteriordb reference; the
InferenceData layout; no retracing; clear errors for bad input."""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from conftest import reference_z

import emdppl
from emdppl.models import eight_schools
from emdppl.timing import stopwatch

MCMC_SETTINGS = dict(num_warmup=500, num_samples=1000, num_chains=4)
# posteriordb made its reference with adapt_delta 0.95; at 0.8 the non-centered form still has
# about one divergence in 4000 transitions (tau's Cauchy tail), at 0.95 none.
TARGET_ACCEPT = 0.95


@pytest.fixture(scope="module")
def auxiliary_nuts(eight_schools_reference):
    data = eight_schools_reference["data"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no divergence warning allowed
        return emdppl.infer(
            eight_schools,
            emdppl.MCMC("nuts", target_accept=TARGET_ACCEPT, **MCMC_SETTINGS),
            model_kwargs=dict(sigma=data["sigma"], y=data["y"]),
            rng_key=0,
            progress_bar=False,
        )


def test_auxiliary_nuts_matches_reference(auxiliary_nuts, eight_schools_reference):
    idata = auxiliary_nuts
    assert int(idata.sample_stats["diverging"].sum()) == 0
    summary = az.summary(idata, var_names=["mu", "tau", "theta"])
    assert summary["r_hat"].max() < 1.01
    # |z| < 4 over 10 parameters: family-wise false-alarm rate ~ 6e-4.
    zs = reference_z(idata, eight_schools_reference, az)
    assert max(abs(z) for z in zs.values()) < 4.0, zs


def test_inference_data_layout(auxiliary_nuts):
    idata = auxiliary_nuts
    post, aux = idata.posterior, idata.unconstrained_posterior
    assert post["theta"].dims == ("chain", "draw", "J")  # named after the plate
    assert post["theta"].shape == (4, 1000, 8)
    # the posterior holds what the user wrote; the auxiliary noise has its own group
    assert list(post.data_vars) == ["mu", "tau", "theta"]
    assert set(aux.data_vars) == {"mu_decentered", "tau_decentered", "theta_decentered"}
    assert idata.log_likelihood["y"].shape == (4, 1000, 8)
    stats = idata.sample_stats
    for name in ("lp", "acceptance_rate", "diverging", "step_size", "n_steps", "energy"):
        assert stats[name].shape == (4, 1000), name
    # NUTS: gradient evaluations per draw = leapfrog steps of the trajectory.
    np.testing.assert_array_equal(stats["n_grad_evals"], stats["n_steps"])
    assert int(stats["n_grad_evals"].min()) >= 1
    attrs = post.attrs
    assert attrs["sampler"] == "nuts" and attrs["auxiliary"] == 1
    assert 0 < attrs["compile_seconds"] <= attrs["wall_seconds"]
    assert "step_size" in attrs["sampler_parameters"] and attrs["numpyro_version"]
    assert attrs["algorithm"] == "mcmc" and attrs["inference_library"] == "emdppl"
    assert attrs["created_at"] and attrs["inference_library_version"] == emdppl.__version__
    # positive tau, and theta = mu + tau * theta_decentered exactly (a deterministic site)
    assert float(post["tau"].min()) > 0
    np.testing.assert_allclose(
        post["theta"], post["mu"] + post["tau"] * aux["theta_decentered"], rtol=1e-4, atol=1e-4
    )


def test_centered_form_shows_the_funnel(eight_schools_reference):
    data = eight_schools_reference["data"]
    with pytest.warns(RuntimeWarning, match=r"transitions diverged.*auxiliary=True"):
        idata = emdppl.infer(
            eight_schools,
            emdppl.MCMC("nuts", target_accept=TARGET_ACCEPT, **MCMC_SETTINGS),
            model_kwargs=dict(sigma=data["sigma"], y=data["y"]),
            rng_key=0,
            auxiliary=False,
            progress_bar=False,
        )
    assert int(idata.sample_stats["diverging"].sum()) > 0
    assert "theta_decentered" not in idata.posterior
    assert not hasattr(idata, "unconstrained_posterior")  # the centered form has no other sites


@pytest.mark.parametrize(
    "algorithm",
    [
        emdppl.MCMC("mala", num_warmup=100, num_samples=100, num_chains=2),
        # the optimiser (a static part of the jitted step) is one object per setting: a fresh
        # optax.adam per run compiled every EMD run anew
        emdppl.EMD(num_samples=100, num_steps=30, batch_size=16, num_probe_draws=0),
    ],
    ids=["mcmc", "emd"],
)
def test_second_infer_does_not_retrace(eight_schools_reference, algorithm):
    traces = []

    def counted(sigma, y=None):
        traces.append(1)  # runs only while JAX traces the model
        eight_schools(sigma, y)

    data = eight_schools_reference["data"]
    with stopwatch() as cold:
        first = emdppl.infer(
            counted,
            algorithm,
            model_kwargs=dict(sigma=data["sigma"], y=data["y"]),
            rng_key=0,
            progress_bar=False,
        )
    n = len(traces)
    assert n > 0
    with stopwatch() as warm:
        second = emdppl.infer(
            counted,
            algorithm,
            model_kwargs=dict(sigma=data["sigma"], y=data["y"] + 1),
            rng_key=1,
            progress_bar=False,
        )
    assert len(traces) == n
    assert warm.compile_seconds < 0.1 * cold.compile_seconds, (warm, cold)
    assert not np.allclose(first.posterior["mu"], second.posterior["mu"])


def test_sampler_name_shorthand_and_jax_key():
    def model():
        numpyro.sample("x", dist.Normal(0.0, 1.0).expand([2]))

    idata = emdppl.infer(model, "mala", rng_key=jax.random.key(3), progress_bar=False)
    assert idata.posterior.attrs["sampler"] == "mala"
    assert idata.posterior["x"].shape == (4, 1000, 2)


# ----------------------------------------------------------------------------- bad input


def test_discrete_latent_is_named():
    def model():
        numpyro.sample("count", dist.Poisson(3.0))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"discrete latent site\(s\) \['count'\].*[Mm]arginalise"):
        emdppl.infer(model, "nuts", progress_bar=False)


@pytest.mark.filterwarnings("ignore:Out-of-support")
def test_nan_log_density_at_init_names_the_site():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"NaN/inf.*\['y'\]"):
        emdppl.infer(
            model, "nuts", model_kwargs=dict(y=np.array([1.0, np.nan])), progress_bar=False
        )


def test_wrong_model_kwargs():
    with pytest.raises(ValueError, match=r"unknown model_kwargs \['sgima'\].*\['sigma', 'y'\]"):
        emdppl.infer(eight_schools, "nuts", model_kwargs=dict(sgima=np.ones(8)), progress_bar=False)
    with pytest.raises(ValueError, match=r"missing a required argument: 'sigma'"):
        emdppl.infer(eight_schools, "nuts", model_kwargs=dict(y=np.ones(8)), progress_bar=False)


def test_unknown_sampler_and_bad_counts():
    with pytest.raises(ValueError, match=r"unknown sampler 'nutz'.*'nuts'"):
        emdppl.infer(eight_schools, "nutz")
    with pytest.raises(ValueError, match="num_chains must be an integer >= 1"):
        emdppl.MCMC("nuts", num_chains=0)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['target_acept'\]"):
        emdppl.MCMC("nuts", target_acept=0.9)
    with pytest.raises(TypeError, match="algorithm must be"):
        emdppl.infer(eight_schools, 3)


def test_site_left_centered_warns_with_its_family():
    def model():
        numpyro.sample("p", dist.Beta(2.0, 3.0))
        numpyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match=r"left centered.*'p': 'Beta'"):
        idata = emdppl.infer(
            model, emdppl.MCMC("mala", num_warmup=200, num_samples=200), progress_bar=False
        )
    assert "x_decentered" in idata.unconstrained_posterior and "p" in idata.posterior


def test_unstable_kernel_warns_about_non_finite_draws():
    """ULA with a step far past its stability limit (h > 2 s^2) on N(0, 0.1^2) overflows."""
    target = emdppl.Target.from_logdensity(
        lambda x: -0.5 * jnp.sum((x / 0.1) ** 2), jnp.ones(2), num_chains=3
    )
    algorithm = emdppl.MCMC("ula", num_warmup=0, num_samples=200, num_chains=3, step_size=1.0)
    with pytest.warns(RuntimeWarning, match=r"3 of 3 ula chains produced non-finite draws"):
        result = algorithm.sample(0, target, progress_bar=False)
    assert not np.isfinite(result.positions[:, -1]).all()  # the draws are kept, not dropped
