r"""One-step generators :math:`x = g_\theta(z)`, :math:`z \sim N(0, I)`.

A generator is an equinox module mapping one latent ``z`` of shape ``(latent_dim,)`` to one point
of shape ``(data_dim,)``; its parameters :math:`\theta` are its inexact arrays. As a probabilistic
model it is the NumPyro model returned by :func:`numpyro_model`,

.. math::  z \sim N(0, I), \qquad x \sim N(g_\theta(z), \sigma^2 I),

whose network is registered with ``numpyro.contrib.module.eqx_module``; in auxiliary form its
latents are exactly the ``(z, eps)`` that EM distillation samples. Internally the pure map
:math:`g(\theta, z)` is :func:`apply` on ``partition(generator)``.

Builders: :func:`mlp` (from scratch), :func:`affine` (Gaussian; exact diffused marginal, so no
student network is needed), :func:`sinh_arcsinh` (a small normalising flow whose smoothed score
is computed, not learned), :func:`maf` (the same flow followed by a masked autoregressive
affine layer, for posteriors whose conditional scales depend on other coordinates),
:func:`from_teacher` (a trainable copy of the teacher's denoiser at a
fixed noise level, as in the EMD paper).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import eqx_module

from emdppl.base import PRNGKey, PyTree, as_key
from emdppl.teachers import AbstractTeacher, laplace_smoothed_score

__all__ = [
    "AbstractGenerator",
    "AffineGenerator",
    "MAFGenerator",
    "MLPGenerator",
    "TeacherGenerator",
    "affine",
    "apply",
    "from_teacher",
    "maf",
    "mlp",
    "numpyro_model",
    "partition",
    "sinh_arcsinh",
    "SinhArcsinhGenerator",
]


class AbstractGenerator(eqx.Module):
    """``g(z)`` for ``z`` of shape ``(latent_dim,)``, returning shape ``(data_dim,)``.

    Concrete subclasses have static fields ``latent_dim`` and ``data_dim``.
    """

    @abc.abstractmethod
    def __call__(self, z: jax.Array) -> jax.Array:
        """One generated point."""


class MLPGenerator(AbstractGenerator):
    """An MLP generator ``g(z) = shift + MLP(z)``; see :func:`mlp`."""

    net: eqx.nn.MLP
    shift: jax.Array
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.shift + self.net(z)


def mlp(
    data_dim: int,
    latent_dim: int | None = None,
    *,
    key: PRNGKey,
    width: int = 128,
    depth: int = 3,
    shift: Any = None,
) -> MLPGenerator:
    """An MLP generator from scratch (SiLU, ``depth`` hidden layers of ``width`` units).

    Parameters
    ----------
    data_dim
        Output dimension ``d``.
    latent_dim
        Dimension of ``z``; default ``data_dim``.
    key
        PRNG key for the weights.
    shift
        Initial output offset, shape ``(d,)``; default zeros.

    Examples
    --------
    >>> generator = emdppl.generators.mlp(2, key=jax.random.key(0))
    >>> x = jax.vmap(generator)(jax.random.normal(jax.random.key(1), (5, 2)))
    """
    latent_dim = data_dim if latent_dim is None else latent_dim
    _check_dims(data_dim, latent_dim)
    net = eqx.nn.MLP(latent_dim, data_dim, width, depth, activation=jax.nn.silu, key=as_key(key))
    shift = jnp.zeros(data_dim) if shift is None else jnp.asarray(shift, jnp.float32)
    return MLPGenerator(net, shift, latent_dim, data_dim)


class AffineGenerator(AbstractGenerator):
    r"""``g(z) = loc + L z``; its diffused marginal is
    :math:`q_\sigma = N(\mathrm{loc}, L L^T + \sigma^2 I)`, available as
    :meth:`marginal_logdensity`, so EM distillation needs no student network for it."""

    loc: jax.Array
    scale_tril: jax.Array
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.loc + self.scale_tril @ z

    def marginal_logdensity(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\log q_\sigma(x)` for ``x`` of shape ``(d,)``; a scalar."""
        cov = self.scale_tril @ self.scale_tril.T + sigma**2 * jnp.eye(self.data_dim)
        return jax.scipy.stats.multivariate_normal.logpdf(x, self.loc, cov)

    def marginal_score(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\nabla \log q_\sigma(x)`, exact."""
        return jax.grad(self.marginal_logdensity)(x, sigma)


class SinhArcsinhGenerator(AbstractGenerator):
    r"""A normalising flow ``g(z) = loc + L h(z)``: elementwise sinh-arcsinh
    :math:`h_j(z) = \sinh((\operatorname{asinh} z_j + a_j) e^{-b_j})` (skew ``a``, tail weight
    ``b``; identity at ``a = b = 0``) then a lower-triangular ``L`` with positive diagonal.

    Its density :math:`q_0` is exact (change of variables); the diffused marginal's score
    :meth:`marginal_score` uses the same Laplace smoothing as
    :class:`~emdppl.teachers.DensityTeacher`, so at :math:`q_0 = p` teacher and student scores
    agree exactly and the EMD fixed point is unbiased by the approximation. No student network.
    """

    loc: jax.Array
    lower: jax.Array
    log_diag: jax.Array
    skew: jax.Array
    log_tail: jax.Array
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def _scale(self) -> jax.Array:
        return jnp.tril(self.lower, -1) + jnp.diag(jnp.exp(self.log_diag))

    def __call__(self, z: jax.Array) -> jax.Array:
        h = _sinh((_arcsinh(z) + self.skew) * jnp.exp(-self.log_tail))
        return self.loc + self._scale() @ h

    def log_prob(self, x: jax.Array) -> jax.Array:
        r""":math:`\log q_0(x)` for ``x`` of shape ``(d,)``."""
        h = jax.scipy.linalg.solve_triangular(self._scale(), x - self.loc, lower=True)
        u = jnp.arcsinh(h) * jnp.exp(self.log_tail) - self.skew  # asinh(z)
        z = jnp.sinh(u)
        # dh/dz = cosh(u') e^{-b} / sqrt(1 + z^2), u' = asinh(h)
        log_dh = jnp.log(jnp.cosh(jnp.arcsinh(h))) - self.log_tail - 0.5 * jnp.log1p(z**2)
        return jnp.sum(jax.scipy.stats.norm.logpdf(z) - log_dh) - jnp.sum(self.log_diag)

    def marginal_score(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r"""Laplace-smoothed :math:`\nabla\log (q_0 * N(0, \sigma^2 I))(x)`."""
        return laplace_smoothed_score(jax.grad(self.log_prob), x, sigma)


def _arcsinh(z: jax.Array) -> jax.Array:
    """``asinh`` as ``log(z + sqrt(1 + z^2))``, odd by a select (exact derivative at 0).

    XLA's CPU lowering of ``asinh`` and ``sinh`` inside one fusion runs about ten times slower
    than these ``log``/``exp`` forms; the absolute difference is one float32 ulp of ``z``.
    """

    def positive(x: jax.Array) -> jax.Array:
        return jnp.log(x + jnp.sqrt(1 + x * x))

    return jnp.where(z < 0, -positive(-z), positive(z))


def _sinh(u: jax.Array) -> jax.Array:
    """``sinh`` as ``(e^u - e^-u) / 2`` with one ``exp`` (see :func:`_arcsinh`)."""
    w = jnp.exp(u)
    return 0.5 * (w - 1 / w)


def sinh_arcsinh(data_dim: int, *, loc: Any = None, scale: float = 1.0) -> SinhArcsinhGenerator:
    """A :class:`SinhArcsinhGenerator` starting at ``N(loc, scale^2 I)``.

    Examples
    --------
    >>> generator = emdppl.generators.sinh_arcsinh(10)
    """
    _check_dims(data_dim, data_dim)
    loc = jnp.zeros(data_dim) if loc is None else jnp.asarray(loc, jnp.float32)
    if loc.shape != (data_dim,) or not scale > 0:
        raise ValueError(f"loc must have shape ({data_dim},) and scale be > 0.")
    zeros = jnp.zeros(data_dim)
    return SinhArcsinhGenerator(
        loc, jnp.zeros((data_dim, data_dim)), zeros + jnp.log(scale), zeros, zeros, data_dim,
        data_dim,
    )


class MAFGenerator(AbstractGenerator):
    r"""A sinh-arcsinh flow followed by one masked autoregressive affine layer (MAF):

    .. math:: y = \mathrm{base}(z), \qquad x_j = \mu_j(x_{<j}) + e^{\alpha_j(x_{<j})} y_j,

    with :math:`(\mu, \alpha)` a one-hidden-layer MADE network of ``x``. The conditional
    location *and scale* of each coordinate depend on the earlier ones (e.g. the non-centred
    group effects of a hierarchical model on its log scale), which the affine-after-elementwise
    :class:`SinhArcsinhGenerator` cannot express. The density is one MADE pass
    (:math:`\log q_0(x) = \log q_{base}(y) - \sum_j \alpha_j`), sampling ``d`` passes; the
    smoothed score is Laplace-smoothed as for the base flow, so no student network is needed.
    The MADE output layer starts at zero: at initialisation ``g`` is the base flow.
    """

    base: SinhArcsinhGenerator
    w_in: jax.Array
    b_in: jax.Array
    w_out: jax.Array
    b_out: jax.Array
    mask_in: jax.Array  # int32: not a parameter
    mask_out: jax.Array
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def _shift_log_scale(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = jnp.tanh((self.w_in * self.mask_in.astype(x.dtype)) @ x + self.b_in)
        out = (self.w_out * self.mask_out.astype(x.dtype)) @ hidden + self.b_out
        return out[: self.data_dim], out[self.data_dim :]

    def __call__(self, z: jax.Array) -> jax.Array:
        y = self.base(z)

        def fill(_, x):  # after j passes the first j coordinates are exact (triangular)
            shift, log_scale = self._shift_log_scale(x)
            return shift + jnp.exp(log_scale) * y

        return jax.lax.fori_loop(0, self.data_dim, fill, y)

    def log_prob(self, x: jax.Array) -> jax.Array:
        r""":math:`\log q_0(x)` for ``x`` of shape ``(d,)``."""
        shift, log_scale = self._shift_log_scale(x)
        return self.base.log_prob((x - shift) * jnp.exp(-log_scale)) - jnp.sum(log_scale)

    def marginal_score(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        r"""Laplace-smoothed :math:`\nabla\log (q_0 * N(0, \sigma^2 I))(x)`."""
        return laplace_smoothed_score(jax.grad(self.log_prob), x, sigma)


def maf(
    data_dim: int,
    *,
    key: PRNGKey,
    loc: Any = None,
    scale: float = 1.0,
    width: int = 32,
) -> MAFGenerator:
    """A :class:`MAFGenerator` starting at ``N(loc, scale^2 I)`` (MADE with ``width`` hidden
    units, hidden degrees cycling over ``1 .. d-1``).

    Examples
    --------
    >>> generator = emdppl.generators.maf(10, key=jax.random.key(0))
    """
    base = sinh_arcsinh(data_dim, loc=loc, scale=scale)
    degrees_in = jnp.arange(1, data_dim + 1)
    degrees_hidden = jnp.arange(width) % max(data_dim - 1, 1) + 1
    mask_in = (degrees_hidden[:, None] >= degrees_in[None, :]).astype(jnp.int32)
    degrees_out = jnp.concatenate([degrees_in, degrees_in])
    mask_out = (degrees_out[:, None] > degrees_hidden[None, :]).astype(jnp.int32)
    w_in = jax.random.normal(as_key(key), (width, data_dim)) / jnp.sqrt(data_dim)
    return MAFGenerator(
        base, w_in, jnp.zeros(width), jnp.zeros((2 * data_dim, width)),
        jnp.zeros(2 * data_dim), mask_in, mask_out, data_dim, data_dim,
    )


def affine(data_dim: int, *, loc: Any = None, scale: Any = 1.0) -> AffineGenerator:
    """An affine (Gaussian) generator with ``loc`` (default zeros) and ``L = scale * I``
    (``scale`` a scalar, a ``(d,)`` vector or a ``(d, d)`` matrix).

    Examples
    --------
    >>> generator = emdppl.generators.affine(2, loc=jnp.array([1.0, -1.0]), scale=0.5)
    """
    _check_dims(data_dim, data_dim)
    loc = jnp.zeros(data_dim) if loc is None else jnp.asarray(loc, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    scale_tril = scale if scale.ndim == 2 else jnp.eye(data_dim) * scale
    if loc.shape != (data_dim,) or scale_tril.shape != (data_dim, data_dim):
        raise ValueError(
            f"loc must have shape ({data_dim},) and scale be a scalar, ({data_dim},) or "
            f"({data_dim}, {data_dim}); got {loc.shape} and {scale.shape}."
        )
    return AffineGenerator(loc, scale_tril, data_dim, data_dim)


class TeacherGenerator(AbstractGenerator):
    r"""``g(z) = D_copy(c z_{:d}, sigma_init) + r(z)``: a trainable copy of the teacher's denoiser
    fed the first ``d`` latent coordinates as its noisy input at level ``sigma_init`` (``c``
    matches the scale of :math:`x_{\sigma_{init}}`), plus a residual MLP ``r`` of the whole latent
    ``z (latent_dim,)``, ``latent_dim >= d``, initialised to zero."""

    teacher: AbstractTeacher
    residual: eqx.nn.MLP
    sigma_init: float = eqx.field(static=True)
    input_scale: float = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)

    def __call__(self, z: jax.Array) -> jax.Array:
        x_in = self.input_scale * z[: self.data_dim]
        return self.teacher.denoise(x_in, jnp.asarray(self.sigma_init)) + self.residual(z)


def from_teacher(
    teacher: AbstractTeacher,
    *,
    key: PRNGKey,
    sigma_init: float | None = None,
    input_scale: float | None = None,
    width: int = 128,
    depth: int = 2,
    latent_dim: int | None = None,
) -> TeacherGenerator:
    r"""Initialise a generator from the teacher (EMD paper, §1.2 of ``docs/EMD.md``).

    Parameters
    ----------
    teacher
        Its denoiser is copied (all its arrays become generator parameters).
    key
        PRNG key for the residual MLP.
    sigma_init
        Input noise level :math:`\sigma^*`; default ``teacher.sigma_data / 4`` (sharp enough
        that :math:`D(\cdot, \sigma^*)` maps the latent onto the data's modes).
    input_scale
        ``c``; default :math:`\sqrt{\sigma_{data}^2 + \sigma^{*2}}`, the scale of
        :math:`x_{\sigma^*}`.
    width, depth
        Residual MLP size; its last layer starts at zero, so ``g = D(c z, sigma_init)`` at init.
    latent_dim
        Dimension of ``z`` (default the data's ``d``). Wider latents (``latent_dim > d``) feed the
        extra coordinates to the residual MLP only: the generator starts as with ``d``, and can
        use them to cut space between modes without stretching it.

    Examples
    --------
    >>> generator = emdppl.generators.from_teacher(teacher, key=jax.random.key(0))  # doctest: +SKIP
    """
    sigma_init = teacher.sigma_data / 4 if sigma_init is None else float(sigma_init)
    if not sigma_init > 0:
        raise ValueError(f"sigma_init must be > 0, got {sigma_init}.")
    d = teacher.data_dim
    latent_dim = d if latent_dim is None else latent_dim
    _check_dims(d, latent_dim)
    if latent_dim < d:
        raise ValueError(f"latent_dim must be >= the data dimension {d}, got {latent_dim}.")
    residual = eqx.nn.MLP(latent_dim, d, width, depth, activation=jax.nn.silu, key=as_key(key))
    last = residual.layers[-1]
    residual = eqx.tree_at(
        lambda m: (m.layers[-1].weight, m.layers[-1].bias),
        residual,
        (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
    )
    if input_scale is None:
        input_scale = (teacher.sigma_data**2 + sigma_init**2) ** 0.5
    input_scale = float(input_scale)
    return TeacherGenerator(teacher, residual, sigma_init, input_scale, latent_dim, d)


def partition(generator: AbstractGenerator) -> tuple[PyTree, PyTree]:
    r"""Split into trainable parameters :math:`\theta` (inexact arrays) and the static rest."""
    return eqx.partition(generator, eqx.is_inexact_array)


def apply(theta: PyTree, static: PyTree, z: jax.Array) -> jax.Array:
    r"""The pure map :math:`g(\theta, z)` for one latent ``z`` of shape ``(latent_dim,)``."""
    return eqx.combine(theta, static)(z)


def numpyro_model(generator: AbstractGenerator, sigma: float) -> Callable:
    r"""The generator as a NumPyro model: ``z ~ N(0, I)``, ``x ~ N(g(z), sigma^2 I)``.

    The returned ``model(num_samples=1, x=None)`` registers the network with ``eqx_module`` under
    the name ``"generator"`` (so SVI or MCMC on ``theta`` see it as ``numpyro.param``s).

    Examples
    --------
    >>> model = emdppl.generators.numpyro_model(generator, sigma=0.1)  # doctest: +SKIP
    >>> numpyro.infer.Predictive(model, num_samples=1)(jax.random.key(0), num_samples=100)
    ... # doctest: +SKIP
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")

    def model(num_samples: int = 1, x: jax.Array | None = None) -> None:
        net = eqx_module("generator", generator)
        with numpyro.plate("samples", num_samples):
            z = numpyro.sample(
                "z", dist.Normal(jnp.zeros(generator.latent_dim), 1.0).to_event(1)
            )
            numpyro.sample("x", dist.Normal(jax.vmap(net)(z), sigma).to_event(1), obs=x)

    return model


def _check_dims(data_dim: int, latent_dim: int) -> None:
    for name, value in (("data_dim", data_dim), ("latent_dim", latent_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
