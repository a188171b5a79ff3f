r"""Where chains start: an optimisation-based start on any log density, chain by chain.

:func:`optimize_positions` runs L-BFGS with a zoom line search (``optax.lbfgs``) on
:math:`-\log p` in unconstrained space from each chain's own initial point (vmapped over
chains), records the path :math:`x_c^{(0)}, \dots, x_c^{(K)}` and starts the chain at its first
point that is as probable as a typical draw:

.. math::  x_c^{\rm start} = x_c^{(k^*)}, \qquad
           k^* = \min\{k : \log p(x_c^{(k)}) \ge \max_j \log p(x_c^{(j)}) - d/2\},

over points where :math:`\log p` and its gradient are finite, with :math:`d` the number of
scalars of a position. For a :math:`d`-dimensional Gaussian :math:`\log p` at a typical draw is
:math:`d/2` below its maximum, so each chain starts in the typical set, where it first got there
from its own direction, not at the mode: the chains start apart, and chains optimised from
different basins of a multimodal target stay in them, so :math:`\hat R` can still see the modes.
A chain whose path never improves on its initial point keeps it.

Starting in the typical set matters to the kernels whose warm-up cannot cross orders of
magnitude of log density (MALA, Barker, MCLMC): from a uniform draw on ``[-2, 2]`` a badly
scaled regression has gradients of order :math:`10^9` and their adapted step collapses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from emdppl.base import PyTree

__all__ = ["MAX_STALLED", "OptimizeInfo", "optimize_positions"]

#: L-BFGS stops after this many iterations without a relative gain of 1e-6 in log density
#: (the round-off level of float32).
MAX_STALLED = 5


class OptimizeInfo(NamedTuple):
    r"""Per-chain record of the optimisation, each of shape ``(num_chains,)``.

    Attributes
    ----------
    initial_logdensity
        :math:`\log p` at the initial point (``-inf`` where it or its gradient is not finite).
    final_logdensity
        :math:`\log p` at the returned start.
    max_logdensity
        The highest :math:`\log p` on the path.
    num_steps
        L-BFGS iterations run.
    """

    initial_logdensity: jax.Array
    final_logdensity: jax.Array
    max_logdensity: jax.Array
    num_steps: jax.Array


def _finite_value(logdensity_fn: Callable, x: PyTree) -> tuple[jax.Array, jax.Array]:
    """``(log p, |grad|)`` at ``x``, with ``log p = -inf`` where it or its gradient is not
    finite."""
    value, grad = jax.value_and_grad(logdensity_fn)(x)
    grad = ravel_pytree(grad)[0]
    is_finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
    return jnp.where(is_finite, value, -jnp.inf), jnp.linalg.norm(grad)


def _optimize_one(
    logdensity_fn: Callable, position: PyTree, num_steps: int, tolerance: float
) -> tuple[PyTree, OptimizeInfo]:
    """L-BFGS on ``-logdensity_fn`` from one ``position`` (no chain axis), and the start the
    module docstring describes."""
    position = jax.tree.map(jnp.asarray, position)
    flat, unravel = ravel_pytree(position)

    def loss(x):
        return -logdensity_fn(x)

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)
    initial_value, _ = _finite_value(logdensity_fn, position)
    path = jnp.zeros((num_steps + 1, flat.shape[0]), flat.dtype).at[0].set(flat)
    values = jnp.full((num_steps + 1,), -jnp.inf, initial_value.dtype).at[0].set(initial_value)

    def cond(carry):
        i, _, _, _, _, best, num_stalled, is_done = carry
        return (i < num_steps) & ~is_done & (num_stalled < MAX_STALLED)

    def body(carry):
        i, x, state, path, values, best, num_stalled, _ = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = optimizer.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        x = optax.apply_updates(x, updates)
        new_value, grad_norm = _finite_value(logdensity_fn, x)
        path = path.at[i + 1].set(ravel_pytree(x)[0])
        values = values.at[i + 1].set(new_value)
        gain = new_value - best
        num_stalled = jnp.where(gain > 1e-6 * (1.0 + jnp.abs(best)), 0, num_stalled + 1)
        best = jnp.maximum(best, new_value)
        # A non-finite step ends the path (L-BFGS cannot recover from it); so does a
        # vanishing gradient.
        is_done = ~jnp.isfinite(new_value) | (grad_norm < tolerance)
        return i + 1, x, state, path, values, best, num_stalled, is_done

    carry = (
        jnp.zeros((), jnp.int32),
        position,
        optimizer.init(position),
        path,
        values,
        initial_value,
        jnp.zeros((), jnp.int32),
        ~jnp.isfinite(initial_value),
    )
    num_run, _, _, path, values, best, _, _ = jax.lax.while_loop(cond, body, carry)
    is_typical = values >= best - 0.5 * flat.shape[0]
    first = jnp.argmax(is_typical)  # index 0 when the initial point is typical or all fail
    info = OptimizeInfo(initial_value, values[first], best, num_run)
    return unravel(path[first]), info


@eqx.filter_jit
def optimize_positions(
    logdensity_fn: Callable, positions: PyTree, num_steps: int = 200, tolerance: float = 1e-3
) -> tuple[PyTree, OptimizeInfo]:
    r"""Start every chain in the typical set, on its own L-BFGS path towards a mode.

    Parameters
    ----------
    logdensity_fn
        ``logdensity_fn(position) -> scalar``: the positive log density on unconstrained space
        of one position (no chain axis).
    positions
        Initial points, a pytree whose leaves have a leading ``(num_chains,)`` axis.
    num_steps
        At most this many L-BFGS iterations per chain (each with a zoom line search).
    tolerance
        A path ends once :math:`\lVert \nabla \log p \rVert` falls below it.

    Returns
    -------
    positions
        Same structure and shapes as ``positions``: per chain, the first point of its path
        whose finite :math:`\log p` is within :math:`d/2` of the path's best (the initial point
        when it already is, or when nothing on the path is finite).
    info
        :class:`OptimizeInfo`.

    Examples
    --------
    >>> x0 = jnp.array([[30.0, -40.0], [-20.0, 10.0]])  # 2 chains in 2-D
    >>> x, info = optimize_positions(lambda x: -0.5 * x @ x, x0)
    >>> bool(jnp.all(info.final_logdensity >= info.max_logdensity - 1.0))
    True
    """
    return jax.vmap(lambda x: _optimize_one(logdensity_fn, x, num_steps, tolerance))(positions)
