"""emdppl.SVI: conjugate models with analytic answers, eight schools against the reference and
NUTS's InferenceData layout, NaN handling, checkpoints, bad input, the VAE example."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from scipy import optimize, special

import emdppl
from emdppl.models import eight_schools
from emdppl.svi import NonFiniteLossError

NUM_DRAWS = 4000
# Adam on the default schedule with 16 particles per ELBO estimate: after 2000-3000 steps the
# guide parameters are within ~0.01 posterior sd of the optimum (measured; with 1 particle the
# gradient noise slows Adam down to ~0.2 sd after 2000 steps). OPT_TOL (in sds) bounds that.
OPT_TOL = 0.03
PARTICLES = 16


def z_bound(num_draws: int) -> float:
    """4 standard errors of a mean of ``num_draws`` iid draws, in sds (two-sided p ~ 6e-5)."""
    return 4.0 / np.sqrt(num_draws)


# ----------------------------------------------------------------------------- conjugate


def normal_normal(y):
    mu = numpyro.sample("mu", dist.Normal(1.0, 2.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.5), obs=y)


@pytest.mark.parametrize("auxiliary", [False, True])
def test_normal_normal_is_exact(auxiliary):
    y = np.random.default_rng(0).normal(3.0, 1.5, size=20)
    precision = 1 / 2.0**2 + len(y) / 1.5**2
    mean, sd = (1.0 / 2.0**2 + y.sum() / 1.5**2) / precision, precision**-0.5
    svi = emdppl.SVI("auto_normal", num_steps=2000, num_particles=PARTICLES)
    result = svi.fit(0, normal_normal, model_args=(y,), auxiliary=auxiliary, progress_bar=False)
    draws = np.asarray(result.sample_posterior(1, NUM_DRAWS)["mu"])
    # the mean of the draws: draw noise (z_bound) plus optimisation error (OPT_TOL)
    assert abs(draws.mean() - mean) / sd < z_bound(NUM_DRAWS) + OPT_TOL
    # the sd of the draws: sd(s)/s ~ 1/sqrt(2 S) for Gaussian draws
    assert abs(draws.std() / sd - 1) < 4 / np.sqrt(2 * NUM_DRAWS) + OPT_TOL
    assert np.all(np.isfinite(result.losses)) and result.losses.shape == (2000,)
    if auxiliary:
        assert set(result.params) == {"mu_decentered_auto_loc", "mu_decentered_auto_scale"}


def beta_bernoulli(y):
    p = numpyro.sample("p", dist.Beta(2.0, 3.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(p), obs=y)


def test_beta_bernoulli():
    """auto_normal lives on logit(p): it cannot be the Beta posterior, but its optimum is the
    logit-normal closest in KL(q||p), which Gauss-Hermite quadrature gives to 1e-6; auto_delta's
    optimum is the posterior mode (AutoDelta maximises log p(x, p) on the constrained scale)."""
    y = np.r_[np.ones(30), np.zeros(70)].astype(np.float32)
    a, b = 2.0 + y.sum(), 3.0 + len(y) - y.sum()
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def neg_elbo(theta):  # u = logit p ~ N(m, s^2); log density of u: a log σ(u) + b log σ(-u)
        m, log_s = theta
        u = m + np.exp(log_s) * nodes
        return -(weights @ (a * special.log_expit(u) + b * special.log_expit(-u)) + log_s)

    m, log_s = optimize.minimize(
        neg_elbo, [0.0, -1.0], method="Nelder-Mead", options={"xatol": 1e-8, "fatol": 1e-10}
    ).x
    s = np.exp(log_s)
    fit = dict(model_args=(y,), auxiliary=False, progress_bar=False)
    normal = emdppl.SVI("auto_normal", num_steps=2000, num_particles=PARTICLES).fit(
        0, beta_bernoulli, **fit
    )
    assert abs(normal.params["p_auto_loc"] - m) / s < OPT_TOL
    assert abs(normal.params["p_auto_scale"] / s - 1) < OPT_TOL
    delta = emdppl.SVI("auto_delta", num_steps=2000, num_particles=PARTICLES).fit(
        0, beta_bernoulli, **fit
    )
    mode, sd = (a - 1) / (a + b - 2), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    assert abs(delta.params["p_auto_loc"] - mode) / sd < OPT_TOL


def factor_model(x, w):
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([w.shape[1]]).to_event(1))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("x", dist.Normal(w @ z, 0.5).to_event(1), obs=x)


def test_linear_gaussian_factor_model():
    """Exact posterior N(m, Λ^-1), Λ = I + n W'W / σ²: auto_multivariate_normal recovers m and
    Λ^-1; auto_normal (mean field) recovers m and the variances 1 / Λ_ii (the KL(q||p) optimum)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    x = (w @ rng.normal(size=3) + 0.5 * rng.normal(size=(10, 5))).astype(np.float32)
    precision = np.eye(3) + len(x) * w.T @ w / 0.25
    cov = np.linalg.inv(precision)
    mean = cov @ w.T @ x.sum(0) / 0.25
    sd = np.sqrt(np.diag(cov))
    fit = dict(model_args=(x, w), auxiliary=False, progress_bar=False)
    mvn = emdppl.SVI("auto_multivariate_normal", num_steps=3000, num_particles=PARTICLES).fit(
        0, factor_model, **fit
    )
    np.testing.assert_array_less(np.abs(mvn.params["auto_loc"] - mean) / sd, OPT_TOL)
    tril = mvn.params["auto_scale_tril"]
    fitted_cov = tril @ tril.T
    np.testing.assert_allclose(fitted_cov / np.outer(sd, sd), cov / np.outer(sd, sd), atol=0.05)
    mf = emdppl.SVI("auto_normal", num_steps=3000, num_particles=PARTICLES).fit(
        0, factor_model, **fit
    )
    np.testing.assert_array_less(np.abs(mf.params["z_auto_loc"] - mean) / sd, OPT_TOL)
    np.testing.assert_allclose(mf.params["z_auto_scale"], np.diag(precision) ** -0.5, rtol=0.03)


# ----------------------------------------------------------------------------- eight schools


@pytest.fixture(scope="module")
def svi_eight_schools(eight_schools_reference):
    data = eight_schools_reference["data"]
    return emdppl.infer(
        eight_schools,
        emdppl.SVI("auto_multivariate_normal", num_steps=3000, num_samples=NUM_DRAWS),
        model_kwargs=dict(sigma=data["sigma"], y=data["y"]),
        rng_key=0,
        progress_bar=False,
    )


def test_eight_schools_matches_reference(svi_eight_schools, eight_schools_reference):
    """The means of a Gaussian on auxiliary space are within 0.2 posterior sd of posteriordb's
    (a bias bound of variational inference, not a Monte-Carlo test: 4000 draws add 0.06 sd)."""
    post, ref = svi_eight_schools.posterior, eight_schools_reference["params"]
    errors = {k: (float(post[k].mean()) - ref[k]["mean"]) / ref[k]["sd"] for k in ("mu", "tau")}
    for j in range(8):
        r = ref[f"theta[{j + 1}]"]
        errors[f"theta[{j}]"] = (float(post["theta"][..., j].mean()) - r["mean"]) / r["sd"]
    assert max(abs(e) for e in errors.values()) < 0.2, errors


def test_inference_data_matches_nuts_layout(svi_eight_schools, eight_schools_reference):
    data = eight_schools_reference["data"]
    nuts = emdppl.infer(
        eight_schools,
        emdppl.MCMC("nuts", num_warmup=100, num_samples=100, num_chains=2),
        model_kwargs=dict(sigma=data["sigma"], y=data["y"]),
        progress_bar=False,
    )
    svi_post, nuts_post = svi_eight_schools.posterior, nuts.posterior
    assert sorted(svi_post.data_vars) == sorted(nuts_post.data_vars)
    for name in nuts_post.data_vars:
        assert svi_post[name].dims == nuts_post[name].dims, name
        assert svi_post[name].shape[2:] == nuts_post[name].shape[2:], name
    # the independent guide draws split into 4 chains, so that R-hat and friends apply
    assert svi_post.sizes["chain"] == 4 and svi_post.sizes["draw"] == NUM_DRAWS // 4
    assert svi_eight_schools.log_likelihood["y"].dims == ("chain", "draw", "J")
    shared = ("algorithm", "auxiliary", "wall_seconds", "compile_seconds", "numpyro_version",
              "created_at", "inference_library")
    for key in shared:
        assert key in svi_post.attrs and key in nuts_post.attrs, key
    attrs = svi_post.attrs
    assert attrs["algorithm"] == "svi" and attrs["guide"] == "auto_multivariate_normal"
    assert 0 < attrs["compile_seconds"] and attrs["wall_seconds"] > attrs["fit_seconds"]
    loss = svi_eight_schools.svi_trace["loss"]
    assert loss.dims == ("chain", "draw") and loss.shape == (1, 3000)
    assert np.isclose(attrs["final_loss"], float(loss[0, -30:].mean()))
    assert np.shape(json.loads(attrs["params"])["auto_loc"]) == (10,)
    aux = svi_eight_schools.unconstrained_posterior
    assert sorted(aux.data_vars) == sorted(nuts.unconstrained_posterior.data_vars)
    np.testing.assert_allclose(
        svi_post["theta"],
        svi_post["mu"] + svi_post["tau"] * aux["theta_decentered"],
        rtol=1e-4,
        atol=1e-4,
    )


# ----------------------------------------------------------------------------- robustness


def nan_at(step: int) -> optax.GradientTransformation:
    """An optax transformation whose ``step``-th update (0-based) is NaN."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        poison = jnp.where(count == step, jnp.nan, 0.0)
        return {k: v + poison for k, v in updates.items()}, count + 1

    return optax.GradientTransformation(init, update)


def test_nan_loss_stops_and_keeps_last_finite_params():
    y = np.zeros(5)
    optimizer = optax.chain(optax.sgd(1e-2), nan_at(7))
    svi = emdppl.SVI("auto_normal", optimizer=optimizer, num_steps=40, num_chunks=4)
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at step 7 of 40.*err\.result") as err:
        svi.fit(0, normal_normal, model_args=(y,), progress_bar=False)
    assert err.value.step == 7 and isinstance(err.value, FloatingPointError)
    result = err.value.result
    assert all(np.all(np.isfinite(v)) for v in result.params.values())
    assert np.all(np.isfinite(result.losses[:8])) and np.all(np.isnan(result.losses[8:]))
    assert int(result.state.optim_state[0]) == 7  # the optimiser took exactly 7 steps
    reference = emdppl.SVI("auto_normal", optimizer=optax.sgd(1e-2), num_steps=7).fit(
        0, normal_normal, model_args=(y,), progress_bar=False
    )
    for k, v in reference.params.items():
        np.testing.assert_allclose(result.params[k], v, rtol=1e-6)


def test_checkpoint_resume(tmp_path):
    y = np.ones(5)
    svi = emdppl.SVI("auto_normal", num_steps=300, num_chunks=3, checkpoint_dir=str(tmp_path))
    first = svi.fit(0, normal_normal, model_args=(y,), progress_bar=False)
    assert (tmp_path / "checkpoint.json").exists()
    resumed = svi.fit(0, normal_normal, model_args=(y,), progress_bar=False)  # 0 steps to run
    np.testing.assert_array_equal(first.losses, resumed.losses)
    for k, v in first.params.items():
        np.testing.assert_array_equal(resumed.params[k], v)


def test_bad_input():
    y = np.zeros(3)
    with pytest.raises(ValueError, match=r"unknown guide 'auto_nromal'.*'auto_normal'"):
        emdppl.SVI("auto_nromal")
    with pytest.raises(ValueError, match=r"unknown loss 'kl'.*'elbo'"):
        emdppl.SVI(loss="kl")
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        emdppl.SVI(num_steps=0)

    def two_latents(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        log_s = numpyro.sample("log_s", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, jnp.exp(log_s)), obs=y)

    def partial_guide(y):
        loc = numpyro.param("loc", 0.0)
        numpyro.sample("mu", dist.Normal(loc, 1.0))

    with pytest.raises(ValueError, match=r"does not cover latent site\(s\) \['log_s'\]"):
        emdppl.SVI(partial_guide).fit(0, two_latents, model_args=(y,), auxiliary=False)

    def extra_guide(y):
        numpyro.sample("mu", dist.Normal(numpyro.param("loc", 0.0), 1.0))
        numpyro.sample("log_s", dist.Normal(0.0, 1.0))
        numpyro.sample("sigma", dist.HalfNormal(1.0))

    with pytest.raises(ValueError, match=r"sample site\(s\) \['sigma'\] that are not latent"):
        emdppl.SVI(extra_guide).fit(0, two_latents, model_args=(y,), auxiliary=False)
    # a guide for the centered sites, fitted in auxiliary form: named, with the fix
    with pytest.raises(ValueError, match=r"\['mu_decentered', 'log_s_decentered'\].*auxiliary"):
        emdppl.SVI(extra_guide).fit(0, two_latents, model_args=(y,))


# ----------------------------------------------------------------------------- example


def test_vae_example_smoke(tmp_path):
    script = Path(__file__).parents[1] / "examples" / "vae_digits.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "reconstructions_d2.png", "samples_d2.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    numbers = [result[k] for k in ("aevb_test_elbo", "aevb_test_is_loglik", "mcem_test_is_loglik")]
    assert np.all(np.isfinite(numbers)), result
    # ELBO <= log p(x); the IS estimate with 1000 draws is within a few 0.1 nat of log p(x) and
    # the 100-draw ELBO estimate has sd < 0.1 nat over 447 images: 0.5 nat of slack.
    assert result["aevb_test_elbo"] <= result["aevb_test_is_loglik"] + 0.5, result
    assert -64 * np.log(2) < result["aevb_test_is_loglik"] < 0
