"""Every registered sampler against exact moments, and the registry's errors.

Each check is a z-test: ``z = (estimate - truth) / MCSE``, where the MCSE is that of the mean of
the estimator's influence values (delta method), from ArviZ's multi-chain ESS. ``|z| < 4.0`` has
a two-sided false-alarm probability of 6.3e-5 per check for a correct sampler. Seeds are fixed,
so a run is reproducible; the tolerances are what a fresh seed would need.

Targets:

- a correlated 2-D Gaussian: exact kernels against the exact mean, variances and correlation;
  unadjusted kernels (``is_exact=False``) against the stationary law of their linear recursion,
  which is known exactly, and they must be told apart from the exact law;
- Neal's funnel, written centered and sampled in auxiliary (non-centered) form by ``infer``;
- the banana (Inference Gym), which shares compiled code with the Gaussian (same module, same
  shapes) so each sampler is compiled once for both.

Ground truths of the funnel and the banana are Inference Gym's (``tests/data/inference_gym``).
"""

from __future__ import annotations

import json
from pathlib import Path

import arviz as az
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import emdppl

Z_MAX = 4.0  # |z| < 4.0: two-sided p = 6.3e-5 per check under a correct sampler
MIN_ESS = 200  # below this the ESS (hence the MCSE) is itself too noisy to test against
NUM_CHAINS = 4
GYM = Path(__file__).parent / "data" / "inference_gym"

# Run lengths per sampler, shared by the Gaussian and the banana so both reuse one compiled
# warm-up and one compiled sampling loop (num_samples and thinning are static). The banana's
# variance of x1 lives in its arms (x1 ~ 0.03 x0^2), which short runs under-visit while their
# MCSE looks fine, hence the lengths. MALA (no mass matrix) and Barker crawl along x0 (sd 10),
# so they take many cheap thinned steps. Unadjusted kernels take step sizes large enough for
# their bias to be detectable.
SETTINGS = {
    "nuts": dict(num_warmup=1000, num_samples=5000, target_accept=0.95),
    "hmc": dict(num_warmup=1000, num_samples=4000),
    "mala": dict(num_warmup=1000, num_samples=4000, thinning=20),
    "barker": dict(num_warmup=1000, num_samples=4000, thinning=25),
    "mclmc": dict(num_warmup=1000, num_samples=10000, thinning=2),
    "ula": dict(num_samples=4000, thinning=20, step_size=0.2),
    "sgld": dict(num_samples=4000, thinning=20, step_size=0.2),
    "sghmc": dict(num_samples=4000, thinning=2, step_size=0.2, alpha=2.0),
}
DEFAULT_SETTINGS = dict(num_warmup=1000, num_samples=4000)
# The funnel in auxiliary form is a standard normal: short runs do. HMC's fixed path length
# (no jitter in blackjax) with 16 steps of the adapted size lands near a multiple of pi, where
# x0^2 barely decorrelates (ESS 74 of 4000); 7 steps put it near 3 pi / 2.
FUNNEL_SETTINGS = {"hmc": dict(num_warmup=500, num_samples=1000, num_integration_steps=7)}
DEFAULT_FUNNEL_SETTINGS = dict(num_warmup=500, num_samples=1000)

MEAN = np.array([1.0, -1.0])
COV = np.array([[1.0, 1.6], [1.6, 4.0]])  # sds (1, 2), correlation 0.8, condition number 15


class QuadraticBanana(eqx.Module):
    r"""``log p(x) = -1/2 y^T P y`` with ``y = x - m`` and ``y_1 -= b (x_0^2 - 100)``.

    ``b = 0`` is the Gaussian ``N(m, P^{-1})``; ``m = 0``, ``P = diag(1/100, 1)``, ``b = 0.03``
    is Inference Gym's banana. Both are one equinox module with arrays of the same shapes, so
    they share compiled code.
    """

    mean: jax.Array
    precision: jax.Array
    curvature: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x - self.mean).at[1].add(-self.curvature * (x[0] ** 2 - 100.0))
        return -0.5 * y @ self.precision @ y


def _f32(x) -> jax.Array:
    # Not weak-typed, so the Gaussian and the banana trace to the same signature.
    return jnp.asarray(x, jnp.float32)


GAUSSIAN = QuadraticBanana(_f32(MEAN), _f32(np.linalg.inv(COV)), _f32(0.0))
BANANA = QuadraticBanana(_f32([0.0, 0.0]), _f32(np.diag([0.01, 1.0])), _f32(0.03))


def _mcmc(name: str) -> emdppl.MCMC:
    return emdppl.MCMC(name, num_chains=NUM_CHAINS, **SETTINGS.get(name, DEFAULT_SETTINGS))


def _funnel_mcmc(name: str) -> emdppl.MCMC:
    settings = FUNNEL_SETTINGS.get(name, DEFAULT_FUNNEL_SETTINGS)
    return emdppl.MCMC(name, num_chains=NUM_CHAINS, **settings)


def _infer_2d(name: str, logdensity_fn: QuadraticBanana):
    target = emdppl.Target.from_logdensity(logdensity_fn, jnp.zeros(2), num_chains=NUM_CHAINS)
    return emdppl.infer(target, _mcmc(name), rng_key=0, progress_bar=False)


def _draws(idata, var_name: str) -> np.ndarray:
    return np.asarray(idata.posterior[var_name].values, dtype=np.float64)


def _moments(x: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Estimates and their influence values (chain, draw) for draws ``x`` (chain, draw, d).

    Means and variances for every coordinate and, for d = 2, the correlation. The MCSE of each
    estimate is the MCSE of the mean of its influence values (delta method).
    """
    mean = x.mean(axis=(0, 1))
    dev = x - mean
    var = (dev**2).mean(axis=(0, 1))
    out = {}
    for i in range(x.shape[-1]):
        out[f"mean[{i}]"] = (mean[i], x[..., i])
        out[f"var[{i}]"] = (var[i], dev[..., i] ** 2)
    if x.shape[-1] == 2:
        u = dev / np.sqrt(var)
        corr = np.mean(u[..., 0] * u[..., 1])
        influence = u[..., 0] * u[..., 1] - 0.5 * corr * (u[..., 0] ** 2 + u[..., 1] ** 2)
        out["corr"] = (corr, influence)
    return out


def _gaussian_moments(mean: np.ndarray, cov: np.ndarray) -> dict[str, float]:
    sd = np.sqrt(np.diag(cov))
    return {
        "mean[0]": mean[0],
        "mean[1]": mean[1],
        "var[0]": cov[0, 0],
        "var[1]": cov[1, 1],
        "corr": cov[0, 1] / (sd[0] * sd[1]),
    }


def _z_scores(estimates: dict, truth: dict[str, float]) -> tuple[dict, dict]:
    """``{stat: z}`` and ``{stat: MCSE}`` for the stats named in ``truth``."""
    z, mcse = {}, {}
    for stat, value in truth.items():
        estimate, influence = estimates[stat]
        ess = az.ess(influence, method="mean")
        assert ess > MIN_ESS, f"{stat}: ESS {ess:.0f} < {MIN_ESS}; run longer for a usable MCSE"
        mcse[stat] = az.mcse(influence, method="mean")
        z[stat] = (estimate - value) / mcse[stat]
    return z, mcse


def _assert_z(estimates: dict, truth: dict[str, float], label: str) -> dict:
    z, mcse = _z_scores(estimates, truth)
    report = {
        k: f"{estimates[k][0]:.4f} vs {truth[k]:.4f} (MCSE {mcse[k]:.4f}, z {z[k]:+.1f})"
        for k in truth
    }
    bad = [k for k in truth if not abs(z[k]) < Z_MAX]
    assert not bad, f"{label}: |z| >= {Z_MAX} for {bad}: {report}"
    return mcse


# --------------------------------------------------------------------------------------------
# Stationary laws of the unadjusted kernels on N(m, C): linear Gaussian recursions, exact.


def _ula_covariance(cov: np.ndarray, step_size: float, temperature: float = 1.0) -> np.ndarray:
    """ULA / SGLD, ``x' = x - h C^{-1} (x - m) + sqrt(2 T h) n``: per eigen-direction of C with
    variance s^2 the stationary variance is ``T s^2 / (1 - h / (2 s^2))``."""
    s2, vectors = np.linalg.eigh(cov)
    return (vectors * (temperature * s2 / (1.0 - step_size / (2.0 * s2)))) @ vectors.T


def _sghmc_covariance(
    cov: np.ndarray, step_size: float, alpha: float, num_integration_steps: int, temperature: float
) -> np.ndarray:
    """blackjax's SGHMC (``blackjax/sgmcmc/sghmc.py``, ``diffusions.sghmc`` with beta = 0).

    Per kernel call the momentum is refreshed, ``p ~ N(0, I)`` (whatever the temperature), then
    ``num_integration_steps`` times, with the gradient taken at the pre-step position,
    ``x' = x + h p``, ``p' = (1 - alpha h) p + h grad log p(x) + sqrt(2 alpha h T) n``.
    The covariance of ``(x, p)`` obeys ``S <- A S A^T + Q``; iterate the per-call map on
    ``Cov(x)`` to its fixed point.
    """
    d, h = cov.shape[0], step_size
    eye = np.eye(d)
    a = np.block([[eye, h * eye], [-h * np.linalg.inv(cov), (1.0 - alpha * h) * eye]])
    q = np.zeros((2 * d, 2 * d))
    q[d:, d:] = 2.0 * alpha * h * temperature * eye
    cov_x = cov
    for _ in range(100_000):
        s = np.block([[cov_x, np.zeros((d, d))], [np.zeros((d, d)), eye]])
        for _ in range(num_integration_steps):
            s = a @ s @ a.T + q
        if np.max(np.abs(s[:d, :d] - cov_x)) < 1e-12:
            return s[:d, :d]
        cov_x = s[:d, :d]
    raise AssertionError("the SGHMC covariance recursion did not converge (unstable step size?)")


def _stationary_covariance(name: str, options: dict) -> np.ndarray:
    if name in ("ula", "sgld"):
        return _ula_covariance(COV, options["step_size"], options.get("temperature", 1.0))
    if name == "sghmc":
        return _sghmc_covariance(
            COV,
            options["step_size"],
            options["alpha"],
            options["num_integration_steps"],
            options["temperature"],
        )
    pytest.fail(
        f"unadjusted sampler {name!r} has no stationary-law model here: add its stationary "
        "covariance on a Gaussian to _stationary_covariance."
    )


# --------------------------------------------------------------------------------------------
# Correlated Gaussian


# MCLMC has no Metropolis correction (is_exact=False), but its tuner sets the step size from a
# target energy variance (5e-4 per dimension), which keeps its bias far below the MCSE of these
# runs; it is tested against the exact law. A bias model like ULA's does not exist for it.
TUNED_TO_SMALL_BIAS = {"mclmc"}


def _tested_as_exact(name: str) -> bool:
    return emdppl.get_sampler(name).is_exact or name in TUNED_TO_SMALL_BIAS


@pytest.mark.parametrize("name", emdppl.samplers())
def test_gaussian(name):
    idata = _infer_2d(name, GAUSSIAN)
    x = _draws(idata, "x")
    assert x.shape == (NUM_CHAINS, _mcmc(name).num_samples, 2)
    assert np.all(np.isfinite(x))
    if "diverging" in idata.sample_stats:
        assert int(idata.sample_stats["diverging"].sum()) == 0, "divergences on a Gaussian"
    estimates = _moments(x)
    exact = _gaussian_moments(MEAN, COV)
    if _tested_as_exact(name):
        _assert_z(estimates, exact, f"{name} on N(m, C)")
        return
    # Unadjusted: the stationary law is N(m, C_h) with C_h from the kernel's linear recursion.
    biased = _gaussian_moments(MEAN, _stationary_covariance(name, _mcmc(name).options))
    mcse = _assert_z(estimates, biased, f"{name} on N(m, C) against its stationary law N(m, C_h)")
    # The run is long enough to tell C_h from C (a gap of two test widths) ...
    power = max(abs(biased[k] - exact[k]) / mcse[k] for k in exact)
    assert power > 2 * Z_MAX, f"{name}: bias only {power:.1f} MCSE; raise step size or length"
    # ... and the draws do reject the exact law, so an exact (or otherwise wrong) kernel fails.
    z_exact, _ = _z_scores(estimates, exact)
    assert max(abs(v) for v in z_exact.values()) > Z_MAX, f"{name} looks exact: {z_exact}"


# --------------------------------------------------------------------------------------------
# Neal's funnel (auxiliary form) and the banana, against Inference Gym's exact moments


def _gym(name: str) -> dict:
    return json.loads((GYM / f"{name}.json").read_text())


def funnel():
    x0 = numpyro.sample("x0", dist.Normal(0.0, 3.0))
    numpyro.sample("z", dist.Normal(0.0, jnp.exp(x0 / 2)).expand([9]))


def _skip_unadjusted(name: str) -> None:
    # An unadjusted kernel's O(h) bias has a closed form on Gaussians only (tested above); on
    # these targets there is nothing exact to derive a tolerance from, so they are not tested.
    if not _tested_as_exact(name):
        pytest.skip(f"{name} is unadjusted: its bias on a non-Gaussian target is not known exactly")


@pytest.mark.parametrize("name", emdppl.samplers())
def test_funnel_auxiliary(name):
    _skip_unadjusted(name)
    gym = _gym("neals_funnel")
    idata = emdppl.infer(funnel, _funnel_mcmc(name), rng_key=0, progress_bar=False)
    # infer sampled the auxiliary form: unit-scale latents, centered sites as deterministics.
    assert {"x0_decentered", "z_decentered", "x0", "z"} <= set(idata.posterior.data_vars)
    assert idata.posterior["z"].shape[2:] == (9,)
    x0 = _draws(idata, "x0")
    z = _draws(idata, "z")
    estimates = _moments(x0[..., None])
    truth = {"mean[0]": gym["flat_mean"][0], "var[0]": gym["flat_standard_deviation"][0] ** 2}
    # z has heavy tails (a normal times a lognormal(0, 3/2)): its sd is not testable at this
    # length, but its mean is (z is symmetric, so the self-normalised z-statistic is valid).
    estimates.update({f"z_mean[{i}]": (z[..., i].mean(), z[..., i]) for i in range(z.shape[-1])})
    truth.update({f"z_mean[{i}]": gym["flat_mean"][1 + i] for i in range(z.shape[-1])})
    _assert_z(estimates, truth, f"{name} on Neal's funnel")


@pytest.mark.parametrize("name", emdppl.samplers())
def test_banana(name):
    _skip_unadjusted(name)
    gym = _gym("banana")
    x = _draws(_infer_2d(name, BANANA), "x")
    truth = {f"mean[{i}]": gym["flat_mean"][i] for i in range(2)}
    # Variances z-tested are the squared sds of the gym (sd = sqrt(var): same test to first order).
    truth.update({f"var[{i}]": gym["flat_standard_deviation"][i] ** 2 for i in range(2)})
    _assert_z(_moments(x), truth, f"{name} on the banana")


@pytest.mark.parametrize(
    "name", [n for n in emdppl.samplers() if emdppl.get_sampler(n).warmup is None]
)
def test_num_warmup_burns_in_samplers_without_adaptation(name):
    target = emdppl.Target.from_logdensity(lambda x: -0.5 * x @ x, jnp.full(2, 50.0), num_chains=4)
    mcmc = emdppl.MCMC(name, num_warmup=500, num_samples=1, num_chains=4, step_size=0.1)
    result = mcmc.sample(0, target, progress_bar=False)
    # 500 steps contract the distance 50 by at least 0.9 ** 500; the stationary sd is ~1.03, so
    # |x| < 6 fails with probability ~1e-8 per coordinate once burnt in.
    assert np.all(np.abs(np.asarray(result.positions)) < 6.0), np.asarray(result.positions)


# --------------------------------------------------------------------------------------------
# The registry and the settings it checks


def test_registry_lists_every_kind():
    names = emdppl.samplers()
    assert names == sorted(names)
    assert {"nuts", "hmc", "mala", "barker", "mclmc", "ula", "sgld", "sghmc"} <= set(names)
    for name in names:
        sampler = emdppl.get_sampler(name)
        assert sampler.name == name
        # Unadjusted kernels run on the gradient alone (EM distillation drives them by scores).
        assert sampler.needs_logdensity or not sampler.is_exact


def test_unknown_sampler_lists_registered_names():
    with pytest.raises(ValueError, match="unknown sampler 'nope'") as info:
        emdppl.get_sampler("nope")
    for name in emdppl.samplers():
        assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="unknown sampler"):
        emdppl.MCMC("nope")


def test_duplicate_registration_rejected():
    before = emdppl.get_sampler("nuts")
    with pytest.raises(ValueError, match="already registered"):
        emdppl.register_sampler(
            "nuts", init=lambda *a: None, build_kernel=lambda o: None, stats=lambda s, i: {}
        )
    assert emdppl.get_sampler("nuts") is before


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_chains=0),
        dict(num_samples=0),
        dict(num_warmup=-1),
        dict(thinning=0),
        dict(num_chains=2.0),
    ],
)
def test_mcmc_rejects_bad_counts(settings):
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        emdppl.MCMC("nuts", **settings)


def test_unknown_sampler_option_rejected():
    with pytest.raises(ValueError, match=r"no option\(s\) \['step'\].*step_size"):
        emdppl.MCMC("nuts", step=0.1)
    with pytest.raises(ValueError, match=r"no option\(s\) \['target_accept'\]"):
        emdppl.mcmc_algorithm("ula", lambda x: -0.5 * x @ x, target_accept=0.9)


def test_registration_checks_early_and_can_replace():
    ula = emdppl.get_sampler("ula")
    kwargs = dict(init=ula.init, build_kernel=ula.build_kernel, stats=ula.stats,
                  needs_logdensity=False, is_exact=False, grads_per_step=1)
    with pytest.raises(ValueError, match="defaults needs a 'step_size'"):
        emdppl.register_sampler("my_ula_no_step", **kwargs)
    assert "my_ula_no_step" not in emdppl.samplers()
    with pytest.raises(TypeError, match="init must be callable"):
        emdppl.register_sampler("my_ula_bad", **{**kwargs, "init": None}, defaults={"step_size": 1})
    try:
        first = emdppl.register_sampler("my_ula", **kwargs, defaults={"step_size": 0.1})
        again = emdppl.register_sampler("my_ula", **kwargs, defaults={"step_size": 0.2},
                                        replace=True)  # a notebook cell run twice
        assert emdppl.get_sampler("my_ula") is again and again is not first
        target = emdppl.Target.from_logdensity(lambda x: -0.5 * x @ x, jnp.zeros(2), num_chains=2)
        result = emdppl.MCMC("my_ula", num_warmup=0, num_samples=5, num_chains=2).sample(
            0, target, progress_bar=False
        )
        assert np.isfinite(np.asarray(result.positions)).all()
    finally:
        from emdppl.samplers import SAMPLERS

        SAMPLERS.pop("my_ula", None)


def test_rng_key_accepts_numpy_integers_and_refuses_strings():
    target = emdppl.Target.from_logdensity(lambda x: -0.5 * x @ x, jnp.zeros(2), num_chains=2)
    mala = emdppl.MCMC("mala", num_warmup=0, num_samples=3, num_chains=2, step_size=0.5)
    a = mala.sample(np.int64(3), target, progress_bar=False)
    b = mala.sample(3, target, progress_bar=False)
    np.testing.assert_array_equal(a.positions, b.positions)
    with pytest.raises(TypeError, match="rng_key must be an int seed or a JAX PRNG key, got str"):
        mala.sample("abc", target, progress_bar=False)
