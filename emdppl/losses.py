r"""The losses of distillation: denoising score matching, the M-step surrogate, its weighting.

Shapes: a batch of ``B`` points of dimension ``d`` (data) or ``latent_dim`` (generator input);
noise levels ``sigma`` of shape ``(B,)`` on the VE schedule (:mod:`emdppl.schedule`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["dsm_loss", "generator_loss", "weight_over_sigma"]


def dsm_loss(model: Any, x: jax.Array, sigma: jax.Array, noise: jax.Array) -> jax.Array:
    r"""EDM denoising score matching, :math:`\mathrm{mean}_b\, \lambda(\sigma_b)
    \|D(x_b + \sigma_b n_b, \sigma_b) - x_b\|^2`,
    :math:`\lambda = (\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2`.

    ``model`` has ``denoise(x_t (d,), sigma ()) -> (d,)`` and ``sigma_data`` (a
    :class:`~emdppl.teachers.DiffusionModel`); ``x`` and ``noise`` have shape ``(B, d)``,
    ``sigma`` shape ``(B,)``.
    """
    denoised = jax.vmap(model.denoise)(x + sigma[:, None] * noise, sigma)
    weight = (sigma**2 + model.sigma_data**2) / (sigma * model.sigma_data) ** 2
    return jnp.mean(weight * jnp.sum((denoised - x) ** 2, axis=-1))


def weight_over_sigma(sigma: jax.Array, weighting: str) -> jax.Array:
    r""":math:`w(\sigma)/\sigma` with :math:`w = \sigma^2` (``"sigma2"``) or :math:`\sigma`
    (``"sigma"``), same shape as ``sigma``."""
    return sigma if weighting == "sigma2" else jnp.ones_like(sigma)


def generator_loss(
    generate_fn: Callable,
    theta: Any,
    z: jax.Array,
    eps_tilde: jax.Array,
    sigma: jax.Array,
    weighting: str,
) -> jax.Array:
    r"""The M-step surrogate :math:`L(\theta) = -\mathrm{mean}_b\, \frac{w(\sigma_b)}{\sigma_b}
    \langle \tilde\varepsilon_b, g_\theta(z_b)\rangle` with the E-step samples held fixed
    (``docs/EMD.md`` §5.1): its gradient is the EMD gradient, its value no divergence.

    ``generate_fn(theta, z (latent_dim,)) -> x (d,)``; ``z (B, latent_dim)``,
    ``eps_tilde (B, d)`` (the noise-cancelled E-step residual), ``sigma (B,)``.
    """
    x = jax.vmap(lambda z: generate_fn(theta, z))(jax.lax.stop_gradient(z))
    residual = jax.lax.stop_gradient(eps_tilde)
    return -jnp.mean(weight_over_sigma(sigma, weighting) * jnp.sum(residual * x, axis=-1))
