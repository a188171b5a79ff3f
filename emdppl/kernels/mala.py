r"""Preconditioned Metropolis-adjusted Langevin (MALA), in blackjax's module contract.

With step size :math:`\epsilon` (blackjax's convention; :math:`h = 2\epsilon` in the usual
Langevin notation) and inverse mass matrix :math:`M^{-1}`, one step proposes

.. math::  x' = x + \epsilon M^{-1} \nabla \log p(x) + \sqrt{2 \epsilon}\, M^{-1/2} \xi,
           \qquad \xi \sim N(0, I),

that is :math:`q(x' \mid x) = N(x + \epsilon M^{-1} g(x),\, 2 \epsilon M^{-1})` with
:math:`g = \nabla \log p`, and accepts it with probability
:math:`\min\{1, p(x') q(x \mid x') / (p(x) q(x' \mid x))\}`, where

.. math::  -\log q(b \mid a) = \tfrac{1}{4 \epsilon}\, r^\top M r + \mathrm{const},
           \qquad r = b - a - \epsilon M^{-1} g(a).

The chain is invariant for ``p`` for any :math:`\epsilon > 0` and any symmetric positive
definite :math:`M^{-1}`. A diagonal ``inverse_mass_matrix`` (shape ``(d,)``) scales each
coordinate, :math:`M^{-1/2} = \mathrm{diag}(\sqrt{m})`; a dense one (shape ``(d, d)``) uses its
Cholesky factor :math:`L` (:math:`L L^\top = M^{-1}`) for :math:`M^{-1/2}` and
:math:`r^\top M r = \lVert L^{-1} r \rVert^2`. ``d`` is the size of the flattened position. With
``inverse_mass_matrix = ones(d)`` (or ``None``) this is ``blackjax.mala``, draw for draw.

Window adaptation (``blackjax.window_adaptation``) adapts :math:`\epsilon` and :math:`M^{-1}` of
this kernel as it does for HMC, so MALA's step is no longer bound by the smallest posterior
scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm
from blackjax.mcmc.proposal import safe_energy_diff, static_binomial_sampling
from blackjax.util import generate_gaussian_noise
from jax.flatten_util import ravel_pytree

from emdppl.base import PRNGKey, PyTree

__all__ = ["MALAInfo", "MALAState", "as_top_level_api", "build_kernel", "init"]


class MALAState(NamedTuple):
    """State of the chain: the position, its log density and its gradient (cached, so a step
    costs one gradient evaluation)."""

    position: PyTree
    logdensity: jax.Array
    logdensity_grad: PyTree


class MALAInfo(NamedTuple):
    """Diagnostics of one step.

    Attributes
    ----------
    acceptance_rate
        The Metropolis-Hastings acceptance probability of the proposal.
    is_accepted
        Whether the proposal was accepted.
    """

    acceptance_rate: jax.Array
    is_accepted: jax.Array


class _Metric(NamedTuple):
    """``drift(g) = M^{-1} g``, ``noise(xi) = M^{-1/2} xi``, ``norm(r) = r^T M r`` on flat
    vectors of size ``d``."""

    drift: Callable
    noise: Callable
    norm: Callable


def _metric(inverse_mass_matrix: jax.Array) -> _Metric:
    if jnp.ndim(inverse_mass_matrix) == 1:
        scale = jnp.sqrt(inverse_mass_matrix)
        return _Metric(
            drift=lambda g: inverse_mass_matrix * g,
            noise=lambda xi: scale * xi,
            norm=lambda r: jnp.sum(r * r / inverse_mass_matrix),
        )
    if jnp.ndim(inverse_mass_matrix) == 2:
        tril = jnp.linalg.cholesky(inverse_mass_matrix)

        def norm(r):
            whitened = jax.scipy.linalg.solve_triangular(tril, r, lower=True)
            return jnp.sum(whitened * whitened)

        return _Metric(
            drift=lambda g: inverse_mass_matrix @ g, noise=lambda xi: tril @ xi, norm=norm
        )
    raise ValueError(
        "inverse_mass_matrix must have shape (d,) (diagonal) or (d, d) (dense), got shape "
        f"{jnp.shape(inverse_mass_matrix)}."
    )


def init(position: PyTree, logdensity_fn: Callable) -> MALAState:
    """Start a chain at ``position``: evaluate the log density and its gradient there."""
    logdensity, logdensity_grad = jax.value_and_grad(logdensity_fn)(position)
    return MALAState(position, logdensity, logdensity_grad)


def build_kernel() -> Callable:
    """Build the kernel ``kernel(rng_key, state, logdensity_fn, step_size,
    inverse_mass_matrix=None) -> (state, info)``.

    ``step_size`` is a positive scalar :math:`\\epsilon`; ``inverse_mass_matrix`` has shape
    ``(d,)`` or ``(d, d)`` for a position of ``d`` scalars (``None``: the identity).
    """

    def kernel(
        rng_key: PRNGKey,
        state: MALAState,
        logdensity_fn: Callable,
        step_size: float,
        inverse_mass_matrix: jax.Array | None = None,
    ) -> tuple[MALAState, MALAInfo]:
        """One preconditioned MALA step."""
        x, unravel = ravel_pytree(state.position)
        if inverse_mass_matrix is None:
            inverse_mass_matrix = jnp.ones_like(x)
        metric = _metric(inverse_mass_matrix)
        key_proposal, key_accept = jax.random.split(rng_key)

        grad = ravel_pytree(state.logdensity_grad)[0]
        noise = generate_gaussian_noise(key_proposal, x)
        x_new = x + step_size * metric.drift(grad) + jnp.sqrt(2 * step_size) * metric.noise(noise)
        logdensity_new, grad_new = jax.value_and_grad(logdensity_fn)(unravel(x_new))
        proposal = MALAState(unravel(x_new), logdensity_new, grad_new)
        grad_new = ravel_pytree(grad_new)[0]

        def energy(logdensity_to, x_from, x_to, grad_to):
            # -log p(x_to) - log q(x_from | x_to), up to a constant
            residual = x_from - x_to - step_size * metric.drift(grad_to)
            return -logdensity_to + 0.25 * (1.0 / step_size) * metric.norm(residual)

        new_energy = energy(logdensity_new, x, x_new, grad_new)
        prev_energy = energy(state.logdensity, x_new, x, grad)
        log_p_accept = safe_energy_diff(prev_energy, new_energy)
        accepted, (is_accepted, p_accept, _) = static_binomial_sampling(
            key_accept, log_p_accept, state, proposal
        )
        return accepted, MALAInfo(p_accept, is_accepted)

    return kernel


def as_top_level_api(
    logdensity_fn: Callable, step_size: float, inverse_mass_matrix: jax.Array | None = None
) -> SamplingAlgorithm:
    """Preconditioned MALA with a fixed log density, step size and inverse mass matrix.

    Parameters
    ----------
    logdensity_fn
        ``logdensity_fn(position) -> scalar``, the positive log density up to a constant.
    step_size
        :math:`\\epsilon > 0`.
    inverse_mass_matrix
        Shape ``(d,)`` or ``(d, d)``; ``None`` for the identity.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> mala = as_top_level_api(lambda x: -0.5 * x @ x, 0.5, jnp.ones(2))
    >>> state = mala.init(jnp.zeros(2))
    >>> state, info = mala.step(jax.random.key(0), state)
    """
    kernel = build_kernel()

    def init_fn(position: PyTree, rng_key: PRNGKey | None = None) -> MALAState:
        del rng_key
        return init(position, logdensity_fn)

    def step_fn(rng_key: PRNGKey, state: MALAState) -> tuple[MALAState, MALAInfo]:
        return kernel(rng_key, state, logdensity_fn, step_size, inverse_mass_matrix)

    return SamplingAlgorithm(init_fn, step_fn)
