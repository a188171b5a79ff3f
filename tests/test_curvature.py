"""emdppl.curvature: the Hessian with and without a second JAX derivative, its mean over
points, and the marginal sds of the Gaussian with that precision."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emdppl import curvature
from emdppl.samplers import hessian_diagonal


def _host_loss(precision: np.ndarray):
    """0.5 x^T P x + sum(x^4) / 4 computed in numpy behind a custom VJP (no JVP rule), as a
    torch or Pyro log density reaches JAX."""

    def host(x):
        x = np.asarray(x, np.float64)
        value = 0.5 * x @ precision @ x + (x**4).sum() / 4
        return np.float32(value), (precision @ x + x**3).astype(np.float32)

    @jax.custom_vjp
    def loss(x):
        return jax.pure_callback(lambda v: host(v)[0], jax.ShapeDtypeStruct((), x.dtype), x)

    def fwd(x):
        shapes = (jax.ShapeDtypeStruct((), x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
        value, grad = jax.pure_callback(host, shapes, x, vmap_method="sequential")
        return value, grad

    loss.defvjp(fwd, lambda grad, g: (g * grad,))
    return loss


def test_hessian_exact_and_by_gradient_differences_agree():
    precision = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    points = jnp.array([[0.1, -0.2, 0.3], [1.0, 0.5, -2.0]])

    def exact(x):
        return 0.5 * x @ jnp.asarray(precision, x.dtype) @ x + (x**4).sum() / 4

    for x in points:
        truth = precision + np.diag(3 * np.asarray(x) ** 2)
        np.testing.assert_allclose(curvature.hessian(exact, x), truth, rtol=1e-5, atol=1e-5)
        # central differences in float32: error O(h^2) + O(eps / h), h = eps^(1/3) max(1, |x|)
        np.testing.assert_allclose(
            curvature.hessian(_host_loss(precision), x), truth, rtol=2e-3, atol=2e-3
        )
    mean = curvature.mean_hessian(_host_loss(precision), points)
    truth = precision + np.diag(3 * np.asarray(points**2).mean(0))
    np.testing.assert_allclose(mean, truth, rtol=2e-3, atol=2e-3)


def test_laplace_marginal_sd():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 4))
    precision = a @ a.T + 0.5 * np.eye(4)
    np.testing.assert_allclose(
        curvature.laplace_marginal_sd(jnp.asarray(precision)),
        np.sqrt(np.diag(np.linalg.inv(precision))),
        rtol=1e-4,
    )
    # a direction of negative curvature is left out: the sds are those of the curved part
    vectors = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    indefinite = vectors @ np.diag([2.0, 0.5, -1.0]) @ vectors.T
    kept = vectors[:, :2] ** 2 @ np.array([1 / 2.0, 1 / 0.5])
    np.testing.assert_allclose(
        curvature.laplace_marginal_sd(jnp.asarray(indefinite)), np.sqrt(kept), rtol=1e-4
    )


def _custom_vjp_loss(precision: np.ndarray):
    """The same loss in JAX behind ``jax.custom_vjp``, as diffrax's checkpointed ODE adjoint
    is: a gradient, but forward mode raises TypeError, not the callback's ValueError."""

    @jax.custom_vjp
    def loss(x):
        return 0.5 * x @ jnp.asarray(precision, x.dtype) @ x + (x**4).sum() / 4

    def fwd(x):
        return loss(x), jnp.asarray(precision, x.dtype) @ x + x**3

    loss.defvjp(fwd, lambda grad, g: (g * grad,))
    return loss


def test_hessian_of_a_custom_vjp_function_falls_back_to_gradient_differences():
    precision = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
    loss = _custom_vjp_loss(precision)
    x = jnp.array([1.0, 0.5, -2.0])
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.hessian(loss)(x)
    truth = precision + np.diag(3 * np.asarray(x) ** 2)
    # the same float32 difference error as above
    np.testing.assert_allclose(curvature.hessian(loss, x), truth, rtol=2e-3, atol=2e-3)
    diagonal = hessian_diagonal(lambda v: -loss(v), x)
    np.testing.assert_allclose(diagonal, -np.diag(truth), rtol=2e-3, atol=2e-3)


def test_an_error_of_the_function_itself_is_not_taken_for_a_missing_jvp():
    """A TypeError that does not name custom_vjp (here a shape error) is raised, not replaced
    by gradient differences."""

    def broken(x):
        return jnp.sum(x @ jnp.ones((5, 5)))

    with pytest.raises(TypeError, match="dot_general"):
        curvature.hessian(broken, jnp.ones(3))
