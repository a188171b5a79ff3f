r"""Unadjusted Langevin algorithm (ULA), in blackjax's module contract.

One step of the Euler-Maruyama discretisation of the overdamped Langevin diffusion,

.. math::  x' = x + h \, \nabla \log p(x) + \sqrt{2 h}\, \xi, \qquad \xi \sim N(0, I),

with no Metropolis correction: the chain is invariant for a distribution that differs from
``p`` by :math:`O(h)` (for :math:`N(0, s^2)` the stationary variance is
:math:`s^2 / (1 - h / 2 s^2)`).
ULA needs only the gradient, so it runs where the log density itself is unknown, as with the
diffusion scores of EM distillation.

The kernel takes a gradient function rather than a log density: ``grad_fn(position) -> grad``
with the structure of ``position``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm
from blackjax.util import generate_gaussian_noise

from emdppl.base import PRNGKey, PyTree

__all__ = ["ULAInfo", "ULAState", "as_top_level_api", "build_kernel", "init"]


class ULAState(NamedTuple):
    """State of the chain: the position alone (no cached gradient, so nothing goes stale)."""

    position: PyTree


class ULAInfo(NamedTuple):
    """Diagnostics of one step.

    Attributes
    ----------
    grad_norm
        Euclidean norm of :math:`\\nabla \\log p(x)` at the pre-step position.
    """

    grad_norm: jax.Array


def _broadcast_step_size(step_size: float | PyTree, position: PyTree) -> PyTree:
    """One step size per leaf of ``position``: a scalar is shared, a matching pytree is
    per block."""
    if jax.tree.structure(step_size) == jax.tree.structure(position):
        return step_size
    return jax.tree.map(lambda _: step_size, position)


def init(position: PyTree) -> ULAState:
    """Start a chain at ``position``."""
    return ULAState(position)


def build_kernel() -> Callable:
    """Build the ULA kernel ``kernel(rng_key, state, grad_fn, step_size) -> (state, info)``."""

    def kernel(
        rng_key: PRNGKey, state: ULAState, grad_fn: Callable, step_size: float | PyTree
    ) -> tuple[ULAState, ULAInfo]:
        """One ULA step; ``step_size`` is a scalar or a pytree of per-block step sizes."""
        grad = grad_fn(state.position)
        noise = generate_gaussian_noise(rng_key, state.position)
        step_sizes = _broadcast_step_size(step_size, state.position)
        position = jax.tree.map(
            lambda x, h, g, n: x + h * g + jnp.sqrt(2.0 * h) * n,
            state.position,
            step_sizes,
            grad,
            noise,
        )
        grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grad)))
        return ULAState(position), ULAInfo(grad_norm)

    return kernel


def as_top_level_api(grad_fn: Callable, step_size: float) -> SamplingAlgorithm:
    """ULA with a fixed gradient function and step size.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> ula = as_top_level_api(lambda x: -x, step_size=0.1)
    >>> state = ula.init(jnp.zeros(2))
    >>> state, info = ula.step(jax.random.key(0), state)
    """
    kernel = build_kernel()

    def init_fn(position: PyTree, rng_key: PRNGKey | None = None) -> ULAState:
        del rng_key
        return init(position)

    def step_fn(rng_key: PRNGKey, state: ULAState) -> tuple[ULAState, ULAInfo]:
        return kernel(rng_key, state, grad_fn, step_size)

    return SamplingAlgorithm(init_fn, step_fn)
