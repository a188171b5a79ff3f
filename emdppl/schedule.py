r"""The project's noise schedule: variance exploding (VE), in the EDM convention.

Every teacher, student and generator in emdppl uses one convention (Karras et al. 2022, "EDM"):

.. math::  x_\sigma = x + \sigma \varepsilon, \qquad \varepsilon \sim N(0, I), \qquad \alpha = 1,

so the noisy marginal is :math:`p_\sigma = p * N(0, \sigma^2 I)`, the log-SNR is
:math:`\lambda = -2 \log \sigma`, and a *score* is always

.. math::  \mathrm{score}(x_\sigma, \sigma) = \nabla_{x_\sigma} \log p_\sigma(x_\sigma),

related to the denoiser :math:`D(x_\sigma, \sigma) \approx E[x \mid x_\sigma]` by Tweedie's formula
:math:`\mathrm{score} = (D - x_\sigma) / \sigma^2`.

Noise levels live in ``[sigma_min, sigma_max]``: ``0.002 .. 80`` for the teachers' own multi-step
sampler (:func:`karras_sigmas`, :func:`ode_sample`), and a narrower range, drawn log-uniformly
(:func:`sample_log_uniform`) or log-normally (:func:`sample_log_normal`), for training and
distillation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from emdppl.base import PRNGKey

__all__ = [
    "SIGMA_MAX",
    "SIGMA_MIN",
    "edm_scalings",
    "karras_sigmas",
    "num_function_evaluations",
    "ode_sample",
    "sample_log_normal",
    "sample_log_uniform",
]

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0
) -> jax.Array:
    r"""The EDM sampler grid, decreasing, with a final 0 appended.

    .. math::  \sigma_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{N-1}
               (\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}))^\rho,\quad i = 0..N-1.

    Returns an array of shape ``(num_steps + 1,)``; for ``num_steps == 1`` it is ``[sigma_max, 0]``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if num_steps == 1:
        return jnp.array([sigma_max, 0.0])
    ramp = jnp.linspace(0.0, 1.0, num_steps)
    inv = 1.0 / rho
    sigmas = (sigma_max**inv + ramp * (sigma_min**inv - sigma_max**inv)) ** rho
    return jnp.concatenate([sigmas, jnp.zeros(1)])


#: Probability-flow ODE solvers of :func:`ode_sample`.
SOLVERS = ("heun", "ddim")


def num_function_evaluations(num_steps: int, solver: str = "heun") -> int:
    """Denoiser calls of :func:`ode_sample`: ``2 num_steps - 1`` (heun), ``num_steps`` (ddim)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")
    return 2 * num_steps - 1 if solver == "heun" else num_steps


def ode_sample(
    rng_key: PRNGKey,
    denoise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    shape: tuple[int, ...],
    num_steps: int,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    solver: str = "heun",
) -> jax.Array:
    r"""Deterministic sampler of the probability-flow ODE from ``x ~ N(0, sigma_max^2)``.

    Integrates :math:`dx/d\sigma = (x - D(x, \sigma)) / \sigma` on :func:`karras_sigmas`.
    ``"heun"`` is EDM's Algorithm 1 (Karras et al. 2022): Heun's method, Euler on the last step,
    ``NFE = 2 num_steps - 1``. ``"ddim"`` is Euler, which in this (VE) parametrisation is
    deterministic DDIM, :math:`x' = D + (\sigma'/\sigma)(x - D)`, ``NFE = num_steps``, on the
    first ``num_steps`` levels of the ``num_steps + 1``-level grid, the last step jumping from
    the lowest of them to 0 (so that no evaluation is spent at ``sigma_min``, where the
    denoiser is the identity). At very few steps DDIM is the more accurate of the two: Heun's
    correction is evaluated at the end of a step that spans most of the noise range (measured:
    see benchmarks/README.md).

    Parameters
    ----------
    denoise_fn
        ``denoise_fn(x, sigma) -> x_hat`` for one point ``x`` of shape ``(d,)`` and scalar sigma.
    shape
        ``(n, d)``: number of samples and data dimension.

    Returns
    -------
    Samples of shape ``(n, d)``.
    """
    num_function_evaluations(num_steps, solver)  # validates solver
    if solver == "ddim":  # the last step jumps to 0 from the grid's last level above sigma_min
        sigmas = karras_sigmas(num_steps + 1, sigma_min, sigma_max)
        sigmas = jnp.concatenate([sigmas[:num_steps], jnp.zeros(1)])
    else:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max)
    denoise = jax.vmap(denoise_fn, in_axes=(0, None))
    x = sigmas[0] * jax.random.normal(rng_key, shape)

    def step(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        slope = (x - denoise(x, sigma)) / sigma
        euler = x + (sigma_next - sigma) * slope
        if solver == "ddim":
            return euler, None

        def heun(_):
            slope_next = (euler - denoise(euler, sigma_next)) / sigma_next
            return x + (sigma_next - sigma) * 0.5 * (slope + slope_next)

        return jax.lax.cond(sigma_next > 0, heun, lambda _: euler, None), None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
    return x


def edm_scalings(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, ...]:
    r"""EDM preconditioning ``(c_skip, c_out, c_in, c_noise)`` of a denoiser
    :math:`D(x, \sigma) = c_{skip} x + c_{out} F(c_{in} x, c_{noise})`.

    .. math:: c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\;
              c_{out} = \frac{\sigma \sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}},\;
              c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},\; c_{noise} = \tfrac14 \log \sigma.
    """
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1 / jnp.sqrt(total), (
        0.25 * jnp.log(sigma)
    )


def sample_log_uniform(
    rng_key: PRNGKey, shape: tuple[int, ...], sigma_min: float, sigma_max: float
) -> jax.Array:
    r""":math:`\log \sigma \sim U(\log \sigma_{min}, \log \sigma_{max})`, array of ``shape``."""
    u = jax.random.uniform(rng_key, shape)
    return jnp.exp(jnp.log(sigma_min) + u * (jnp.log(sigma_max) - jnp.log(sigma_min)))


def sample_log_normal(
    rng_key: PRNGKey, shape: tuple[int, ...], p_mean: float = -1.2, p_std: float = 1.2
) -> jax.Array:
    r""":math:`\log \sigma \sim N(P_{mean}, P_{std}^2)` (EDM's training default); ``shape``."""
    return jnp.exp(p_mean + p_std * jax.random.normal(rng_key, shape))
