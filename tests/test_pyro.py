"""Pyro models through the bridge: recognised without importing pyro, put in the same auxiliary
form as NumPyro models (same report), the same log density and gradient as the NumPyro twin
(centered and auxiliary), posteriors against posteriordb, samplers of the registry, clear
errors."""

import functools
import json
import re
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference_z

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402

import emdppl  # noqa: E402
from emdppl import bridge  # noqa: E402
from emdppl.models import EIGHT_SCHOOLS, eight_schools  # noqa: E402

DATA = dict(sigma=EIGHT_SCHOOLS["sigma"], y=EIGHT_SCHOOLS["y"])


def pyro_eight_schools(sigma, y=None):
    """The Pyro twin of emdppl.models.eight_schools."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("J", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _calls_pyro_indirectly(sigma, y=None):
    return pyro_eight_schools(sigma, y)


@pytest.fixture(scope="module")
def auxiliary_target():
    return bridge.target_from_pyro(pyro_eight_schools, model_kwargs=DATA, num_chains=4)


def test_is_pyro_model():
    assert bridge.is_pyro_model(pyro_eight_schools)
    assert bridge.is_pyro_model(_calls_pyro_indirectly)
    assert bridge.is_pyro_model(functools.partial(pyro_eight_schools, DATA["sigma"]))
    assert bridge.is_pyro_model(pyro.poutine.scale(pyro_eight_schools, 2.0))
    assert not bridge.is_pyro_model(eight_schools)
    assert not bridge.is_pyro_model(lambda x: x + 1)
    assert not bridge.is_pyro_model("pyro")


def test_report_matches_numpyro():
    assert bridge.check_auxiliary_pyro(pyro_eight_schools, model_kwargs=DATA) == (
        emdppl.check_auxiliary(eight_schools, model_kwargs=DATA)
    )

    def mixed():
        pyro.sample("a", dist.LogNormal(0.0, 1.0))
        pyro.sample("b", dist.Beta(2.0, 2.0))
        pyro.sample("c", dist.Bernoulli(0.3))
        pyro.sample("d", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))

    report = bridge.check_auxiliary_pyro(mixed)
    assert {k: v["status"] for k, v in report.items()} == {
        "a": "auxiliary",
        "b": "centered",
        "c": "discrete",
        "d": "auxiliary",
    }
    with pytest.raises(ValueError, match=r"(?s)2 latent site\(s\).*b \(Beta, centered\)"):
        bridge.check_auxiliary_pyro(mixed, strict=True)


@pytest.mark.parametrize("evaluate", ["jax", "torch"], ids=["compiled", "host"])
@pytest.mark.parametrize("auxiliary", [True, False])
def test_logdensity_and_gradient_match_numpyro(auxiliary, evaluate):
    """Compiled to JAX or evaluated by torch on the host, the Pyro model's log density,
    gradient and postprocessing are the NumPyro twin's."""
    pyro_target = bridge.target_from_pyro(
        pyro_eight_schools, model_kwargs=DATA, num_chains=2, auxiliary=auxiliary,
        evaluate=evaluate,
    )
    kind = {"jax": bridge.LoweredLogDensity, "torch": bridge.TorchLogDensity}[evaluate]
    assert isinstance(pyro_target.logdensity_fn, kind)
    numpyro_target = emdppl.Target.from_numpyro(
        eight_schools, model_kwargs=DATA, num_chains=2, auxiliary=auxiliary
    )
    shapes = jax.tree.map(jnp.shape, numpyro_target.initial_position)
    assert jax.tree.map(jnp.shape, pyro_target.initial_position) == shapes
    keys = jax.random.split(jax.random.key(0), len(shapes))
    points = {
        k: 1.5 * jax.random.normal(key, (32, *s[1:]))
        for key, (k, s) in zip(keys, sorted(shapes.items()), strict=True)
    }
    value_and_grad = lambda t: jax.jit(jax.vmap(jax.value_and_grad(t.logdensity_fn)))(points)
    pyro_values, pyro_grads = value_and_grad(pyro_target)
    values, grads = value_and_grad(numpyro_target)
    np.testing.assert_allclose(pyro_values, values, rtol=2e-6, atol=1e-4)
    for name in grads:
        np.testing.assert_allclose(pyro_grads[name], grads[name], rtol=1e-5, atol=1e-4)
    post = jax.vmap(pyro_target.postprocess_fn)(points)
    expected = jax.vmap(numpyro_target.postprocess_fn)(points)
    assert sorted(post) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(post[name], expected[name], rtol=1e-5, atol=1e-5)


def pyro_branching(y=None):
    """Python control flow on a latent value: torch.func.vmap cannot run it."""
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.deterministic("x_scaled", x * (1.0 if float(x) > 0 else 2.0))
    pyro.sample("y", dist.Normal(x, 1.0), obs=y)


def test_postprocess_is_one_vmapped_model_run_or_a_loop_that_agrees(auxiliary_target):
    """Eight schools: all draws in one vmapped run, equal to one run per draw. A model whose
    Python code branches on a latent value falls back to the loop, and is still right."""
    host = auxiliary_target.postprocess_fn.host
    assert host.batching == "vmap"
    points = np.random.default_rng(0).normal(size=(3, 50, 10)).astype(np.float32)
    vmapped = host(points)
    host.batching = "loop"
    try:
        looped = host(points)
    finally:
        host.batching = "vmap"
    for name, value in looped.items():
        assert vmapped[name].shape == value.shape
        np.testing.assert_allclose(vmapped[name], value, rtol=1e-6, atol=1e-6)

    target = bridge.target_from_pyro(pyro_branching, model_kwargs=dict(y=torch.tensor(0.5)))
    assert target.postprocess_fn.host.batching == "loop"
    # the log density too stays on the host: a compiled graph would hold one branch only
    assert isinstance(target.logdensity_fn, bridge.TorchLogDensity)
    with pytest.raises(bridge.LoweringError, match="control flow on latent values"):
        bridge.target_from_pyro(
            pyro_branching, model_kwargs=dict(y=torch.tensor(0.5)), evaluate="jax"
        )
    x = np.array([[-1.0], [0.5]], np.float32)
    out = target.postprocess_fn.host(x)
    np.testing.assert_allclose(out["x_scaled"], [-2.0, 0.5])


def test_nuts_posterior_matches_reference(auxiliary_target, eight_schools_reference):
    # One chain: every leapfrog step is a Pyro model run on the host (~18k runs, about a minute
    # on 2 cores), and vmapped NUTS chains move in lock-step with the longest trajectory.
    target = auxiliary_target.with_initial_position(
        jax.tree.map(lambda x: x[:1], auxiliary_target.initial_position)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no divergence allowed
        idata = emdppl.infer(
            target,
            emdppl.MCMC("nuts", target_accept=0.95, num_warmup=500, num_samples=1000),
            rng_key=1,
            progress_bar=False,
        )
    post = idata.posterior
    assert post["theta"].shape == (1, 1000, 8) and float(post["tau"].min()) > 0
    np.testing.assert_allclose(
        post["theta"], post["mu"] + post["tau"] * post["theta_decentered"], rtol=1e-4, atol=1e-4
    )
    zs = reference_z(idata, eight_schools_reference, az)
    assert max(abs(z) for z in zs.values()) < 4.0, zs


@pytest.mark.parametrize(
    "sampler,options",
    [
        ("mala", dict(step_size=0.3)),
        ("ula", dict(step_size=0.05)),
        ("hmc", dict(num_integration_steps=5)),
    ],
)
def test_gradient_samplers_run(auxiliary_target, sampler, options):
    mcmc = emdppl.MCMC(sampler, num_warmup=0, num_samples=30, **options)
    result = mcmc.sample(0, auxiliary_target, progress_bar=False)
    draws = auxiliary_target.postprocess(result.positions)
    assert draws["theta"].shape == (4, 30, 8)
    assert all(bool(np.all(np.isfinite(v))) for v in draws.values())
    moved = np.abs(
        result.positions["theta_decentered"][:, -1] - result.positions["theta_decentered"][:, 0]
    )
    assert float(moved.max()) > 0


def test_discrete_latent_is_a_clear_error():
    def model(y):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    with pytest.raises(ValueError, match=r"discrete latent site\(s\) \['z'\].*Marginalise"):
        bridge.target_from_pyro(model, model_args=(torch.tensor(0.3),))


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"model_args\[0\] on cpu, model_kwargs\['y'\] on meta"):
        bridge.target_from_pyro(
            pyro_eight_schools,
            model_args=(torch.as_tensor(DATA["sigma"]),),
            model_kwargs={"y": torch.zeros(8, device="meta")},
        )
    with pytest.raises(ValueError, match="unknown model_kwargs"):
        bridge.target_from_pyro(pyro_eight_schools, model_kwargs=dict(DATA, J=8))
    with pytest.raises(ValueError, match="no latent sample sites"):
        bridge.target_from_pyro(lambda: pyro.sample("x", dist.Normal(0, 1), obs=torch.ones(())))
    with pytest.raises(ValueError, match="evaluate must be one of"):
        bridge.target_from_pyro(pyro_eight_schools, model_kwargs=DATA, evaluate="xla")


def test_infer_recognises_a_pyro_model():
    mcmc = emdppl.MCMC("ula", num_warmup=20, num_samples=20, num_chains=2, step_size=0.05)
    idata = emdppl.infer(pyro_eight_schools, mcmc, model_kwargs=DATA, progress_bar=False)
    numpyro_twin = emdppl.infer(eight_schools, mcmc, model_kwargs=DATA, progress_bar=False)
    assert set(idata.posterior.data_vars) == set(numpyro_twin.posterior.data_vars)
    assert idata.posterior["theta"].shape == (2, 20, 8)
    explicit = emdppl.infer(
        _calls_pyro_indirectly, mcmc, model_kwargs=DATA, backend="pyro", progress_bar=False
    )
    assert explicit.posterior["tau"].shape == (2, 20)
    with pytest.raises(ValueError, match="backend must be"):
        emdppl.infer(pyro_eight_schools, mcmc, model_kwargs=DATA, backend="stan")


def test_emd_on_a_pyro_model_matches_its_numpyro_twin():
    """EMD takes a Pyro model through the same Problem -> Target path: with the same seed its
    distilled draws equal the NumPyro twin's up to float error (same log density, same layout).
    The raw draws are compared: 15 steps fail the fit check, so both runs also go through the
    MAF fallback, and resampling by near-equal importance weights would turn float error into
    different picks."""
    emd = emdppl.EMD(num_steps=15, batch_size=16, num_samples=400, num_probe_draws=10,
                     importance_resampling=False)
    runs = {
        name: emdppl.infer(model, emd, model_kwargs=DATA, rng_key=2, progress_bar=False)
        for name, model in (("pyro", pyro_eight_schools), ("numpyro", eight_schools))
    }
    pyro_post, numpyro_post = runs["pyro"].posterior, runs["numpyro"].posterior
    assert set(pyro_post.data_vars) == set(numpyro_post.data_vars)
    assert "estep_posterior" in runs["pyro"].groups()
    assert pyro_post.attrs["generator"] == numpyro_post.attrs["generator"]
    for name in ("mu", "tau", "theta"):
        assert pyro_post[name].shape == numpyro_post[name].shape
        scale = float(numpyro_post[name].std())
        # float32 round-off of two implementations, amplified by training: 1e-3 sd, plus a
        # relative 2e-4 for far-tail draws (|theta| ~ 10 sd, where 1e-4 relative was seen)
        np.testing.assert_allclose(
            pyro_post[name], numpyro_post[name], atol=1e-3 * scale, rtol=2e-4
        )


def test_svi_on_a_pyro_model_runs_pyros_svi(eight_schools_reference):
    svi = emdppl.SVI("auto_normal", num_steps=1500, num_samples=2000)
    idata = emdppl.infer(pyro_eight_schools, svi, model_kwargs=DATA, rng_key=0, progress_bar=False)
    assert idata.posterior.attrs["backend"] == "pyro"
    assert idata.posterior["theta"].shape == (4, 500, 8)  # independent draws, four chains
    assert list(idata.posterior.data_vars) == ["mu", "tau", "theta"]
    assert "theta_decentered" in idata.unconstrained_posterior
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "J")
    loss = np.asarray(idata.svi_trace["loss"])[0]
    assert loss.shape == (1500,) and np.all(np.isfinite(loss))
    assert loss[-100:].mean() < loss[:100].mean()  # the ELBO improved
    # A mean-field guide in auxiliary form recovers the posterior mean of mu well: within 0.25
    # posterior sd of the reference (its sd is not expected to match: mean-field underfits).
    ref = eight_schools_reference["params"]["mu"]
    assert abs(float(idata.posterior["mu"].mean()) - ref["mean"]) < 0.25 * ref["sd"]
    # healthy in auxiliary form: the guide-scale check is run and silent (min ratio 0.34 for
    # the NumPyro twin)
    assert not any("collapsed" in m for m in json.loads(idata.posterior.attrs["warnings"]))
    with pytest.raises(ValueError, match="guide name"):
        emdppl.infer(pyro_eight_schools, emdppl.SVI(lambda *a, **k: None), model_kwargs=DATA)


def pyro_horseshoe(X, Y):  # noqa: N803 (NumPyro's names)
    """The Pyro twin of benchmarks.models.horseshoe_regression."""
    num_features = X.shape[1]
    lambdas = pyro.sample("lambdas", dist.HalfCauchy(torch.ones(num_features)).to_event(1))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.ones(1)).to_event(1))
    unscaled = pyro.sample("unscaled_betas", dist.Normal(0.0, torch.ones(num_features)).to_event(1))
    betas = pyro.deterministic("betas", tau * lambdas * unscaled)
    prec_obs = pyro.sample("prec_obs", dist.Gamma(3.0, 1.0))
    pyro.sample("Y", dist.Normal(X @ betas, 1.0 / prec_obs.sqrt()).to_event(1), obs=Y)


def test_svi_devices_on_a_pyro_model_are_refused_before_it_runs():
    svi = emdppl.SVI("auto_normal", num_steps=10, devices=1)
    with pytest.raises(ValueError, match="Pyro's own SVI"):
        emdppl.infer(pyro_eight_schools, svi, model_kwargs=DATA, progress_bar=False)


def test_svi_guide_collapse_on_a_pyro_model_warns():
    """The guide-scale check of emdppl.SVI on Pyro's own AutoNormal: the mean field squeezed on
    the horseshoe's ridge (tau * lambda_j * beta_j fixed by the data for the active features)
    is flagged for tau and the first active lambda, as for the NumPyro twin (8 features and 1500
    steps here to keep it short; 3 of 18 coordinates flagged)."""
    from test_svi_diagnostics import horseshoe_data

    data = {k: torch.as_tensor(v) for k, v in horseshoe_data(0, num_features=8).items()}
    with pytest.warns(RuntimeWarning, match=r"(?s)on a Pyro model.*sd collapsed") as rec:
        idata = emdppl.infer(
            pyro_horseshoe,
            emdppl.SVI("auto_normal", num_steps=1500, num_samples=1000),
            model_kwargs=data,
            rng_key=0,
            progress_bar=False,
        )
    (message,) = [str(w.message) for w in rec if "collapsed" in str(w.message)]
    assert re.search(r"collapsed for \d+ of 18 latent coordinates", message), message
    assert "tau_decentered[0]" in message and "lambdas_decentered[0]" in message
    assert any("sd collapsed" in m for m in json.loads(idata.posterior.attrs["warnings"]))


@pytest.mark.parametrize(
    "name,home",
    [
        ("is_pyro_model", "emdppl.bridge.pyro_model"),
        ("check_auxiliary_pyro", "emdppl.bridge.pyro_model"),
        ("target_from_pyro", "emdppl.bridge.pyro_target"),
        ("pyro_svi_infer", "emdppl.bridge.pyro_svi"),
    ],
)
def test_deprecated_pyro_module_forwards_to_the_bridge(name, home):
    import importlib

    import emdppl.pyro

    with pytest.warns(DeprecationWarning, match=r"emdppl\.pyro is deprecated; use emdppl\.bridge"):
        moved = getattr(emdppl.pyro, name)
    assert moved is getattr(importlib.import_module(home), name)
    assert moved is getattr(bridge, name)
    with pytest.raises(AttributeError, match="no attribute '_auxiliary'"):
        emdppl.pyro._auxiliary  # noqa: B018


def test_a_pareto_prior_takes_the_auxiliary_form_of_its_numpyro_twin():
    """NumPyro's baseball example has a Pareto prior, a transformed distribution whose base
    (torch's Exponential) is not a Pyro distribution: Pyro's TransformReparam used to fail on it
    ('Exponential' object has no attribute 'event_dim')."""
    numpyro = pytest.importorskip("numpyro")
    ndist = numpyro.distributions

    def pyro_baseball(at_bats, hits):
        phi = pyro.sample("phi", dist.Uniform(0.0, 1.0))
        kappa = pyro.sample("kappa", dist.Pareto(1.0, 1.5))
        with pyro.plate("n", len(at_bats)):
            theta = pyro.sample("theta", dist.Beta(phi * kappa, (1 - phi) * kappa))
            pyro.sample("obs", dist.Binomial(at_bats, theta), obs=hits)

    def baseball(at_bats, hits):
        phi = numpyro.sample("phi", ndist.Uniform(0.0, 1.0))
        kappa = numpyro.sample("kappa", ndist.Pareto(1.0, 1.5))
        with numpyro.plate("n", len(at_bats)):
            theta = numpyro.sample("theta", ndist.Beta(phi * kappa, (1 - phi) * kappa))
            numpyro.sample("obs", ndist.Binomial(at_bats, theta), obs=hits)

    data = dict(at_bats=np.full(18, 45.0, np.float32), hits=np.arange(18, 0, -1, dtype=np.float32))
    pyro_target = bridge.target_from_pyro(pyro_baseball, model_kwargs=data, num_chains=8)
    numpyro_target = emdppl.Target.from_numpyro(baseball, model_kwargs=data, num_chains=8)
    shapes = jax.tree.map(jnp.shape, numpyro_target.initial_position)
    assert jax.tree.map(jnp.shape, pyro_target.initial_position) == shapes
    assert "kappa_base_decentered" in shapes
    points = numpyro_target.initial_position
    np.testing.assert_allclose(
        jax.vmap(pyro_target.logdensity_fn)(points),
        jax.vmap(numpyro_target.logdensity_fn)(points),
        rtol=1e-5,
    )
