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
# so they take many cheap thinned steps; MALA's warm-up leaves a chain with a step size 10x too
# small now and then (bulk ESS of x0's mean 88-780 over seeds at half this length). Unadjusted
# kernels take step sizes large enough for their bias to be detectable.
SETTINGS = {
    "nuts": dict(num_warmup=1000, num_samples=5000, target_accept=0.95),
    "hmc": dict(num_warmup=1000, num_samples=4000),
    "mala": dict(num_warmup=2000, num_samples=8000, thinning=20),
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
    # infer sampled the auxiliary form: unit-scale latents (in their own group), centered sites
    # as deterministics (the posterior, what the model wrote).
    assert {"x0_decentered", "z_decentered"} <= set(idata.unconstrained_posterior.data_vars)
    assert {"x0", "z"} == set(idata.posterior.data_vars)
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


def _centred_gaussian(x):  # N(0, C) as a user writes it: the quadratic form of x itself
    return -0.5 * x @ jnp.asarray(np.linalg.inv(COV), jnp.float32) @ x


@pytest.mark.parametrize("name", ["nuts", "hmc", "mala", "barker"])
def test_dense_mass_on_the_correlated_gaussian(name):
    """With a dense metric every window-adapted sampler recovers N(0, C) (correlation 0.8).
    HMC takes 9 steps: the whitened target is isotropic, so a fixed path near a multiple of pi
    returns where it started; at the adapted step sizes (0.8-0.95) the default 16 steps make
    about 4 pi (ESS of a mean 158 of 8000) and 7 about 2 pi (39); 9 make about 2.5 pi."""
    target = emdppl.Target.from_logdensity(_centred_gaussian, jnp.zeros(2), num_chains=NUM_CHAINS)
    options = {"num_integration_steps": 9} if name == "hmc" else {}
    mcmc = emdppl.MCMC(name, num_warmup=1000, num_samples=2000, dense_mass=True, **options)
    result = mcmc.sample(0, target, progress_bar=False)
    x = np.asarray(result.positions, np.float64)
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(result.stats["lp"]))
    _assert_z(_moments(x), _gaussian_moments(np.zeros(2), COV), f"{name}, dense mass, N(0, C)")


def test_a_kernel_never_moves_to_a_nonfinite_log_density():
    """At a step size far past leapfrog's stability limit (as dual averaging tries after a
    window), HMC's 16 steps diverge to |x| ~ 1e26, where the float32 quadratic form overflows
    to a log density of +inf; blackjax 1.7.1 accepts such a proposal (energy -inf: 192 of 200
    here), and a dense-metric HMC run ended its chains at 1e37 with step size 0. The
    registered kernel keeps the current state instead (acceptance 0, divergent)."""
    hmc = emdppl.get_sampler("hmc")
    kernel = hmc.build_kernel(hmc.options(dense_mass=True))
    state = hmc.init(jnp.array([0.5, 1.0]), _centred_gaussian, jax.random.key(0))
    parameters = {
        "step_size": jnp.asarray(8.0),
        "inverse_mass_matrix": jnp.array([[0.57, 0.918], [0.918, 2.728]]),
    }
    step = jax.jit(jax.vmap(lambda key: kernel(key, state, _centred_gaussian, parameters)))
    new_state, info = step(jax.random.split(jax.random.key(0), 200))
    assert np.all(np.isfinite(np.asarray(new_state.logdensity)))
    assert np.abs(np.asarray(new_state.position)).max() < 1e3
    moved = ~np.all(np.asarray(new_state.position) == np.asarray(state.position), axis=1)
    assert np.all(np.asarray(info.acceptance_rate)[~moved] == 0.0) or not np.any(~moved)


@pytest.mark.parametrize(("num_warmup", "thinning"), [(50, 1), (30, 1), (100, 3)])
def test_warmup_and_sampling_share_one_compiled_step(num_warmup, thinning):
    """NUTS's warm-up (Stan's windows, one kernel step at a time) runs in the step function the
    sampling runs: the log density is traced as often as for sampling alone, so XLA compiles
    one NUTS kernel, not one per phase (also when the phases differ in length, or the warm-up
    is not a whole number of thinned records)."""

    def traces(num_warmup: int) -> int:
        count = []

        def logdensity(x):  # a new function per run: nothing compiled is shared between runs
            count.append(1)  # runs only while JAX traces it
            return -0.5 * jnp.sum(x**2)

        target = emdppl.Target.from_logdensity(logdensity, jnp.ones((4, 3)), num_chains=4)
        mcmc = emdppl.MCMC(
            "nuts", num_warmup=num_warmup, num_samples=50, num_chains=4, thinning=thinning
        )
        result = mcmc.sample(0, target, progress_bar=False)
        if num_warmup:  # adapted: dual averaging moved the step size off its initial 1.0
            assert not np.allclose(result.parameters["step_size"], 1.0)
        return len(count)

    assert traces(num_warmup) == traces(0) > 0


@pytest.mark.parametrize(
    "name", [n for n in emdppl.samplers() if not emdppl.get_sampler(n).adapts]
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
    kwargs = dict(
        init=ula.init,
        build_kernel=ula.build_kernel,
        stats=ula.stats,
        needs_logdensity=False,
        is_exact=False,
        grads_per_step=1,
    )
    with pytest.raises(ValueError, match="defaults needs a 'step_size'"):
        emdppl.register_sampler("my_ula_no_step", **kwargs)
    assert "my_ula_no_step" not in emdppl.samplers()
    with pytest.raises(TypeError, match="init must be callable"):
        emdppl.register_sampler("my_ula_bad", **{**kwargs, "init": None}, defaults={"step_size": 1})
    try:
        first = emdppl.register_sampler("my_ula", **kwargs, defaults={"step_size": 0.1})
        again = emdppl.register_sampler(
            "my_ula", **kwargs, defaults={"step_size": 0.2}, replace=True
        )  # a notebook cell run twice
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


# --------------------------------------------------------------------------------------------
# Preconditioned MALA (emdppl.kernels.mala), Barker's metric, the warm-up's parts


def _scan_kernel(kernel, state, logdensity_fn, num_steps, *params, seed=0):
    """``num_steps`` steps of one chain: positions ``(num_steps, ...)`` and acceptance rates."""

    def step(state, key):
        state, info = kernel(key, state, logdensity_fn, *params)
        return state, (state.position, info.acceptance_rate)

    keys = jax.random.split(jax.random.key(seed), num_steps)
    return jax.lax.scan(step, state, keys)[1]


def test_mala_kernel_with_unit_metric_is_blackjax_mala_draw_for_draw():
    import blackjax

    from emdppl.kernels import mala

    def logdensity(x):
        return -0.5 * jnp.sum(x["a"] ** 2) - 0.5 * jnp.sum((x["b"] / 3.0) ** 2) - x["a"][0] ** 4

    position = {"a": jnp.ones(3), "b": jnp.zeros(2)}
    ours = _scan_kernel(
        mala.build_kernel(), mala.init(position, logdensity), logdensity, 2000, 0.3, jnp.ones(5)
    )
    theirs = _scan_kernel(
        blackjax.mala.build_kernel(),
        blackjax.mala.init(position, logdensity),
        logdensity,
        2000,
        0.3,
    )
    # same proposals and accept/reject decisions: identical paths (float round-off aside)
    for k in position:
        np.testing.assert_allclose(ours[0][k], theirs[0][k], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-4, atol=1e-6)
    assert 0.2 < float(ours[1].mean()) < 0.99  # the comparison saw accepts and rejects


# sds 1e-3, 1 and 30 (a condition number of 9e8), the last two correlated 0.8
BAD_SD = np.array([1e-3, 1.0, 30.0])
BAD_CORR = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.8], [0.0, 0.8, 1.0]])
BAD_COV = BAD_CORR * np.outer(BAD_SD, BAD_SD)
BAD_MEAN = np.array([0.5, -1.0, 10.0])


@pytest.mark.parametrize("metric", ["diagonal", "dense"])
def test_preconditioned_mala_is_invariant_on_a_badly_scaled_gaussian(metric):
    """Means and variances z-tested against the exact ones (|z| < 4: p = 6.3e-5 per check).

    The diagonal metric is the exact variances but ignores the 0.8 correlation, so it is not
    the ideal preconditioner; the kernel must be invariant anyway. Chains start at exact draws,
    so no burn-in is needed."""
    from emdppl.kernels import mala

    precision = jnp.asarray(np.linalg.inv(BAD_COV), jnp.float32)
    mean = jnp.asarray(BAD_MEAN, jnp.float32)

    def logdensity(x):
        return -0.5 * (x - mean) @ precision @ (x - mean)

    inverse_mass_matrix = jnp.asarray(
        np.diag(BAD_SD**2) if metric == "diagonal" else BAD_COV, jnp.float32
    )
    if metric == "diagonal":
        inverse_mass_matrix = jnp.diagonal(inverse_mass_matrix)
    step_size = 0.3 if metric == "diagonal" else 0.7
    kernel = mala.build_kernel()
    starts = np.random.default_rng(0).multivariate_normal(BAD_MEAN, BAD_COV, size=NUM_CHAINS)

    def chain(x0, seed):
        state = mala.init(jnp.asarray(x0, jnp.float32), logdensity)
        return _scan_kernel(
            kernel, state, logdensity, 20000, step_size, inverse_mass_matrix, seed=seed
        )

    paths = [chain(x0, seed) for seed, x0 in enumerate(starts)]
    x = np.stack([np.asarray(p[0], np.float64)[::5] for p in paths])  # (chain, draw, 3)
    acceptance = float(np.mean([p[1].mean() for p in paths]))
    assert 0.3 < acceptance < 0.95, acceptance
    truth = {}
    for i in range(3):
        truth[f"mean[{i}]"] = BAD_MEAN[i]
        truth[f"var[{i}]"] = BAD_COV[i, i]
    _assert_z(_moments(x), truth, f"preconditioned MALA ({metric} metric)")


def test_barker_metric_is_the_whitened_kernel_draw_for_draw():
    """emdppl's Barker with inverse mass matrix diag(s^2) on p(x) is blackjax's Barker on
    the whitened p(s w) (Livingstone & Zanella 2022, Appendix G): the same draws, x = s w."""
    import blackjax

    from emdppl.samplers import _Barker

    scale = jnp.array([1e-3, 1.0, 30.0])

    def logdensity(x):
        return -0.5 * jnp.sum((x / scale) ** 2) - 0.1 * (x[1] / scale[1]) ** 4

    def whitened(w):
        return logdensity(scale * w)

    x0 = jnp.array([1e-3, 0.5, -20.0])
    ours = _scan_kernel(
        _Barker.build_kernel(), _Barker.init(x0, logdensity), logdensity, 500, 0.8, scale**2
    )
    theirs = _scan_kernel(
        blackjax.barker.build_kernel(),
        blackjax.barker.init(x0 / scale, whitened),
        whitened,
        500,
        0.8,
    )
    np.testing.assert_allclose(ours[0] / scale, theirs[0], rtol=1e-4, atol=1e-5)
    assert 0.2 < float(ours[1].mean()) < 0.99


def test_find_step_size_brackets_the_target_and_follows_the_scale():
    """MALA on N(0, s^2 I_4): the step found accepts above the target and its double below
    (mean acceptance of 256 fresh proposals each, which are not the search's), and it scales
    as s^2 from s = 1 to s = 1e-3 (to within the factor 2 of the search)."""
    from emdppl.kernels import mala
    from emdppl.samplers import find_step_size

    kernel = mala.build_kernel()
    steps = {}
    for s in (1.0, 1e-3):

        def logdensity(x, s=s):
            return -0.5 * jnp.sum((x / s) ** 2)

        state = mala.init(jnp.full(4, s), logdensity)
        step = find_step_size(jax.random.key(0), kernel, state, logdensity, 0.1, jnp.ones(4), 0.574)
        steps[s] = float(step)

        def acceptance(eps, state=state, logdensity=logdensity):
            keys = jax.random.split(jax.random.key(1), 256)
            return float(
                jnp.mean(
                    jax.vmap(
                        lambda k: kernel(k, state, logdensity, eps, jnp.ones(4))[1].acceptance_rate
                    )(keys)
                )
            )

        assert acceptance(step) > 0.574 - 0.1, (s, step, acceptance(step))
        assert acceptance(2 * step) < 0.574 + 0.1, (s, step, acceptance(2 * step))
    assert 0.25 < steps[1e-3] / (1e-6 * steps[1.0]) < 4.0, steps


@pytest.mark.parametrize("is_diagonal", [True, False])
def test_welford_metric_is_scale_equivariant(is_diagonal):
    """Rescaling the draws by c rescales the adapted metric by c^2, to float precision; the
    previous metric is the start (diag(c^2))."""
    from emdppl.samplers import welford_metric

    draws = np.random.default_rng(0).normal(size=(40, 3)) * np.array([1.0, 2.0, 0.5])
    metrics = []
    for c in (1.0, 1e-4):
        core = welford_metric(is_diagonal, jnp.full(3, c**2, jnp.float32))
        state = core.init(3)
        for x in draws:
            state = core.update(state, jnp.asarray(c * x, jnp.float32))
        metrics.append(np.asarray(core.final(state).inverse_mass_matrix, np.float64))
    np.testing.assert_allclose(metrics[1], 1e-8 * metrics[0], rtol=1e-4)
    expected_diag = (40 / 45) * draws.var(axis=0, ddof=1) + 5 / 45
    np.testing.assert_allclose(
        np.diag(metrics[0]) if not is_diagonal else metrics[0], expected_diag, rtol=1e-4
    )


# --------------------------------------------------------------------------------------------
# Where chains start


def _linear(x, y=None):
    slope = numpyro.sample("slope", dist.Normal(0.0, 10.0))
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(slope * x, scale), obs=y)


LINEAR_DATA = dict(x=np.linspace(-1, 1, 20), y=3.0 * np.linspace(-1, 1, 20) + 0.1)


def test_default_init_by_sampler():
    assert emdppl.MCMC("nuts").init == "uniform" and emdppl.MCMC("hmc").init == "uniform"
    for name in ("mala", "barker", "mclmc"):
        assert emdppl.MCMC(name).init == "optimize"
    assert emdppl.MCMC("mala", init="uniform").init == "uniform"
    with pytest.raises(ValueError, match=r"init must be one of \('uniform', 'median', 'optim"):
        emdppl.MCMC("nuts", init="mode")
    with pytest.raises(ValueError, match="init_radius must be a number > 0"):
        emdppl.MCMC("nuts", init_radius=0.0)


def test_init_strategies_place_the_chains():
    target = emdppl.Target.from_numpyro(_linear, model_kwargs=LINEAR_DATA, num_chains=4)
    key = jax.random.key(3)
    # uniform at the default radius: the target's own positions, untouched
    assert emdppl.MCMC("nuts").initialize(key, target) is target
    wide = emdppl.MCMC("nuts", init_radius=0.1).initialize(key, target).initial_position
    assert all(np.all(np.abs(np.asarray(v)) <= 0.1) for v in wide.values())
    # median: of 15 prior draws per chain; slope_decentered ~ N(0, 1) has median near 0
    median = emdppl.MCMC("nuts", init="median").initialize(key, target).initial_position
    assert np.all(np.abs(np.asarray(median["slope_decentered"])) < 1.5)
    # values on the constrained scale of the sampled sites; the others uniform
    given = emdppl.MCMC("nuts", init={"scale_decentered": 0.5}).initialize(key, target)
    np.testing.assert_allclose(given.initial_position["scale_decentered"], np.log(0.5), rtol=1e-6)
    unknown = r"init values for \['slope'\].*\['slope_decentered'\] are sampled"
    with pytest.raises(ValueError, match=unknown):
        emdppl.MCMC("nuts", init={"slope": 1.0}).initialize(key, target)
    # optimize: every chain at least as probable as a typical draw, and the chains apart
    start = emdppl.MCMC("mala").initialize(key, target)
    lp = jax.vmap(target.logdensity_fn)(start.initial_position)
    mode_lp = float(jnp.max(lp))
    assert np.all(np.asarray(lp) >= mode_lp - 1.0 - 1e-3)  # d = 2: within d / 2 = 1
    assert np.all(
        np.asarray(lp) > np.asarray(jax.vmap(target.logdensity_fn)(target.initial_position)) - 1e-3
    )
    assert np.ptp(np.asarray(start.initial_position["slope_decentered"])) > 0
    # a plain log density has no sites to draw, but can be optimised from its positions
    plain = emdppl.Target.from_logdensity(lambda x: -0.5 * x @ x, jnp.full(2, 40.0), num_chains=2)
    with pytest.raises(ValueError, match="plain log density"):
        emdppl.MCMC("nuts", init="median").initialize(key, plain)
    moved = emdppl.MCMC("mala").initialize(key, plain).initial_position
    assert np.all(np.abs(np.asarray(moved)) < 3.0)


def test_target_from_numpyro_init():
    median = emdppl.Target.from_numpyro(
        _linear, model_kwargs=LINEAR_DATA, num_chains=3, init="median"
    )
    assert np.asarray(median.initial_position["slope_decentered"]).shape == (3,)
    with pytest.raises(ValueError, match="init must be one of"):
        emdppl.Target.from_numpyro(_linear, model_kwargs=LINEAR_DATA, init="optimize")
