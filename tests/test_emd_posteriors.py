"""EMD on posteriors: the unsmoothed posterior teacher, the generator as its own student, the
PSIS fit check, and ``emdppl.infer(model, emdppl.EMD())`` with defaults on held-out models.

The held-out models (posteriordb's kilpisjarvi and arK) were not used to choose any default
(the defaults were chosen on eight schools, baseball logit, GP and ZIP; benchmarks/README.md,
"EMD on posteriors"). Tolerance per scalar component, two-sided p = 0.001 per comparison
(z = 3.29):

- mean: ``|m - m_ref| <= B_m sd_ref + 3.29 sqrt(mcse_ref^2 + sd_ref^2 / n)``, ``n`` independent
  one-step draws;
- sd: ``|log(sd / sd_ref)| <= B_s + 3.29 / sqrt(2 n)`` (the log sd's standard error of
  independent near-normal draws; the reference sd's own error is below it).

``B_m = 0.2`` and ``B_s = 0.15`` are the accuracy EMD is documented to reach (chosen, not
derived: the issue's target); only the MCSE terms are derived.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

import emdppl
from benchmarks.models import SAMPLER_MODELS
from emdppl import generators
from emdppl.distillation import OwnDensityStudent, check_fit, psis
from emdppl.teachers import DensityTeacher

Z = 3.29  # two-sided p = 0.001
MEAN_BOUND, LOG_SD_BOUND = 0.2, 0.15


def _gaussian_teacher(smoothing: str) -> DensityTeacher:
    scale = jnp.array([0.5, 2.0])
    return DensityTeacher(
        lambda x: -0.5 * jnp.sum((x / scale) ** 2), lambda x: x, 2, smoothing=smoothing
    )


def test_unsmoothed_teacher_is_the_posterior_at_every_sigma():
    teacher = _gaussian_teacher("none")
    x = jnp.array([0.3, -1.0])
    expected = -x / jnp.array([0.25, 4.0])
    for sigma in (0.05, 0.5):
        np.testing.assert_allclose(teacher.score(x, sigma), expected, rtol=1e-6)
        np.testing.assert_allclose(teacher.log_prob(x, sigma), -0.5 * (0.36 + 0.25), rtol=1e-6)
    smoothed = _gaussian_teacher("laplace")
    with pytest.raises(ValueError, match="smoothing='none'"):
        smoothed.log_prob(x)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        _gaussian_teacher("exact")


def test_own_density_student_is_the_unsmoothed_density():
    inner = generators.affine(2, loc=jnp.array([1.0, -1.0]), scale=jnp.array([0.5, 2.0]))
    student = OwnDensityStudent(inner)
    x = jnp.array([0.2, 0.7])
    np.testing.assert_allclose(student.log_prob(x), inner.marginal_logdensity(x, 0.0), rtol=1e-6)
    np.testing.assert_allclose(student.marginal_logdensity(x, 0.3), student.log_prob(x))
    np.testing.assert_allclose(
        student.marginal_score(x, 0.3), -(x - inner.loc) / jnp.array([0.25, 4.0]), rtol=1e-5
    )
    z = jnp.array([0.1, -0.4])
    np.testing.assert_allclose(student(z), inner(z))
    with pytest.raises(ValueError, match="no exact density"):
        OwnDensityStudent(generators.mlp(2, key=jax.random.key(0)))


def test_check_fit_is_loud_only_for_a_bad_fit():
    """q = N(0, 1) draws: p = q gives k-hat 0 (no warning); p = N(0, 3^2), whose tails q
    misses, has weights of infinite variance (k-hat -> 1 - 1/9 = 0.89 asymptotically)."""
    x = np.random.default_rng(0).normal(size=4000)
    log_q = -0.5 * x**2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights, k = check_fit(log_q - log_q + 3.0)
    assert k == 0.0
    np.testing.assert_allclose(weights, 1 / 4000)
    with pytest.warns(RuntimeWarning, match="PSIS k-hat"):
        weights, k = check_fit(-0.5 * (x / 3) ** 2 - log_q)
    assert k > 0.7 and abs(weights.sum() - 1) < 1e-9
    # p = q computed in float32 (the log weights differ by rounding only): ArviZ's tail fit
    # gives k-hat inf on such weights, which made a perfect fit fail the check
    log_p32 = (-0.5 * x**2 - 30.0).astype(np.float32)
    ulps = np.random.default_rng(2).integers(-1, 2, size=4000)  # rounding: a few levels only
    log_q32 = (log_p32 + 33.0 + ulps * np.spacing(np.float32(33.0))).astype(np.float32)
    assert 0 < np.ptp(log_p32 - log_q32) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights, k = check_fit(log_p32 - log_q32, x[:, None], log_p32)
    assert k == 0.0 and abs(weights.sum() - 1) < 1e-9
    weights, k = psis(np.array([0.0, 1.0, np.nan, 2.0] * 100))
    assert k == float("inf") and np.all(weights[2::4] == 0)


def test_check_fit_names_nonfinite_draws_and_weights():
    """A generator that diverged (NaN coordinates), draws where the posterior's log density
    overflows (finite draws far out) and draws where the generator's own density is not finite
    are told apart, with counts and how far out, in the warning."""
    x = np.random.default_rng(1).normal(size=(400, 2))
    log_p = -0.5 * (x**2).sum(axis=1)
    log_q = np.zeros(400)
    x[:7, 1] = np.nan
    log_p[:7] = np.nan  # where the draw is NaN, so is its density
    x[7:10] = 1e4
    log_p[7:10] = -np.inf  # far out: the model's transforms overflow
    log_q[10:12] = np.nan
    with pytest.warns(RuntimeWarning, match="PSIS k-hat inf") as record:
        weights, k = check_fit(log_p - log_q, x, log_p)
    message = str(record[0].message)
    assert "7 of 400 draws have NaN or infinite coordinates" in message
    assert "3 of 400 finite draws have a non-finite posterior log density" in message
    assert "median 1e+04 posterior sds out" in message
    assert "2 of 400 have a non-finite generator log density" in message
    assert "update_z=False" in message
    assert np.all(weights[:12] == 0) and abs(weights.sum() - 1) < 1e-9


def _check_against_reference(name: str, num_samples: int = 4000):
    bench = SAMPLER_MODELS[name]
    kwargs = {k: np.asarray(v) for k, v in bench.load_kwargs().items()}
    with warnings.catch_warnings():
        # a failed fit check (or NaN stop) fails the test
        warnings.filterwarnings("error", message="the distilled generator")
        idata = emdppl.infer(
            bench.model, emdppl.EMD(num_samples=num_samples), model_kwargs=kwargs, rng_key=0,
            progress_bar=False,
        )
    assert idata.posterior.attrs["num_skipped_steps"] == 0
    reference = bench.reference()
    for site in bench.var_names:
        x = idata.posterior[site].values.reshape(num_samples, -1)
        _assert_within_bounds(
            x, *(np.ravel(reference[site][k]) for k in ("mean", "sd", "mcse")), site
        )


def _assert_within_bounds(
    x: np.ndarray, ref_mean: np.ndarray, ref_sd: np.ndarray, ref_mcse: np.ndarray, site: str
) -> None:
    """The module's mean and sd bounds for independent draws ``x (n, components)``."""
    n = len(x)
    mean_tol = MEAN_BOUND * ref_sd + Z * np.sqrt(ref_mcse**2 + ref_sd**2 / n)
    np.testing.assert_array_less(np.abs(x.mean(0) - ref_mean), mean_tol, err_msg=site)
    log_sd_tol = LOG_SD_BOUND + Z / np.sqrt(2 * n)
    np.testing.assert_array_less(np.abs(np.log(x.std(0) / ref_sd)), log_sd_tol, err_msg=site)


@pytest.mark.parametrize("name", ["kilpisjarvi", "arK"])
def test_emd_defaults_on_held_out_posteriors(name):
    _check_against_reference(name)


def test_emd_on_the_horseshoe_is_correct_or_loud():
    """NumPyro's horseshoe against its exact Gibbs reference (``benchmarks/horseshoe_gibbs.py``):
    EMD's defaults do not fit it today (benchmarks/README.md), so the fit check must say so; a
    run that does not warn must be within the bounds above (positive sites on the log scale,
    where their heavy right tails have an sd)."""
    from benchmarks.models import NUMPYRO_EXAMPLE_MODELS

    bench = NUMPYRO_EXAMPLE_MODELS["horseshoe_regression"]
    kwargs = {k: np.asarray(v) for k, v in bench.load_kwargs().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = emdppl.infer(
            bench.model, emdppl.EMD(num_samples=4000), model_kwargs=kwargs, rng_key=0,
            progress_bar=False,
        )
    if any("the distilled generator" in str(w.message) for w in caught):
        return
    reference = bench.reference_draws()
    for site in bench.var_names:
        x = idata.posterior[site].values.reshape(4000, -1)
        ref = reference[site].reshape(len(reference[site]), -1)
        if np.all(ref > 0):
            x, ref = np.log(x), np.log(ref)
        # MCSE from 4389, the smallest bulk ESS of the Gibbs reference's components (log tau)
        ref_sd = ref.std(0)
        _assert_within_bounds(x, ref.mean(0), ref_sd, ref_sd / np.sqrt(4389), site)


class _Fit:
    """What ``EMD._distill`` returns, for a stub: a result and ``_draws``' four values."""

    def __init__(self, k: float, value: float):
        self.k, self.value = k, value

    def __call__(self, emd, teacher):
        result = type("Result", (), {})()
        result.state = type("State", (), {"num_skipped": 0})()
        result.devices, result.estep_idata = ("cpu:0",), None
        result.generator, result.config = None, emdppl.DistillConfig()
        draws = jnp.full((emd.num_samples, teacher.data_dim), self.value)
        warning = f"the distilled generator does not represent this posterior: k {self.k}" * (
            self.k > 0.7
        )
        return result, (draws, {"pareto_k": self.k, "importance_ess": 1.0}, None, warning)


@pytest.mark.parametrize(
    "fits, kept, warns, other_k",
    [
        ({"sinh_arcsinh": _Fit(0.9, 1.0), "maf": _Fit(0.5, 2.0)}, "maf", False, 0.9),
        ({"sinh_arcsinh": _Fit(0.9, 1.0), "maf": _Fit(0.95, 2.0)}, "sinh_arcsinh", True, 0.95),
        (
            {"sinh_arcsinh": _Fit(0.9, 1.0), "maf": FloatingPointError},
            "sinh_arcsinh", True, float("inf"),
        ),
        ({"sinh_arcsinh": _Fit(0.3, 1.0)}, "sinh_arcsinh", False, None),  # good: no second try
        (
            {"sinh_arcsinh": FloatingPointError, "maf": _Fit(0.5, 2.0)},
            "maf", False, float("inf"),
        ),
        (
            {"sinh_arcsinh": FloatingPointError, "maf": _Fit(0.9, 2.0)},
            "maf", True, float("inf"),
        ),
        ({"sinh_arcsinh": FloatingPointError, "maf": FloatingPointError}, None, None, None),
    ],
)
def test_fallback_generator_keeps_the_better_fit(monkeypatch, fits, kept, warns, other_k):
    """When the default generator's fit check fails or it stops on NaN, EMD distils the
    posterior into the fallback generator and keeps the fit with the lower k-hat (a NaN stop
    counts as inf); it warns only when the kept fit fails the check, naming both tries, and
    raises with both causes when both stop."""
    calls = []

    def fake_distill(self, teacher, name, config, keys, progress_bar):
        calls.append(name)
        if fits[name] is FloatingPointError:
            raise FloatingPointError(f"{name} stopped")
        return fits[name](self, teacher)

    monkeypatch.setattr(emdppl.EMD, "_distill", fake_distill)
    model = lambda: numpyro.sample("x", numpyro.distributions.Normal(0.0, 1.0))  # noqa: E731
    if kept is None:
        with pytest.raises(FloatingPointError, match="sinh_arcsinh stopped") as raised:
            emdppl.infer(model, emdppl.EMD(num_samples=8), progress_bar=False)
        assert "The fallback generator 'maf' stopped on NaN too:\nmaf stopped" in str(raised.value)
        with pytest.raises(FloatingPointError, match="sinh_arcsinh stopped"):
            emdppl.infer(model, emdppl.EMD(num_samples=8, fallback_generator=None))
        assert calls == ["sinh_arcsinh", "maf", "sinh_arcsinh"]
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = emdppl.infer(model, emdppl.EMD(num_samples=8), progress_bar=False)
    assert calls == list(fits)
    post = idata.posterior
    assert post.attrs["generator"] == kept
    assert float(post["x"].values.mean()) == {"sinh_arcsinh": 1.0, "maf": 2.0}[kept]
    fit_warnings = [str(w.message) for w in caught if "distilled generator" in str(w.message)]
    assert len(fit_warnings) == int(warns)
    if warns:
        assert "'sinh_arcsinh' and 'maf' were both tried" in fit_warnings[0]
    if other_k is None:
        assert "fallback_pareto_k" not in post.attrs
    else:
        assert float(post.attrs["fallback_pareto_k"]) == other_k
    with pytest.raises(ValueError, match="fallback_generator must be None or one of"):
        emdppl.EMD(fallback_generator="mlp")


def _normal_means(y):
    """y_i ~ N(mu, 1), mu ~ N(0, 2^2), with a deterministic site: the posterior of mu is
    N(sum(y) / (n + 1/4), 1 / (n + 1/4)) exactly."""
    mu = numpyro.sample("mu", numpyro.distributions.Normal(0.0, 2.0))
    numpyro.deterministic("mu_plus_one", mu + 1.0)
    numpyro.sample("y", numpyro.distributions.Normal(mu, 1.0), obs=y)


def test_fit_keeps_a_generator_that_draws_more_posterior_samples():
    """``EMD.fit`` returns the fitted generator; ``sample_posterior`` draws any number of
    constrained samples from it (raw one-step draws, or importance-resampled ones), within
    the exact posterior's MCSE bounds (p = 0.001 per comparison)."""
    y = np.random.default_rng(3).normal(1.5, 1.0, size=20).astype(np.float32)
    precision = len(y) + 0.25
    mean, sd = y.sum() / precision, precision**-0.5
    emd = emdppl.EMD(num_steps=300, num_samples=400)
    result = emd.fit(0, _normal_means, model_kwargs=dict(y=y), progress_bar=False)
    assert isinstance(result, emdppl.EMDResult) and result.name == "sinh_arcsinh"
    assert result.warning == "" and result.importance["pareto_k"] < 0.7
    n = 20_000
    raw = result.sample_posterior(1, n, importance_resampling=False)
    assert sorted(raw) == ["mu", "mu_decentered", "mu_plus_one"] and raw["mu"].shape == (n,)
    np.testing.assert_allclose(raw["mu_plus_one"], raw["mu"] + 1.0, rtol=1e-6)
    resampled = result.sample_posterior(2, n)  # EMD's default: resampled
    # resampled draws: the pool's importance ESS (fraction from the fit's own check) and the
    # multinomial resampling both add variance
    efficiency = result.importance["importance_ess"] / (4 * emd.num_samples)
    for draws, variance in ((raw, 1 / n), (resampled, 1 / n + 1 / (efficiency * 4 * n))):
        mu = np.asarray(draws["mu"])
        assert abs(mu.mean() - mean) <= MEAN_BOUND * sd + Z * sd * np.sqrt(variance)
        assert abs(np.log(mu.std() / sd)) <= LOG_SD_BOUND + Z / np.sqrt(2 * n)
    other = result.sample_posterior(3, n, importance_resampling=False)
    assert not np.allclose(raw["mu"][:10], other["mu"][:10])
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        result.sample_posterior(0, 0)
