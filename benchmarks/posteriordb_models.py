"""posteriordb's ARM-book regressions and its two ODE models, ported to NumPyro.

Each is the Stan program of ``data/posteriordb/stan/`` with the same parameters, priors and
likelihood (flat priors as ``dist.ImproperUniform``). The ODE models integrate with diffrax
(Dopri5, adaptive steps, gradients by diffrax's checkpointed reverse mode); a solve that does
not finish within its step budget returns NaN, which the samplers reject as a divergence and
EMD skips as a NaN step, instead of stopping the run.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from benchmarks.models import (
    BenchmarkModel,
    posteriordb_data,
    posteriordb_draws,
    posteriordb_moments,
)

__all__ = [
    "ARM_POSTERIORS",
    "ARM_REGRESSIONS",
    "ODE_MODELS",
    "columns",
    "earn_height",
    "lotka_volterra",
    "one_comp_mm_elim_abs",
    "predator_prey",
    "solve_ode",
]


def columns(name: str, keys: tuple[str, ...], dtype=np.float32) -> Callable[[], dict]:
    """A loader of the columns ``keys`` of the data set ``name``."""

    def load() -> dict:
        data = posteriordb_data(name)
        return {k: np.asarray(data[k], dtype) for k in keys}

    return load


# --------------------------------------------------------------------------------------------
# The ARM book's regressions (Gelman & Hill 2006, chs. 3-4), flat priors as in the Stan code


def _improper_flat(name: str, support: constraints.Constraint, shape: tuple[int, ...] = ()):
    """A Stan parameter without a prior: ``dist.ImproperUniform`` on ``support``."""
    return numpyro.sample(name, dist.ImproperUniform(support, (), shape))


def earn_height(earn, height):
    """``earn ~ normal(beta[1] + beta[2] * height, sigma)``, flat priors."""
    beta = _improper_flat("beta", constraints.real, (2,))
    sigma = _improper_flat("sigma", constraints.positive)
    numpyro.sample("earn", dist.Normal(beta[0] + beta[1] * height, sigma), obs=earn)


def log_earnings(design: Callable) -> Callable:
    """``log(earn) ~ normal(design @ beta, sigma)``, flat priors; ``design(height, male)``
    returns the (N, K) design with the intercept column first."""

    def model(earn, height, male):
        x = design(height, male)
        beta = _improper_flat("beta", constraints.real, (x.shape[1],))
        sigma = _improper_flat("sigma", constraints.positive)
        numpyro.sample("log_earn", dist.Normal(x @ beta, sigma), obs=jnp.log(earn))

    return model


def interaction(height, male):
    return jnp.stack([jnp.ones_like(height), height, male, height * male], axis=1)


def interaction_z(height, male):
    z = (height - height.mean()) / height.std(ddof=1)  # Stan's sd() divides by N - 1
    return jnp.stack([jnp.ones_like(z), z, male, z * male], axis=1)


def logheight_male(height, male):
    return jnp.stack([jnp.ones_like(height), jnp.log(height), male], axis=1)


def kid_score(design: Callable, sigma_prior: bool = False) -> Callable:
    """``kid_score ~ normal(design @ beta, sigma)``, flat beta; ``sigma ~ cauchy(0, 2.5)`` on
    ``sigma > 0`` when ``sigma_prior`` (a half-Cauchy), else flat."""

    def model(kid_score, **columns):
        x = design(**columns)
        beta = _improper_flat("beta", constraints.real, (x.shape[1],))
        if sigma_prior:
            sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
        else:
            sigma = _improper_flat("sigma", constraints.positive)
        numpyro.sample("kid_score", dist.Normal(x @ beta, sigma), obs=kid_score)

    return model


def kid_interaction(mom_hs, mom_iq):
    return jnp.stack([jnp.ones_like(mom_hs), mom_hs, mom_iq, mom_hs * mom_iq], axis=1)


def kid_interaction_c(mom_hs, mom_iq):
    hs, iq = mom_hs - mom_hs.mean(), mom_iq - mom_iq.mean()
    return jnp.stack([jnp.ones_like(hs), hs, iq, hs * iq], axis=1)


def kid_mom_work(mom_work):
    dummies = [(mom_work == k).astype(float) for k in (2, 3, 4)]
    return jnp.stack([jnp.ones_like(mom_work, dtype=float), *dummies], axis=1)


#: name: (model, data set, its columns, posteriordb's posterior name)
_ARM = {
    "earn_height": (earn_height, "earnings", ("earn", "height"), "earnings-earn_height"),
    "logearn_interaction": (
        log_earnings(interaction),
        "earnings",
        ("earn", "height", "male"),
        "earnings-logearn_interaction",
    ),
    "logearn_interaction_z": (
        log_earnings(interaction_z),
        "earnings",
        ("earn", "height", "male"),
        "earnings-logearn_interaction_z",
    ),
    "logearn_logheight_male": (
        log_earnings(logheight_male),
        "earnings",
        ("earn", "height", "male"),
        "earnings-logearn_logheight_male",
    ),
    "kidscore_interaction": (
        kid_score(kid_interaction, sigma_prior=True),
        "kidiq",
        ("kid_score", "mom_hs", "mom_iq"),
        "kidiq-kidscore_interaction",
    ),
    "kidscore_interaction_c": (
        kid_score(kid_interaction_c),
        "kidiq_with_mom_work",
        ("kid_score", "mom_hs", "mom_iq"),
        "kidiq_with_mom_work-kidscore_interaction_c",
    ),
    "kidscore_mom_work": (
        kid_score(kid_mom_work),
        "kidiq_with_mom_work",
        ("kid_score", "mom_work"),
        "kidiq_with_mom_work-kidscore_mom_work",
    ),
}


def _arm_model(model: Callable, data: str, keys: tuple[str, ...], posterior: str):
    return BenchmarkModel(
        model, columns(data, keys), ("beta", "sigma"), lambda: posteriordb_moments(posterior)
    )


ARM_REGRESSIONS: dict[str, BenchmarkModel] = {
    name: _arm_model(*spec) for name, spec in _ARM.items()
}
"""The seven earnings and kidiq regressions, with posteriordb's reference moments."""
ARM_POSTERIORS: dict[str, str] = {name: spec[3] for name, spec in _ARM.items()}
"""Their posteriordb names (``<data>-<model>``)."""


# --------------------------------------------------------------------------------------------
# ODE models


def solve_ode(
    rhs: Callable,
    y0: jnp.ndarray,
    ts: jnp.ndarray,
    args,
    *,
    rtol: float,
    atol: float,
    max_steps: int = 4096,
) -> jnp.ndarray:
    """``y(ts)`` of ``dy/dt = rhs(t, y, args)``, ``y(0) = y0``: shape ``(len(ts),) + y0.shape``.

    Dopri5 with a PID step controller (Stan's ``rk45`` is the same pair); NaN where the solve
    did not finish within ``max_steps`` (in all, over every interval of ``ts``)."""
    import diffrax  # the dev extra's; only the ODE models need it

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs),
        diffrax.Dopri5(),
        t0=0.0,
        t1=ts[-1],
        dt0=None,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        throw=False,
    )
    ok = solution.result == diffrax.RESULTS.successful
    return jnp.where(ok, solution.ys, jnp.nan)


def predator_prey(t, z, theta):
    alpha, beta, gamma, delta = theta
    u, v = z[0], z[1]
    return jnp.stack([(alpha - beta * v) * u, (-gamma + delta * u) * v])


def lotka_volterra(ts: jnp.ndarray, y_init: jnp.ndarray, y: jnp.ndarray) -> None:
    r"""posteriordb ``hudson_lynx_hare-lotka_volterra``: Hudson Bay hare (u) and lynx (v) pelts.

    :math:`\dot u = (\alpha - \beta v) u`, :math:`\dot v = (-\gamma + \delta u) v` from
    ``z_init`` at t = 0; :math:`\alpha, \gamma \sim N^+(1, 0.5)`, :math:`\beta, \delta \sim
    N^+(0.05, 0.05)`, ``z_init`` :math:`\sim \mathrm{LogNormal}(\log 10, 1)`, ``sigma``
    :math:`\sim \mathrm{LogNormal}(-1, 1)`; ``y_init`` (2,) and ``y`` (N, 2) are log-normal
    about ``z_init`` and ``z(ts)``; ``ts`` (N,). Stan's rk45 tolerances (1e-5 relative, 1e-3
    absolute) and step limit 500, here over the whole solve (Stan's counts per output
    interval, so this one is stricter)."""
    theta = numpyro.sample(
        "theta",
        dist.TruncatedNormal(
            jnp.array([1.0, 0.05, 1.0, 0.05]), jnp.array([0.5, 0.05, 0.5, 0.05]), low=0.0
        ).to_event(1),
    )
    z_init = numpyro.sample("z_init", dist.LogNormal(jnp.log(10.0), 1.0).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.LogNormal(-1.0, 1.0).expand([2]).to_event(1))
    z = solve_ode(predator_prey, z_init, ts, theta, rtol=1e-5, atol=1e-3, max_steps=500)
    numpyro.sample("y_init", dist.LogNormal(jnp.log(z_init), sigma).to_event(1), obs=y_init)
    numpyro.sample("y", dist.LogNormal(jnp.log(z), sigma).to_event(2), obs=y)


def _one_compartment(t, c, args):
    k_a, k_m, v_m, dose, volume = args
    absorbed = jnp.exp(-k_a * t) * dose * k_a / volume
    return absorbed - (v_m / volume) * c / (k_m + c)


def one_comp_mm_elim_abs(times: jnp.ndarray, C_hat: jnp.ndarray, D, V) -> None:  # noqa: N803
    r"""posteriordb ``one_comp_mm_elim_abs``: one compartment, first-order absorption of a dose
    ``D`` into volume ``V``, Michaelis-Menten elimination.

    :math:`\dot C = e^{-k_a t} D k_a / V - (V_m / V)\, C / (K_m + C)`, :math:`C(0) = 0`;
    :math:`k_a, K_m, V_m, \sigma \sim \mathrm{HalfCauchy}(1)`;
    ``C_hat`` :math:`\sim \mathrm{LogNormal}(\log C(\mathrm{times}), \sigma)`, ``times`` (N,).
    Stan's ``if (t > 0)`` on the dose term differs only at t = 0, a point of measure zero.
    Tolerances 1e-6 relative and absolute (Stan's ``integrate_ode_bdf`` defaults to 1e-10,
    beyond float32), an explicit solver (the system is not stiff where the posterior has its
    mass), at most 4096 steps."""
    k_a = numpyro.sample("k_a", dist.HalfCauchy(1.0))
    k_m = numpyro.sample("K_m", dist.HalfCauchy(1.0))
    v_m = numpyro.sample("V_m", dist.HalfCauchy(1.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))
    c = solve_ode(
        _one_compartment, jnp.zeros(()), times, (k_a, k_m, v_m, D, V), rtol=1e-6, atol=1e-6
    )
    numpyro.sample("C_hat", dist.LogNormal(jnp.log(c), sigma).to_event(1), obs=C_hat)


ODE_MODELS: dict[str, BenchmarkModel] = {
    "lotka_volterra": BenchmarkModel(
        lotka_volterra,
        columns("hudson_lynx_hare", ("ts", "y_init", "y")),
        ("theta", "z_init", "sigma"),
        lambda: posteriordb_moments("hudson_lynx_hare-lotka_volterra"),
        reference_draws=lambda: posteriordb_draws("hudson_lynx_hare-lotka_volterra"),
    ),
    "one_comp_mm_elim_abs": BenchmarkModel(
        one_comp_mm_elim_abs,
        columns("one_comp_mm_elim_abs", ("times", "C_hat", "D", "V")),
        ("k_a", "K_m", "V_m", "sigma"),
        lambda: posteriordb_moments("one_comp_mm_elim_abs-one_comp_mm_elim_abs"),
        reference_draws=lambda: posteriordb_draws("one_comp_mm_elim_abs-one_comp_mm_elim_abs"),
    ),
}
"""The two ODE posteriors, with posteriordb's reference moments and draws (every parameter is
positive, so the benchmarks also compare them on the log scale)."""
