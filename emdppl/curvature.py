r"""Curvature of a log density: its Hessian at a point or averaged over points, and the
marginal sds of the Gaussian it is the precision of.

This module holds :func:`hessian` (exact where JAX differentiates twice, central differences of
the gradient where it cannot, as for a torch or Pyro log density behind a callback or a model
that solves an ODE with diffrax, whose adjoint is a ``custom_vjp``), its mean
over points (:func:`mean_hessian`), and :func:`laplace_marginal_sd`, the sds
:math:`\sqrt{(H^{-1})_{ii}}` of a Gaussian with precision :math:`H`. The Laplace
standardisation of a density teacher and the guide-scale checks of SVI (NumPyro and Pyro
models) are built on them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "MAX_CURVATURE_DIM",
    "NUM_CURVATURE_DRAWS",
    "difference_diagonal",
    "difference_hessian",
    "exact_or_differences",
    "hessian",
    "lacks_forward_mode",
    "laplace_marginal_sd",
    "mean_hessian",
]

#: Largest number of coordinates a post-fit check forms the Hessian for (one gradient pair or
#: Hessian-vector product per coordinate, then an eigendecomposition); larger models are not
#: checked.
MAX_CURVATURE_DIM = 512

#: Number of guide draws the SVI guide-scale checks average the Hessian over.
NUM_CURVATURE_DRAWS = 16


def lacks_forward_mode(error: Exception) -> bool:
    """Whether ``error``, raised while tracing a forward-mode derivative, says the function has
    a gradient but no JVP: a host callback (``ValueError``) or a ``jax.custom_vjp`` function
    such as diffrax's checkpointed ODE adjoint (a ``TypeError`` naming ``custom_vjp``). Any
    other error is the function's own and is raised again."""
    return isinstance(error, ValueError) or (
        isinstance(error, TypeError) and "custom_vjp" in str(error)
    )


def exact_or_differences(exact: Callable[[], jax.Array], differences: Callable[[], jax.Array]):
    """``exact()`` (a forward-over-reverse derivative), or ``differences()`` (its gradient
    differences) when tracing it shows the function has no forward mode
    (:func:`lacks_forward_mode`); any other error is raised."""
    try:
        return exact()
    except (ValueError, TypeError) as error:  # raised while tracing
        if not lacks_forward_mode(error):
            raise
    return differences()


def hessian(loss: Callable, x: jax.Array) -> jax.Array:
    r"""The Hessian ``(d, d)`` of ``loss`` at ``x (d,)``: exact where JAX can differentiate
    ``loss`` twice, otherwise :func:`difference_hessian` of its gradient (a log density
    computed on the host, such as a torch or Pyro model behind a callback, or one that solves
    an ODE through a ``custom_vjp`` adjoint, has a gradient but no forward-mode derivative)."""
    return exact_or_differences(
        lambda: jax.hessian(loss)(x), lambda: difference_hessian(jax.grad(loss), x)
    )


def _difference_steps(x: jax.Array) -> jax.Array:
    return jnp.finfo(x.dtype).eps ** (1 / 3) * jnp.maximum(1.0, jnp.abs(x))


def difference_hessian(grad_fn: Callable, x: jax.Array) -> jax.Array:
    r"""The symmetrised central differences ``(d, d)`` of ``grad_fn`` at ``x (d,)``, steps
    :math:`\epsilon^{1/3}\max(1, |x_i|)`: ``2 d`` gradient evaluations, vectorised."""
    h = _difference_steps(x)
    grad = jax.vmap(grad_fn)
    rows = (grad(x + jnp.diag(h)) - grad(x - jnp.diag(h))) / (2 * h[:, None])
    return 0.5 * (rows + rows.T)


def difference_diagonal(grad_fn: Callable, x: jax.Array) -> jax.Array:
    r"""The diagonal ``(d,)`` of :func:`difference_hessian`, 16 coordinates at a time (``2 d``
    gradient evaluations, memory for 32 of them)."""
    h = _difference_steps(x)

    def curvature(i):
        step = jax.nn.one_hot(i, x.shape[0], dtype=x.dtype) * h[i]
        return (grad_fn(x + step)[i] - grad_fn(x - step)[i]) / (2 * h[i])

    return jax.lax.map(curvature, jnp.arange(x.shape[0]), batch_size=16)


def mean_hessian(loss: Callable, points: jax.Array) -> jax.Array:
    """The mean ``(d, d)`` of :func:`hessian` of ``loss`` over ``points (m, d)``."""
    return jnp.mean(jax.vmap(lambda x: hessian(loss, x))(points), axis=0)


def laplace_marginal_sd(neg_hessian: jax.Array) -> jax.Array:
    r"""Marginal sds ``(d,)`` of the Laplace approximation with precision ``neg_hessian``
    :math:`H = -\nabla^2 \log p` ``(d, d)``: :math:`\sqrt{(H^{-1})_{ii}}`, from the
    eigendecomposition :math:`H = V \Lambda V^T` with the directions of non-positive curvature
    left out (:math:`\sum_{k: \lambda_k > 0} V_{ik}^2 / \lambda_k`), which only makes the sds
    smaller; 0 where no direction is curved."""
    neg_hessian = 0.5 * (neg_hessian + neg_hessian.T)
    eigenvalues, vectors = jnp.linalg.eigh(neg_hessian)
    curved = eigenvalues > 0
    variance = (vectors**2) @ jnp.where(curved, 1 / jnp.where(curved, eigenvalues, 1), 0)
    return jnp.sqrt(variance)
