r"""Teachers: anything that gives the diffused score on the project's noise schedule.

A teacher is an :class:`AbstractTeacher`, an equinox module with

.. math::  \mathrm{score}(x_\sigma, \sigma) = \nabla_{x_\sigma} \log p_\sigma(x_\sigma),
           \qquad p_\sigma = p * N(0, \sigma^2 I)

(VE/EDM convention, see :mod:`emdppl.schedule`) for one point ``x_t`` of shape ``(d,)`` —
``vmap`` outside — and the denoiser :math:`D = x_\sigma + \sigma^2\,\mathrm{score}`.

- :class:`GaussianMixture`: exact score at every sigma, exact draws, exact ``log_prob``.
- :class:`DiffusionModel` (from :func:`train_diffusion`): an EDM-preconditioned denoiser network
  trained by denoising score matching; its own sampler is EDM's Heun solver (or DDIM).
- :class:`DensityTeacher` (from :func:`from_model`): an unnormalised posterior density on the
  unconstrained auxiliary space.

Wrapping your own denoiser network ``net(x_in, c_noise) -> F`` (EDM's raw network) takes two lines::

    teacher = emdppl.teachers.DiffusionModel(net, sigma_data=0.5, data_dim=2)
    x = teacher.sample(jax.random.key(0), 1000, num_steps=18)
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from emdppl import schedule
from emdppl.base import Algorithm, PRNGKey, as_key
from emdppl.curvature import hessian
from emdppl.driver import run
from emdppl.losses import dsm_loss

__all__ = [
    "AbstractTeacher",
    "DensityTeacher",
    "DiffusionModel",
    "GaussianMixture",
    "EDMNetwork",
    "NUM_LAPLACE_STARTS",
    "density_teacher",
    "from_model",
    "laplace_smoothed_score",
    "train_diffusion",
]


#: ``DensityTeacher.smoothing`` values.
SMOOTHINGS = ("laplace", "none")


class AbstractTeacher(eqx.Module):
    """A diffused score ``score(x_t, sigma)`` on the VE schedule.

    Attributes
    ----------
    data_dim
        Dimension ``d`` of ``x``.
    sigma_data
        Typical scale of the data (EDM's ``sigma_data``), used for preconditioning and defaults.
    sigma_min, sigma_max
        Range of noise levels where the score is trusted.
    """

    # Concrete subclasses define these four as (static) fields; declaring them here as
    # abstract variables would fix their position in every subclass's constructor.

    @abc.abstractmethod
    def score(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\nabla \log p_\sigma(x_t)` for ``x_t`` of shape ``(d,)`` and scalar ``sigma``."""

    def denoise(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        r"""Tweedie's denoiser :math:`E[x \mid x_t] = x_t + \sigma^2 \mathrm{score}(x_t,\sigma)`."""
        return x_t + sigma**2 * self.score(x_t, sigma)

    def sample_ode(
        self, rng_key: PRNGKey, n: int, *, num_steps: int = 18, solver: str = "heun"
    ) -> jax.Array:
        """The teacher's multi-step sampler on :meth:`denoise`: the probability-flow ODE by EDM
        Heun (``NFE = 2 num_steps - 1``) or DDIM (``NFE = num_steps``), see
        :func:`emdppl.schedule.ode_sample`.

        Returns draws of shape ``(n, d)``.
        """
        return _ode_sample(self, as_key(rng_key), n, num_steps, solver)


@eqx.filter_jit
def _ode_sample(
    teacher: AbstractTeacher, rng_key: PRNGKey, n: int, num_steps: int, solver: str
) -> jax.Array:
    return schedule.ode_sample(
        rng_key,
        teacher.denoise,
        (n, teacher.data_dim),
        num_steps,
        sigma_min=max(teacher.sigma_min, schedule.SIGMA_MIN),
        solver=solver,
        sigma_max=teacher.sigma_max,
    )


class GaussianMixture(AbstractTeacher):
    r"""Gaussian mixture :math:`p = \sum_k w_k N(\mu_k, \mathrm{diag}(s_k^2))`, exact at all sigma.

    :math:`p_\sigma = \sum_k w_k N(\mu_k, \mathrm{diag}(s_k^2 + \sigma^2))`, so score, denoiser and
    ``log_prob`` are closed form. Parameters are stored as ``locs``, ``log_scales``,
    ``log_weights`` (unconstrained, so a trainable copy of the teacher stays valid).

    Parameters
    ----------
    locs
        Component means, shape ``(K, d)``.
    scales
        Component standard deviations, shape ``(K,)`` (isotropic) or ``(K, d)``.
    weights
        Mixture weights, shape ``(K,)``, positive; normalised here.

    Examples
    --------
    >>> angles = jnp.linspace(0, 2 * jnp.pi, 8, endpoint=False)
    >>> locs = 4 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    >>> teacher = GaussianMixture(locs, jnp.full(8, 0.2), jnp.full(8, 1 / 8))
    >>> x = teacher.sample(jax.random.key(0), 1000)
    """

    locs: jax.Array
    log_scales: jax.Array
    log_weights: jax.Array
    data_dim: int = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True)
    sigma_min: float = eqx.field(static=True, default=0.0)
    sigma_max: float = eqx.field(static=True, default=schedule.SIGMA_MAX)

    def __init__(self, locs: Any, scales: Any, weights: Any):
        locs = jnp.asarray(locs, jnp.float32)
        scales = jnp.asarray(scales, jnp.float32)
        weights = jnp.asarray(weights, jnp.float32)
        if locs.ndim != 2:
            raise ValueError(f"locs must have shape (K, d), got {locs.shape}.")
        num_components, data_dim = locs.shape
        if scales.shape == (num_components,):
            scales = jnp.broadcast_to(scales[:, None], locs.shape)
        if scales.shape != locs.shape:
            raise ValueError(
                f"scales must have shape (K,) or (K, d) = ({num_components},) or {locs.shape}, "
                f"got {scales.shape}."
            )
        if weights.shape != (num_components,):
            raise ValueError(
                f"weights must have shape (K,) = ({num_components},), got {weights.shape}."
            )
        if not (bool(jnp.all(scales > 0)) and bool(jnp.all(weights > 0))):
            raise ValueError("scales and weights must be positive; drop zero-weight components.")
        weights = weights / jnp.sum(weights)
        mean = weights @ locs
        var = weights @ (scales**2 + (locs - mean) ** 2)
        self.locs = locs
        self.log_scales = jnp.log(scales)
        self.log_weights = jnp.log(weights)
        self.data_dim = int(data_dim)
        self.sigma_data = float(np.sqrt(np.mean(np.asarray(var))))

    @property
    def weights(self) -> jax.Array:
        """Normalised mixture weights, shape ``(K,)``."""
        return jax.nn.softmax(self.log_weights)

    @property
    def scales(self) -> jax.Array:
        """Component standard deviations, shape ``(K, d)``."""
        return jnp.exp(self.log_scales)

    def _component_log_probs(self, x: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
        var = jnp.exp(2 * self.log_scales) + sigma**2
        log_w = jax.nn.log_softmax(self.log_weights)
        lp = log_w - 0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + (x - self.locs) ** 2 / var, axis=-1)
        return lp, var

    def log_prob(self, x: jax.Array, sigma: jax.Array | float = 0.0) -> jax.Array:
        r""":math:`\log p_\sigma(x)` for ``x`` of shape ``(d,)``; a scalar."""
        lp, _ = self._component_log_probs(x, sigma)
        return jax.scipy.special.logsumexp(lp)

    def score(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\sum_k r_k(x)\,(\mu_k - x)/(s_k^2 + \sigma^2)`, ``r`` the responsibilities."""
        lp, var = self._component_log_probs(x_t, sigma)
        resp = jax.nn.softmax(lp)
        return resp @ ((self.locs - x_t) / var)

    def sample(self, rng_key: PRNGKey, n: int) -> jax.Array:
        """Exact draws of shape ``(n, d)`` from :math:`p = p_0`."""
        comp_key, noise_key = jax.random.split(as_key(rng_key))
        k = jax.random.categorical(comp_key, self.log_weights, shape=(n,))
        noise = jax.random.normal(noise_key, (n, self.data_dim))
        return self.locs[k] + self.scales[k] * noise


class EDMNetwork(eqx.Module):
    """Default raw network ``F(x_in, c_noise)`` of an EDM denoiser: an MLP on ``x_in`` and
    Fourier features of ``c_noise``.

    Parameters
    ----------
    data_dim
        ``d``; input and output shape ``(d,)``.
    key
        PRNG key for the initial weights.
    width, depth
        Hidden width and number of hidden layers.
    """

    mlp: eqx.nn.MLP
    frequencies: jax.Array

    def __init__(self, data_dim: int, *, key: PRNGKey, width: int = 128, depth: int = 3):
        self.frequencies = jnp.arange(1, 9, dtype=jnp.float32)
        self.mlp = eqx.nn.MLP(
            data_dim + 17, data_dim, width, depth, activation=jax.nn.silu, key=as_key(key)
        )

    def __call__(self, x_in: jax.Array, c_noise: jax.Array) -> jax.Array:
        angles = jax.lax.stop_gradient(self.frequencies) * c_noise
        features = jnp.concatenate([x_in, c_noise[None], jnp.sin(angles), jnp.cos(angles)])
        return self.mlp(features)


class DiffusionModel(AbstractTeacher):
    r"""EDM-preconditioned denoiser :math:`D = c_{skip} x + c_{out} F(c_{in} x, c_{noise})`.

    Used as a trained teacher (:func:`train_diffusion`) and as the student score of EM
    distillation. ``score = (D - x) / sigma**2``.

    Parameters
    ----------
    network
        ``network(x_in, c_noise) -> F`` with ``x_in`` of shape ``(d,)`` and scalar ``c_noise``.
    sigma_data
        Data scale of the preconditioning.
    data_dim
        ``d``.
    """

    network: Callable
    sigma_data: float = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)
    sigma_min: float = eqx.field(static=True, default=schedule.SIGMA_MIN)
    sigma_max: float = eqx.field(static=True, default=schedule.SIGMA_MAX)

    def denoise(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        c_skip, c_out, c_in, c_noise = schedule.edm_scalings(sigma, self.sigma_data)
        return c_skip * x_t + c_out * self.network(c_in * x_t, c_noise)

    def score(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        return (self.denoise(x_t, sigma) - x_t) / sigma**2

    def sample(
        self, rng_key: PRNGKey, n: int, *, num_steps: int = 18, solver: str = "heun"
    ) -> jax.Array:
        """The multi-step sampler :meth:`sample_ode` (EDM Heun by default, or ``"ddim"``);
        draws of shape ``(n, d)``."""
        return self.sample_ode(rng_key, n, num_steps=num_steps, solver=solver)


def sample_training_sigma(rng_key: PRNGKey, shape: tuple[int, ...], sigma_data: float) -> jax.Array:
    """EDM's log-normal training noise, shifted to data scale ``sigma_data`` (EDM uses 0.5)."""
    return schedule.sample_log_normal(rng_key, shape, p_mean=-1.2 + np.log(sigma_data / 0.5))


class _DSMStep(eqx.Module):
    """Teacher training as an :class:`~emdppl.base.Algorithm`: state ``(params, opt_state)``."""

    static: Any
    data: jax.Array
    optimizer: optax.GradientTransformation
    batch_size: int = eqx.field(static=True)

    def init(self, params: Any, rng_key: PRNGKey | None = None) -> tuple:
        """``(params, optimizer state)``; the key is unused (initialisation is deterministic)."""
        return params, self.optimizer.init(params)

    def step(self, rng_key: PRNGKey, state: tuple) -> tuple[tuple, jax.Array]:
        params, opt_state = state
        k_idx, k_sigma, k_noise = jax.random.split(rng_key, 3)
        x = self.data[jax.random.randint(k_idx, (self.batch_size,), 0, self.data.shape[0])]
        model = eqx.combine(params, self.static)
        sigma = sample_training_sigma(k_sigma, (self.batch_size,), model.sigma_data)
        noise = jax.random.normal(k_noise, x.shape)

        def loss_fn(p):
            return dsm_loss(eqx.combine(p, self.static), x, sigma, noise)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss


def train_diffusion(
    data: Any,
    *,
    rng_key: int | PRNGKey,
    num_steps: int = 5000,
    network: Callable | None = None,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    progress_bar: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> DiffusionModel:
    r"""Train a diffusion teacher on ``data`` by EDM denoising score matching.

    Parameters
    ----------
    data
        Training points, shape ``(n, d)``.
    rng_key
        Seed or key (network initialisation, minibatches, noise).
    num_steps
        Adam steps (cosine-decayed learning rate).
    network
        Raw network ``F(x_in, c_noise)``; default :class:`EDMNetwork`.
    batch_size, learning_rate
        Minibatch size and peak learning rate.
    progress_bar
        Show a tqdm bar.
    checkpoint_dir
        Checkpoint after every chunk and resume from it (:func:`emdppl.run`).

    Returns
    -------
    DiffusionModel
        The teacher; ``teacher.sample(rng_key, n, num_steps=18)`` runs EDM's Heun sampler
        (``solver="ddim"``: DDIM).

    Examples
    --------
    >>> mixture = emdppl.teachers.GaussianMixture(locs, scales, weights)  # doctest: +SKIP
    >>> data = mixture.sample(jax.random.key(0), 10_000)  # doctest: +SKIP
    >>> teacher = emdppl.teachers.train_diffusion(data, rng_key=0)  # doctest: +SKIP
    """
    data = jnp.asarray(data, jnp.float32)
    if data.ndim != 2 or data.shape[0] < 2:
        raise ValueError(f"data must have shape (n, d) with n >= 2, got {data.shape}.")
    if not bool(jnp.all(jnp.isfinite(data))):
        raise ValueError("data contains NaN or inf; drop those rows first.")
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps={num_steps} and batch_size={batch_size} must be >= 1.")
    init_key, run_key = jax.random.split(as_key(rng_key))
    data_dim = data.shape[1]
    if network is None:
        network = EDMNetwork(data_dim, key=init_key)
    model = DiffusionModel(network, float(jnp.std(data)), data_dim)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05))
    stepper = _DSMStep(static, data, optimizer, batch_size)
    algorithm = Algorithm(init=stepper.init, step=stepper.step)
    (params, _), _ = run(
        run_key,
        algorithm,
        num_steps,
        algorithm.init(params, init_key),
        progress_bar=progress_bar,
        desc="training teacher",
        checkpoint_dir=checkpoint_dir,
    )
    return eqx.combine(params, static)


class DensityTeacher(AbstractTeacher):
    r"""An unnormalised density :math:`p` (a posterior on the unconstrained auxiliary space).

    The smoothed score :math:`\nabla\log p_\sigma`, :math:`p_\sigma = p * N(0,\sigma^2 I)`, is
    approximated by **Laplace smoothing**: with :math:`y^*` the mode of
    :math:`p(y)\,N(x_t; y, \sigma^2 I)`, i.e. the fixed point of
    :math:`y = x_t + \sigma^2 \nabla\log p(y)`, Tweedie's formula gives
    :math:`\nabla\log p_\sigma(x_t) \approx (y^* - x_t)/\sigma^2 = \nabla\log p(y^*)`.
    This is exact as :math:`\sigma \to 0` and exact at every :math:`\sigma` for Gaussian
    :math:`p`; its error grows with the non-Gaussianity of :math:`p` on the scale
    :math:`\sigma`. We use it rather than (a) the plain score at the noisy point,
    :math:`\nabla\log p(x_t)`, which ignores the smoothing and biases the distilled variances by
    :math:`-\sigma^2`, forcing tiny :math:`\sigma` at which the EMD gradient estimator's noise
    grows like :math:`1/\sigma`; and (b) a Monte-Carlo (self-normalised importance) smoothing,
    whose weights degenerate beyond a few dimensions. The fixed point is found by
    ``num_smoothing_iterations`` damped iterations (``num_smoothing_iterations + 1`` gradient
    evaluations per score), which converge while :math:`\sigma^2 \lambda_{max}(-\nabla^2 \log p)
    < 3`; keep ``sigma_max`` below the posterior's smallest scale times ``sqrt(3)``.

    The teacher's coordinate is :math:`u` with position :math:`\mathrm{unravel}(m + L u)`
    (:meth:`position`): ``shift`` :math:`m` and ``scale_tril`` :math:`L` standardise the
    posterior (:func:`laplace_standardization`) so that its scales are about one whatever the
    model's units, which is what the noise range ``[sigma_min, sigma_max]`` assumes. The
    Jacobian is constant, so the scores are those of the posterior of :math:`u`.

    Attributes
    ----------
    logdensity_fn
        ``logdensity_fn(position) -> scalar`` on the model's (pytree) position.
    unravel_fn
        Map from a flat vector of shape ``(d,)`` to a position.
    shift, scale_tril
        :math:`m` ``(d,)`` and lower-triangular :math:`L` ``(d, d)``; ``None``: 0 and I.
    smoothing
        ``"laplace"`` (above) or ``"none"``: :meth:`score` and :meth:`log_prob` are those of
        :math:`p` itself at every ``sigma``, exact and one gradient per score. It is not
        :math:`\nabla\log p_\sigma`; it is meant for a student treated the same way (the
        generator's own unsmoothed density, :class:`emdppl.EMD`): the E-step target
        :math:`p(x_\sigma)/q(x_\sigma)\,N(\varepsilon; 0, I)` is then exact and known up to a
        constant, Metropolis kernels apply, and at :math:`q = p` it is exactly
        :math:`N(0, I)`, so the EMD fixed point is unbiased at every ``sigma``; noise only
        decides where the score difference is probed.
    """

    logdensity_fn: Callable
    unravel_fn: Callable = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)
    sigma_data: float = eqx.field(static=True, default=1.0)
    sigma_min: float = eqx.field(static=True, default=0.05)
    sigma_max: float = eqx.field(static=True, default=0.5)
    num_smoothing_iterations: int = eqx.field(static=True, default=12)
    shift: jax.Array | None = None
    scale_tril: jax.Array | None = None
    smoothing: str = eqx.field(static=True, default="laplace")

    def position(self, u: jax.Array) -> Any:
        """The model's position at the teacher's coordinate ``u (d,)``."""
        x = u if self.scale_tril is None else self.scale_tril @ u
        return self.unravel_fn(x if self.shift is None else self.shift + x)

    def __check_init__(self) -> None:
        if self.smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {self.smoothing!r}.")

    def _log_p(self, u: jax.Array) -> jax.Array:
        return self.logdensity_fn(self.position(u))

    def _grad_log_p(self, u: jax.Array) -> jax.Array:
        return jax.grad(self._log_p)(u)

    def score(self, x_t: jax.Array, sigma: jax.Array) -> jax.Array:
        if self.smoothing == "none":
            return self._grad_log_p(x_t)
        return laplace_smoothed_score(self._grad_log_p, x_t, sigma, self.num_smoothing_iterations)

    def log_prob(self, x: jax.Array, sigma: jax.Array | float = 0.0) -> jax.Array:
        r"""Unnormalised :math:`\log p(x)` for ``x (d,)`` (``smoothing="none"`` only: it ignores
        ``sigma``, see the class docstring); a scalar."""
        if self.smoothing != "none":
            raise ValueError(
                "DensityTeacher.log_prob needs smoothing='none' (the Laplace-smoothed teacher "
                "has a score but no log density); use a gradient-only E-step sampler ('ula')."
            )
        return self._log_p(x)


def laplace_smoothed_score(
    grad_log_p: Callable, x_t: jax.Array, sigma: jax.Array, num_iterations: int = 12
) -> jax.Array:
    r"""Laplace approximation of :math:`\nabla\log (p * N(0,\sigma^2 I))(x_t)`, ``x_t (d,)``.

    :math:`\nabla\log p(y^*)` at the fixed point of :math:`y = x_t + \sigma^2\nabla\log p(y)`,
    found by ``num_iterations`` damped (factor 1/2) iterations; exact for Gaussian :math:`p`.
    """

    def damped(_, y):
        return 0.5 * y + 0.5 * (x_t + sigma**2 * grad_log_p(y))

    return grad_log_p(jax.lax.fori_loop(0, num_iterations, damped, x_t))


def from_model(
    model: Callable,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    auxiliary: bool = True,
    rng_key: int | PRNGKey = 0,
    sigma_max: float = 0.5,
) -> DensityTeacher:
    """A NumPyro or Pyro model's posterior, on the unconstrained (auxiliary) space, as a teacher.

    Parameters
    ----------
    model, model_args, model_kwargs
        The model (NumPyro or Pyro, see :class:`emdppl.Problem`) and its arguments.
    auxiliary
        Write the model in auxiliary (non-centred) form first.
    rng_key
        Seed of the :data:`NUM_LAPLACE_STARTS` valid initial points the Laplace fit starts from.
    sigma_max
        Largest noise level of the Laplace-smoothed score (see :class:`DensityTeacher`),
        relative to posterior scales of order one.

    Returns
    -------
    DensityTeacher
        With ``teacher.target`` available as ``teacher.logdensity_fn``'s source; the flat
        coordinate ``x`` is ``ravel_pytree`` of the model's unconstrained position.

    Examples
    --------
    >>> teacher = emdppl.teachers.from_model(eight_schools, model_kwargs=data)  # doctest: +SKIP
    """
    from emdppl.problem import Problem

    problem = Problem.of(
        model, model_args=model_args, model_kwargs=model_kwargs, auxiliary=auxiliary
    )
    target = problem.target(NUM_LAPLACE_STARTS, as_key(rng_key))
    return density_teacher(target, sigma_max=sigma_max)


def density_teacher(
    target: Any, *, sigma_max: float = 0.5, standardize: bool = True, smoothing: str = "laplace"
) -> DensityTeacher:
    """A :class:`DensityTeacher` from an :class:`emdppl.target.Target`, standardised by
    :func:`laplace_standardization` from each of the target's initial positions (unless
    ``standardize=False``; :data:`NUM_LAPLACE_STARTS` of them from :func:`from_model` and
    :class:`emdppl.EMD`); ``smoothing`` as in :class:`DensityTeacher`."""
    if smoothing not in SMOOTHINGS:
        raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}.")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}.")
    one = jax.tree.map(lambda x: x[0], target.initial_position)
    flat, unravel = ravel_pytree(one)
    shift = scale_tril = None
    if standardize:
        starts = jax.vmap(lambda position: ravel_pytree(position)[0])(target.initial_position)
        shift, scale_tril = laplace_standardization(target.logdensity_fn, unravel, starts)
    return DensityTeacher(
        target.logdensity_fn,
        unravel,
        int(flat.shape[0]),
        sigma_min=sigma_max / 10,
        sigma_max=sigma_max,
        shift=shift,
        scale_tril=scale_tril,
        smoothing=smoothing,
    )


#: Initial positions the Laplace fit of a posterior teacher runs L-BFGS from; the highest
#: optimum is kept. One start can end in a local optimum: on posteriordb's Lotka-Volterra
#: posterior, 8 of 16 random starts end in fits of the pelts far worse than the posterior's mode.
NUM_LAPLACE_STARTS = 8


@eqx.filter_jit
def _laplace(logdensity_fn: Callable, unravel_fn: Callable, starts: jax.Array, num_steps: int):
    """L-BFGS from each of ``starts (n, d)``, one after another (``lax.map``: a start costs its
    own iterations, as a vectorised solver inside the density would not), then the Hessian at
    the highest finite optimum: ``(mode (d,), lp, hessian (d, d))``."""

    def loss(x):
        return -logdensity_fn(unravel_fn(x))

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        updates, state = optimizer.update(grad, state, x, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(x, updates), state), None

    def fit(x0):
        (x, _), _ = jax.lax.scan(step, (x0, optimizer.init(x0)), None, length=num_steps)
        return x, -loss(x)

    modes, lps = jax.lax.map(fit, starts)
    finite = jnp.isfinite(lps) & jnp.all(jnp.isfinite(modes), axis=1)
    x = modes[jnp.argmax(jnp.where(finite, lps, -jnp.inf))]
    return x, -loss(x), hessian(loss, x)


def laplace_standardization(
    logdensity_fn: Callable, unravel_fn: Callable, x0: jax.Array, num_steps: int = 200
) -> tuple[jax.Array, jax.Array]:
    r"""``(m (d,), L (d, d))`` that put the posterior on a unit scale by a Laplace
    approximation: :math:`m` the highest mode L-BFGS reaches from the start(s) ``x0`` (``(d,)``
    or ``(n, d)``), :math:`L L^T = H^{-1}` with :math:`H` the negative Hessian there, its
    eigenvalues floored at :math:`10^{-6}\lambda_{max}` (flat or non-convex directions). Falls
    back to (the first finite start, :math:`I`) when no start reaches a finite mode, and to
    (the mode, :math:`I`) when the Hessian there is not finite."""
    starts = jnp.atleast_2d(jnp.asarray(x0))
    mode, lp, hessian = _laplace(logdensity_fn, unravel_fn, starts, num_steps)
    mode, hessian = np.asarray(mode, np.float64), np.asarray(hessian, np.float64)
    dtype, d = starts.dtype, mode.shape[0]
    if not (np.isfinite(lp) and np.isfinite(mode).all()):
        finite = np.flatnonzero(np.isfinite(np.asarray(starts)).all(axis=1))
        return starts[finite[0] if finite.size else 0], jnp.eye(d, dtype=dtype)
    if not np.isfinite(hessian).all():
        return jnp.asarray(mode, dtype), jnp.eye(d, dtype=dtype)
    eigenvalues, vectors = np.linalg.eigh(0.5 * (hessian + hessian.T))
    if not eigenvalues.max() > 0:
        return jnp.asarray(mode, dtype), jnp.eye(d, dtype=dtype)
    eigenvalues = np.maximum(eigenvalues, 1e-6 * eigenvalues.max())
    covariance = (vectors / eigenvalues) @ vectors.T
    scale_tril = np.linalg.cholesky(0.5 * (covariance + covariance.T))
    return jnp.asarray(mode, dtype), jnp.asarray(scale_tril, dtype)


def __getattr__(name: str):
    """``teachers.from_torch``, deprecated: the torch teacher is
    :func:`emdppl.bridge.from_torch` (torch is optional); this alias goes in 0.3."""
    if name == "from_torch":
        import warnings

        from emdppl.bridge.torch_teacher import from_torch

        warnings.warn(
            "emdppl.teachers.from_torch is deprecated; use emdppl.bridge.from_torch (it will be "
            "removed in 0.3).",
            DeprecationWarning,
            stacklevel=2,
        )
        return from_torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
