r"""Stochastic variational inference as an :class:`~emdppl.base.Algorithm`.

The guide :math:`q_\phi(z)` (an auto guide or any NumPyro guide) is fitted by maximising the
evidence lower bound with reparameterised gradients (AEVB, Kingma & Welling 2013),

.. math::  \mathcal L(\phi) = \mathbb E_{q_\phi(z)}\big[\log p(x, z) - \log q_\phi(z)\big]
           \le \log p(x),

estimated with ``num_particles`` draws per step. With ``auxiliary=True`` (the default) the guide
lives on the latents of :func:`emdppl.auxiliary` (``*_decentered``, unit scale), where a Gaussian
guide fits hierarchical posteriors far better than on the centered scale.

:func:`svi_algorithm` wraps NumPyro's ``SVI.update`` in an equinox module, so the one driver
:func:`emdppl.run` steps it in jitted ``lax.scan`` chunks, with a progress bar and resumable
checkpoints of the optimiser state. :class:`SVI` holds the settings: :meth:`SVI.fit` returns an
:class:`SVIResult` (fitted parameters, guide, ELBO trace), :meth:`SVI.infer` the ArviZ data that
:func:`emdppl.infer` returns.
Every fit is checked (a loss still falling at the end, a Gaussian guide's sd collapsed below the
sd that the posterior's curvature averaged over the guide implies: :mod:`emdppl.diagnostics`),
with one warning that is also kept in ``SVIResult.warnings`` and ``attrs["warnings"]``.

Amortised inference (AEVB) uses the same machinery: register an equinox encoder in the guide and
a decoder in the model with ``numpyro.contrib.module.eqx_module`` and subsample the data plate::

    def model(x, num_data):                      # x: (N, D) in [0, 1]
        decoder = eqx_module("decoder", decoder_net)
        with numpyro.plate("data", num_data, subsample_size=100) as idx:
            z = numpyro.sample("z", dist.Normal(0, 1).expand([latent_dim]).to_event(1))
            logits = jax.vmap(decoder)(z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x[idx])

    def guide(x, num_data):
        encoder = eqx_module("encoder", encoder_net)
        with numpyro.plate("data", num_data, subsample_size=100) as idx:
            loc, log_scale = jax.vmap(encoder)(x[idx])
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    result = emdppl.SVI(guide).fit(0, model, model_args=(x, N), auxiliary=False)

``z`` is already unit-scale noise, so ``auxiliary=False`` changes nothing here; the plate scales
the minibatch log likelihood by ``N / 100`` (the minibatch estimator of AEVB). See
``examples/vae_digits.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from numpyro import handlers
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.svi import SVIState as NumPyroSVIState
from numpyro.infer.util import potential_energy
from numpyro.optim import optax_to_numpyro

from emdppl.base import Algorithm, PRNGKey, PyTree, as_key, tree_all_finite
from emdppl.curvature import (
    MAX_CURVATURE_DIM,
    NUM_CURVATURE_DRAWS,
    laplace_marginal_sd,
    mean_hessian,
)
from emdppl.diagnostics import check_guide_scales, check_svi_loss, warn
from emdppl.driver import run
from emdppl.inference_data import to_arviz
from emdppl.reparam import auxiliary as make_auxiliary
from emdppl.sharding import (
    PARTICLE_AXIS,
    Devices,
    constrain_leading,
    constrain_replicated,
    describe,
    device_mesh,
    particle_mesh,
    replicate,
    shard_chains,
)
from emdppl.target import check_model_arguments
from emdppl.timing import stopwatch

if TYPE_CHECKING:
    from emdppl.problem import Problem

__all__ = [
    "GUIDES",
    "LOSSES",
    "SVI",
    "NonFiniteLossError",
    "SVIResult",
    "SVIState",
    "default_optimizer",
    "svi_algorithm",
]

#: Auto guide names accepted by :class:`SVI`.
GUIDES: dict[str, type] = {
    "auto_normal": AutoNormal,
    "auto_multivariate_normal": AutoMultivariateNormal,
    "auto_lowrank_multivariate_normal": AutoLowRankMultivariateNormal,
    "auto_delta": AutoDelta,
}
#: Loss names accepted by :class:`SVI`: Trace_ELBO, TraceMeanField_ELBO (analytic KL where
#: NumPyro has it), RenyiELBO with :math:`\alpha = 0` (the importance-weighted bound, needs
#: ``num_particles >= 2``).
LOSSES: dict[str, Callable[[int], Any]] = {
    "elbo": lambda n: Trace_ELBO(num_particles=n),
    "tracemean": lambda n: TraceMeanField_ELBO(num_particles=n),
    "renyi": lambda n: RenyiELBO(alpha=0.0, num_particles=n),
}


@functools.cache
def default_optimizer(num_steps: int, learning_rate: float = 1e-2) -> optax.GradientTransformation:
    r"""Adam on a warm-up + cosine schedule, the default of :class:`SVI`.

    The rate rises linearly from ``learning_rate / 10`` to ``learning_rate`` over the first 5% of
    the steps, then decays by cosine to ``learning_rate / 100``, so the last steps average out
    the gradient noise of the ELBO estimator. ``b2 = 0.99`` (not Adam's 0.999): the second-moment
    estimate forgets the large gradients of the first steps within ~100 steps, so steps near
    the optimum are not damped (with 0.999 a normal-normal fit of 2000 steps stays 0.2
    posterior sd short of the exact answer). Cached: equal settings give the same object, so
    two :class:`SVI` built alike share compiled code.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=learning_rate / 10,
        peak_value=learning_rate,
        warmup_steps=max(1, num_steps // 20),
        decay_steps=max(2, num_steps),
        end_value=learning_rate / 100,
    )
    return optax.adam(schedule, b2=0.99)


class SVIState(NamedTuple):
    """State of :func:`svi_algorithm`.

    Attributes
    ----------
    optim_state
        NumPyro's optimiser state ``(iteration, (unconstrained params, optax state))``.
    mutable_state
        NumPyro ``mutable`` sites (e.g. batch-norm statistics), or ``None``.
    step
        Number of steps taken (int32 scalar).
    failed_step
        ``-1``, or the first step whose loss or updated parameters were NaN/inf (int32 scalar);
        from then on the state is frozen at the last finite parameters.
    """

    optim_state: PyTree
    mutable_state: PyTree
    step: jax.Array
    failed_step: jax.Array


@dataclasses.dataclass(frozen=True)
class _ParticleMap:
    """NumPyro's ``ELBO.vectorize_particles_fn``: ``vmap`` over the particles' keys, which are
    split over ``mesh`` (``"particle"`` axis), so each device draws and scores its share of the
    particles and their mean (the ELBO, and its gradient) is an all-reduce."""

    mesh: Mesh

    def __call__(self, fn: Callable, keys: jax.Array) -> Any:
        return jax.vmap(fn)(constrain_leading(keys, self.mesh))


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What decides the compiled code of a fit: the user's model, its form, guide, optimiser and
    loss. Hashable and compared by value, so two fits of the same setup share compiled code
    (the data are traced arguments next to it). The NumPyro objects are built from it inside
    each trace (:meth:`build`): an auto guide set up while tracing keeps tracers, so it must not
    outlive the trace."""

    model: Callable
    auxiliary: bool
    guide: str | Callable
    optimizer: optax.GradientTransformation
    loss: str | Any
    num_particles: int
    mesh: Mesh | None = None

    def fitted_model(self) -> Callable:
        return make_auxiliary(self.model) if self.auxiliary else self.model

    def new_guide(self, fitted_model: Callable) -> Callable:
        """A fresh guide (auto guides are not set up until first called)."""
        return GUIDES[self.guide](fitted_model) if isinstance(self.guide, str) else self.guide

    def build(self) -> tuple[Callable, Callable, NumPyroSVI]:
        """``(fitted model, guide, numpyro.infer.SVI)``, fresh."""
        model = self.fitted_model()
        guide = self.new_guide(model)
        loss = LOSSES[self.loss](self.num_particles) if isinstance(self.loss, str) else self.loss
        if self.mesh is not None:  # the particles over the mesh, through NumPyro's own hook
            loss = copy.copy(loss)
            loss.vectorize_particles_fn = _ParticleMap(self.mesh)
        return model, guide, NumPyroSVI(model, guide, optax_to_numpyro(self.optimizer), loss)

    def initialised(self, rng_key: PRNGKey, model_args: tuple, model_kwargs: dict) -> NumPyroSVI:
        """A fresh ``numpyro.infer.SVI`` that has recorded the constraints of the ``param``
        sites (what ``update`` and ``get_params`` need), by ``SVI.init`` evaluated abstractly:
        it adds no operation to the computation being traced."""
        _, _, svi = self.build()
        jax.eval_shape(
            lambda key, args, kwargs: svi.init(key, *args, **kwargs),
            rng_key,
            model_args,
            model_kwargs,
        )
        return svi


class _SVIStep(eqx.Module):
    """``step(rng_key, state)``: one optimiser step on the ELBO; info = ``{"loss": -ELBO}``.

    The setup (model, guide, loss, optimiser) is static; the model arguments are traced, so new
    data of the same shapes reuses the compiled chunk.
    """

    setup: _Setup = eqx.field(static=True)
    model_args: tuple
    model_kwargs: dict

    def __call__(self, rng_key: PRNGKey, state: SVIState) -> tuple[SVIState, dict]:
        svi = self.setup.initialised(rng_key, self.model_args, self.model_kwargs)

        def update(state: SVIState) -> tuple[SVIState, dict]:
            svi_state = NumPyroSVIState(state.optim_state, state.mutable_state, rng_key)
            new, loss = svi.update(svi_state, *self.model_args, **self.model_kwargs)
            params = svi.optim.get_params(new.optim_state)
            is_finite = jnp.isfinite(loss) & tree_all_finite(params)
            # the state keeps the dtypes it started with (x64 data may promote the update)
            keep = lambda a, b: jnp.where(is_finite, a, b).astype(jnp.result_type(b))
            optim_state, mutable_state = jax.tree.map(
                keep,
                (new.optim_state, new.mutable_state),
                (state.optim_state, state.mutable_state),
            )
            failed_step = jnp.where(is_finite, state.failed_step, state.step)
            state = SVIState(optim_state, mutable_state, state.step + 1, failed_step)
            return state, jnp.asarray(loss, jnp.float32)

        def frozen(state: SVIState) -> tuple[SVIState, dict]:
            return state._replace(step=state.step + 1), jnp.asarray(jnp.nan, jnp.float32)

        state, loss = jax.lax.cond(state.failed_step >= 0, frozen, update, state)
        return constrain_replicated(state, self.setup.mesh), {"loss": loss}


class _SVIInit(eqx.Module):
    """``init(position, rng_key)``: NumPyro's ``SVI.init``; ``position`` is ``None`` or a dict
    of initial (constrained) values of ``param`` sites. The guide's sites are checked against
    the model's (:func:`_check_guide`) when this is traced."""

    setup: _Setup = eqx.field(static=True)
    model_args: tuple
    model_kwargs: dict

    def __call__(self, position: dict | None, rng_key: PRNGKey) -> SVIState:
        return self.initial_state(position, *jax.random.split(rng_key))

    def initial_state(
        self, position: dict | None, init_key: PRNGKey, check_key: PRNGKey
    ) -> SVIState:
        """The initial state: the check sets the auto guide up (its initial values drawn with
        ``check_key``), then ``SVI.init`` runs with ``init_key``."""
        model, guide, svi = self.setup.build()
        _check_guide(model, guide, self.model_args, self.model_kwargs, check_key)
        svi_state = svi.init(init_key, *self.model_args, init_params=position, **self.model_kwargs)
        state = SVIState(
            svi_state.optim_state,
            svi_state.mutable_state,
            jnp.zeros((), jnp.int32),
            -jnp.ones((), jnp.int32),
        )
        return constrain_replicated(state, self.setup.mesh)


def svi_algorithm(
    model: Callable,
    guide: str | Callable,
    optimizer: optax.GradientTransformation,
    loss: Any,
    *,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    auxiliary: bool = False,
    devices: Devices = None,
) -> Algorithm:
    r"""The SVI ``Algorithm`` of ``guide`` for ``model``: one optax step on :math:`-\mathcal L`.

    ``guide`` is a name from :data:`GUIDES` (built on the fitted model) or a NumPyro guide
    callable; ``loss`` a NumPyro ELBO instance; ``auxiliary`` fits :func:`emdppl.auxiliary`
    ``(model)``. ``init(position, rng_key)`` checks the guide's sites against the model's and
    returns the initial state; ``position`` is ``None`` (the guide's own initial values) or a
    dict of constrained ``param`` values. ``step(rng_key, state)`` returns
    ``{"loss": -ELBO estimate}`` and skips (and from then on freezes) a step whose loss or
    parameters are not finite, recording it in ``state.failed_step``. The data are traced
    arguments: a second algorithm of the same model, guide, optimiser and loss on data of the
    same shapes reuses the compiled code. ``devices`` (as :class:`SVI`'s): the loss's particles
    split over a ``"particle"`` mesh axis, the data and the state replicated.

    Returns
    -------
    Algorithm
        ``Algorithm(init, step)`` over :class:`SVIState`.

    Examples
    --------
    >>> alg = emdppl.svi.svi_algorithm(model, "auto_normal", optax.adam(1e-2),
    ...                                Trace_ELBO())  # doctest: +SKIP
    >>> state = alg.init(None, jax.random.key(0))  # doctest: +SKIP
    >>> state, trace = emdppl.run(1, alg, 1000, state)  # doctest: +SKIP
    """
    mesh = particle_mesh(devices, _particle_count(loss, 1, devices))
    setup = _Setup(model, bool(auxiliary), guide, optimizer, loss, 1, mesh)
    return _algorithm(setup, tuple(model_args), dict(model_kwargs or {}))


def _algorithm(setup: _Setup, model_args: tuple, model_kwargs: dict) -> Algorithm:
    """The Algorithm of ``setup``, its data replicated over ``setup.mesh``."""
    model_args, model_kwargs = replicate((model_args, model_kwargs), setup.mesh)
    return Algorithm(
        init=_SVIInit(setup, model_args, model_kwargs),
        step=_SVIStep(setup, model_args, model_kwargs),
    )


def _particle_count(loss: str | Any, num_particles: int, devices: Devices) -> int:
    """The number of particles of ``loss`` (a name: ``num_particles``); with ``devices``, a
    NumPyro ELBO (its particles are split through ``vectorize_particles_fn``) is required."""
    if isinstance(loss, str):
        return num_particles
    if devices is not None and not hasattr(loss, "vectorize_particles_fn"):
        raise TypeError(
            f"devices= splits the ELBO's particles over devices through NumPyro's "
            f"ELBO.vectorize_particles_fn, which {type(loss).__name__} does not have; use a "
            "numpyro.infer ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO, ...)."
        )
    return int(getattr(loss, "num_particles", 1))


@eqx.filter_jit
def _initial_state(
    init: _SVIInit, position: dict | None, init_key: PRNGKey, check_key: PRNGKey
) -> SVIState:
    return init.initial_state(position, init_key, check_key)


@eqx.filter_jit
def _constrained_params(
    setup: _Setup, state: SVIState, model_args: tuple, model_kwargs: dict
) -> dict:
    """Constrained values of the ``param`` sites of ``state``."""
    svi = setup.initialised(jax.random.key(0), model_args, model_kwargs)
    return svi.get_params(NumPyroSVIState(state.optim_state, None, None))


def _trace(fn: Callable, rng_key: PRNGKey, model_args: tuple, model_kwargs: dict) -> dict:
    return handlers.trace(handlers.seed(fn, rng_key)).get_trace(*model_args, **model_kwargs)


def _latent_names(trace: dict, *, guide: bool) -> list[str]:
    return [
        name
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not (guide and site["infer"].get("is_auxiliary", False))
    ]


def _check_guide(
    model: Callable, guide: Callable, model_args: tuple, model_kwargs: dict, rng_key: PRNGKey
) -> list[str]:
    """Compare the latent sample sites of model and guide in Python, before anything is jitted;
    return the model's latent site names."""
    model_key, guide_key = jax.random.split(rng_key)
    with numpyro.validation_enabled(False):
        model_trace = _trace(model, model_key, model_args, model_kwargs)
        guide_trace = _trace(guide, guide_key, model_args, model_kwargs)
    latents = _latent_names(model_trace, guide=False)
    discrete = [k for k in latents if model_trace[k]["fn"].is_discrete]
    if discrete:
        raise ValueError(
            f"discrete latent site(s) {discrete}: the reparameterised ELBO needs continuous "
            "latents. Marginalise them out in the model or observe them."
        )
    guided = _latent_names(guide_trace, guide=True)
    missing = [k for k in latents if k not in guided]
    extra = [k for k in guided if k not in latents]
    hint = (
        " With auxiliary=True the model's latents are the *_decentered sites of "
        "emdppl.auxiliary(model): write the guide for those, or pass auxiliary=False."
    )
    if missing:
        raise ValueError(
            f"the guide does not cover latent site(s) {missing} of the model (its latents: "
            f"{latents}); they would be drawn from the prior and not inferred. Add "
            "numpyro.sample(...) statements for them to the guide, or use an auto guide."
            + (hint if any(k.endswith("_decentered") for k in missing) else "")
        )
    if extra:
        observed = [k for k in extra if k in model_trace]
        raise ValueError(
            f"the guide has sample site(s) {extra} that are not latent sites of the model "
            f"(model latents: {latents}"
            + (f"; {observed} are observed there" if observed else "")
            + "). Rename or remove them; mark guide-only variables with "
            "infer={'is_auxiliary': True}." + hint
        )
    return latents


def _guide_gaussian(guide: Callable, params: dict) -> tuple[Any, Callable]:
    """``(q, unpack)``: a Gaussian auto guide as a NumPyro distribution ``q`` on the flattened
    unconstrained latents (event shape ``(d,)``); ``unpack(x)`` maps a ``(d,)`` vector to
    ``{site: array}``."""
    if isinstance(guide, AutoNormal):
        prefix = guide.prefix
        loc, unpack = ravel_pytree({k: params[f"{k}_{prefix}_loc"] for k in guide._init_locs})
        scale = ravel_pytree({k: params[f"{k}_{prefix}_scale"] for k in guide._init_locs})[0]
        return numpyro.distributions.Normal(loc, scale).to_event(1), unpack
    # (LowRank)MultivariateNormal on the flat latents
    return guide.get_posterior(params), guide._unpack_latent


@eqx.filter_jit
def _scale_ratios(
    setup: _Setup, params: dict, model_args: tuple, model_kwargs: dict
) -> dict[str, jax.Array] | None:
    r"""Guide marginal sd over the sd implied by the posterior's curvature averaged over the
    guide, per latent coordinate of the fitted (auxiliary) model:
    :math:`r_i = s_i / \sqrt{(\bar H^{-1})_{ii}}`,
    :math:`\bar H = E_q[-\nabla^2 \log p(x, z)]` on the unconstrained latents (Jacobian
    included), from :data:`~emdppl.curvature.NUM_CURVATURE_DRAWS` guide draws.

    A Gaussian :math:`q` at a stationary point of the ELBO has precision :math:`\bar H` (full
    rank) or :math:`\mathrm{diag}\,\bar H` (mean field), so :math:`r_i = 1` for a full-rank
    guide and :math:`r_i = ((\bar H)_{ii} (\bar H^{-1})_{ii})^{-1/2} = \sqrt{1 - R_i^2}` for
    the mean field (:math:`R_i` the multiple correlation of coordinate ``i`` with the others
    under :math:`\bar H`), on any posterior: :math:`r_i \ll 1` is a guide squeezed across a
    ridge it cannot follow. (The Hessian at the guide's mean alone is not enough: where the
    posterior is nearly flat there, as along eight schools' :math:`\log\tau`, it reads a
    healthy fit as collapsed.) Directions of non-positive curvature are left out of
    :math:`\bar H^{-1}` (:func:`emdppl.curvature.laplace_marginal_sd`), which errs on the side
    of no warning. Returns ``{site: array of the site's shape}``; ``None`` for guides without a
    Gaussian scale (``auto_delta``, custom guides) and above
    :data:`emdppl.curvature.MAX_CURVATURE_DIM` coordinates.
    """
    if setup.guide not in (
        "auto_normal",
        "auto_multivariate_normal",
        "auto_lowrank_multivariate_normal",
    ):
        return None
    model, guide, _ = setup.build()
    with numpyro.validation_enabled(False):
        _trace(handlers.substitute(guide, data=params), jax.random.key(0), model_args, model_kwargs)
    q, unpack = _guide_gaussian(guide, params)
    if q.event_shape[0] > MAX_CURVATURE_DIM:
        return None

    def neg_logdensity(x: jax.Array) -> jax.Array:
        return potential_energy(model, model_args, model_kwargs, unpack(x))

    draws = q.sample(jax.random.key(0), (NUM_CURVATURE_DRAWS,))
    with numpyro.validation_enabled(False):
        neg_hessian = mean_hessian(neg_logdensity, draws)
    return unpack(jnp.sqrt(q.variance) / laplace_marginal_sd(neg_hessian))


class SVIResult(NamedTuple):
    """A fitted guide.

    Attributes
    ----------
    params
        Constrained values of every ``param`` site, ``{name: array}`` (e.g. ``mu_auto_loc``;
        an equinox network registered with ``eqx_module("enc", net)`` under ``"enc$params"``).
    guide
        The guide (for auto guides: built on ``model``), to be used with ``params``.
    model
        The model the guide was fitted to (the auxiliary form when ``auxiliary=True``).
    losses
        :math:`-\\mathcal L` estimate at every step, shape ``(num_steps,)``; NaN after a failure.
    state
        The final :class:`SVIState` (to continue optimising with :func:`emdppl.run`).
    model_args, model_kwargs
        The arguments the guide was fitted with.
    setup
        What was fitted (model, form, guide, optimiser, loss); :meth:`sample_posterior` builds
        its guide from it.
    warnings
        The problems :func:`emdppl.diagnostics.check_svi_loss` and
        :func:`emdppl.diagnostics.check_guide_scales` found (empty: none).
    """

    params: dict
    guide: Callable
    model: Callable
    losses: np.ndarray
    state: SVIState
    model_args: tuple
    model_kwargs: dict
    setup: _Setup
    warnings: list = []

    def sample_posterior(self, rng_key: int | PRNGKey, num_samples: int) -> dict:
        """Draws from the fitted guide pushed through the model.

        Returns every latent site of ``model`` on its constrained scale and every deterministic
        site (with ``auxiliary=True`` also the centered names, e.g. ``theta``), each of shape
        ``(num_samples, ...)``.
        """
        keys = jax.random.split(as_key(rng_key), num_samples)
        mesh = self.setup.mesh
        device_mesh(mesh, PARTICLE_AXIS, num_samples, "num_samples", "posterior draws")
        keys, params = shard_chains(keys, mesh), replicate(self.params, mesh)
        return _push_forward(self.setup, params, self.model_args, self.model_kwargs, keys)


@eqx.filter_jit
def _push_forward(
    setup: _Setup, params: dict, model_args: tuple, model_kwargs: dict, keys: jax.Array
) -> dict:
    model = setup.fitted_model()
    guide = setup.new_guide(model)
    # set an auto guide up before the draws (its setup would otherwise use up their keys)
    with numpyro.validation_enabled(False):
        _trace(handlers.substitute(guide, data=params), keys[0], model_args, model_kwargs)

    def one(rng_key):
        guide_key, model_key = jax.random.split(rng_key)
        guide_trace = _trace(
            handlers.substitute(guide, data=params), guide_key, model_args, model_kwargs
        )
        latents = {k: guide_trace[k]["value"] for k in _latent_names(guide_trace, guide=True)}
        model_trace = _trace(
            handlers.substitute(model, data={**params, **latents}),
            model_key,
            model_args,
            model_kwargs,
        )
        return {
            k: s["value"]
            for k, s in model_trace.items()
            if (s["type"] == "sample" and not s["is_observed"]) or s["type"] == "deterministic"
        }

    with numpyro.validation_enabled(False):
        return jax.vmap(one)(keys)


class NonFiniteLossError(FloatingPointError):
    """The ELBO or the parameters became NaN/inf; nothing fitted so far is lost.

    Attributes
    ----------
    step
        The first failed step (0-based).
    result
        :class:`SVIResult` with the last finite parameters (those after ``step`` steps) and the
        losses of the steps before.
    """

    def __init__(self, message: str, step: int, result: SVIResult) -> None:
        super().__init__(message)
        self.step = step
        self.result = result


class SVI:
    r"""Settings of a variational fit: guide, optimiser, ELBO, number of steps.

    Parameters
    ----------
    guide
        A name from :data:`GUIDES` (``"auto_normal"``, ``"auto_multivariate_normal"``,
        ``"auto_lowrank_multivariate_normal"``, ``"auto_delta"``), built on the model that is
        fitted (its auxiliary form when ``auxiliary=True``); or any NumPyro guide callable with
        the model's signature, whose sample sites are the model's latent sites.
    optimizer
        Any optax transformation; default :func:`default_optimizer` ``(num_steps)`` (Adam,
        warm-up + cosine decay from 1e-2 to 1e-4).
    num_steps
        Optimisation steps.
    num_samples, num_chains
        Posterior draws returned by :meth:`infer` (independent draws of the fitted guide), split
        into ``num_chains`` chains of ``num_samples // num_chains`` draws so that ArviZ's
        multi-chain diagnostics (R-hat, ...) apply.
    num_particles
        Draws of the guide per ELBO estimate.
    loss
        A name from :data:`LOSSES` (``"elbo"``: ``Trace_ELBO``; ``"tracemean"``;
        ``"renyi"``: importance-weighted bound) or a NumPyro ELBO instance.
    num_chunks
        Jitted chunks of the run (progress and checkpoint granularity).
    checkpoint_dir
        Where :func:`emdppl.run` checkpoints the optimiser state after every chunk and resumes
        from.
    devices
        Where the particles run (:func:`emdppl.sharding.particle_mesh`): ``None`` (the default
        device), ``"all"``, an int (the first ``n`` of ``jax.devices()``), a list of devices or
        a one-axis ``jax.sharding.Mesh``. Each ELBO estimate's ``num_particles`` draws of the
        guide, and the ``num_samples`` posterior draws, are split evenly over a
        ``"particle"`` mesh axis (both must be multiples of the number of devices); the data,
        parameters and optimiser state are replicated and the gradient is all-reduced. The
        result is that of one device up to floating-point summation order
        (``attrs["devices"]`` lists the devices). Pays off when a particle is costly (a large
        model or data set, many particles); a Pyro model runs Pyro's own SVI, which refuses it.

    Examples
    --------
    >>> svi = emdppl.SVI("auto_multivariate_normal", num_steps=5000)
    >>> idata = emdppl.infer(eight_schools, svi, model_kwargs=data)  # doctest: +SKIP
    >>> idata.svi_trace["loss"]  # -ELBO per step, dims (chain=1, draw=step)  # doctest: +SKIP
    >>> idata.posterior["theta"].dims  # ("chain", "draw", "J"), 4 chains  # doctest: +SKIP
    >>> result = svi.fit(0, eight_schools, model_kwargs=data)  # doctest: +SKIP
    >>> result.params["auto_loc"]  # doctest: +SKIP
    """

    def __init__(
        self,
        guide: str | Callable = "auto_normal",
        *,
        optimizer: optax.GradientTransformation | None = None,
        num_steps: int = 5000,
        num_samples: int = 1000,
        num_chains: int = 4,
        num_particles: int = 1,
        loss: str | Any = "elbo",
        num_chunks: int = 20,
        checkpoint_dir: str | None = None,
        devices: Devices = None,
    ) -> None:
        if isinstance(guide, str) and guide not in GUIDES:
            raise ValueError(f"unknown guide {guide!r}; known guides: {sorted(GUIDES)}.")
        if not isinstance(guide, str) and not callable(guide):
            raise TypeError(
                f"guide must be a name from {sorted(GUIDES)} or a NumPyro guide callable, got "
                f"{type(guide).__name__}."
            )
        for name, value in (
            ("num_steps", num_steps),
            ("num_samples", num_samples),
            ("num_chains", num_chains),
            ("num_particles", num_particles),
            ("num_chunks", num_chunks),
        ):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"SVI: {name} must be an integer >= 1, got {value!r}.")
        if num_samples % num_chains:
            raise ValueError(
                f"SVI: num_samples={num_samples} must be a multiple of num_chains={num_chains}."
            )
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; known losses: {sorted(LOSSES)}.")
            if loss == "renyi" and num_particles < 2:
                raise ValueError("loss='renyi' needs num_particles >= 2.")
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-2)), got "
                f"{type(optimizer).__name__}."
            )
        self.guide = guide
        self.num_steps = int(num_steps)
        self.num_samples = int(num_samples)
        self.num_chains = int(num_chains)
        self.num_particles = int(num_particles)
        self.loss = loss
        self.num_chunks = int(num_chunks)
        self.checkpoint_dir = checkpoint_dir
        self.optimizer = default_optimizer(self.num_steps) if optimizer is None else optimizer
        # a bad spec fails here, before any tracing
        mesh = particle_mesh(devices, _particle_count(loss, self.num_particles, devices))
        device_mesh(mesh, PARTICLE_AXIS, self.num_samples, "num_samples", "posterior draws")
        self.devices = devices

    def _mesh(self) -> Mesh | None:
        return particle_mesh(self.devices, _particle_count(self.loss, self.num_particles, None))

    def __repr__(self) -> str:
        guide = (
            self.guide
            if isinstance(self.guide, str)
            else getattr(self.guide, "__name__", type(self.guide).__name__)
        )
        return (
            f"SVI({guide!r}, num_steps={self.num_steps}, num_samples={self.num_samples}, "
            f"num_chains={self.num_chains}, num_particles={self.num_particles}, "
            f"loss={self.loss!r})"
        )

    @property
    def _guide_name(self) -> str:
        if isinstance(self.guide, str):
            return self.guide
        return getattr(self.guide, "__name__", type(self.guide).__name__)

    def fit(
        self,
        rng_key: int | PRNGKey,
        model: Callable,
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        auxiliary: bool = True,
        init_params: dict | None = None,
        progress_bar: bool = True,
    ) -> SVIResult:
        """Fit the guide to ``model``'s posterior.

        Parameters
        ----------
        rng_key
            Seed or key (initialisation and every ELBO estimate).
        model, model_args, model_kwargs
            The NumPyro model and its arguments (arrays traced, reused across calls).
        auxiliary
            Fit the guide on :func:`emdppl.auxiliary` ``(model)``.
        init_params
            Initial constrained values of ``param`` sites (e.g. a previous ``result.params``).
        progress_bar
            Show a tqdm bar.

        Returns
        -------
        SVIResult
            After the fit it is checked: a loss still falling at the end
            (:func:`emdppl.diagnostics.check_svi_loss`) and, for Gaussian auto guides, guide sds
            far below the sd that the posterior's curvature averaged over the guide implies
            (:func:`emdppl.diagnostics.check_guide_scales`) give one ``RuntimeWarning``, also
            in ``result.warnings``.

        Raises
        ------
        NonFiniteLossError
            When the loss or the parameters become NaN/inf; ``err.step`` is the failed step and
            ``err.result`` keeps the last finite parameters.
        """
        model_kwargs = dict(model_kwargs or {})
        model_args = tuple(model_args)
        if not callable(model):
            raise TypeError(f"model must be a NumPyro model (a callable), got {type(model)}.")
        check_model_arguments(model, model_args, model_kwargs)
        mesh = self._mesh()
        model_args, model_kwargs = replicate((model_args, model_kwargs), mesh)
        setup = _Setup(
            model, bool(auxiliary), self.guide, self.optimizer, self.loss, self.num_particles, mesh
        )
        init_key, check_key, run_key = jax.random.split(as_key(rng_key), 3)
        fitted_model = setup.fitted_model()
        guide = setup.new_guide(fitted_model)
        if isinstance(self.guide, AutoGuide) and self.guide.prototype_trace is None:
            # the user's own auto guide, not set up yet: set it up here, on concrete data (set
            # up while tracing, it would keep tracers)
            _check_guide(fitted_model, guide, model_args, model_kwargs, check_key)
        algorithm = _algorithm(setup, model_args, model_kwargs)
        with numpyro.validation_enabled(False):
            state = _initial_state(algorithm.init, init_params, init_key, check_key)
        state, trace = run(
            run_key,
            algorithm,
            self.num_steps,
            state,
            num_chunks=self.num_chunks,
            progress_bar=progress_bar,
            desc=f"svi {self._guide_name}",
            checkpoint_dir=self.checkpoint_dir,
        )
        params = jax.device_get(_constrained_params(setup, state, model_args, model_kwargs))
        result = SVIResult(
            params, guide, fitted_model, trace["loss"], state, model_args, model_kwargs, setup
        )
        failed = int(state.failed_step)
        if failed >= 0:
            raise NonFiniteLossError(
                f"SVI: the loss or the parameters became NaN/inf at step {failed} of "
                f"{self.num_steps}; the parameters after step {failed - 1} are kept in "
                "err.result.params (and err.result.state to continue). Lower the learning rate, "
                "clip gradients (optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3))) "
                "or check the data and the guide's initial scale.",
                failed,
                result,
            )
        problems = check_svi_loss(result.losses, "emdppl.SVI")
        ratios = _scale_ratios(setup, params, model_args, model_kwargs)
        if ratios is not None:
            problems += check_guide_scales(jax.device_get(ratios), self._guide_name)
        warn(problems, f"emdppl.SVI({self._guide_name!r})")
        return result._replace(warnings=problems)

    def infer(
        self, problem: Problem, *, rng_key: int | PRNGKey = 0, progress_bar: bool = True
    ) -> Any:
        """Fit the guide to ``problem``'s NumPyro model and return InferenceData; see
        :func:`emdppl.infer`, which adds the model's groups.

        Returns
        -------
        arviz.InferenceData
            ``posterior``: ``num_samples`` draws of the fitted guide pushed through the model,
            the same sites as MCMC's (constrained latents and deterministics), dims
            ``(chain=num_chains, draw=num_samples // num_chains, ...)``. ``svi_trace``:
            ``loss`` (:math:`-\\mathcal L` per optimisation step), dims
            ``(chain=1, draw=step)``. ``attrs``: ``algorithm="svi"``, ``guide``, ``loss``,
            ``num_steps``, ``num_particles``, ``num_samples``, ``auxiliary``,
            ``final_loss`` (mean of the last 1% of the steps, at least one),
            ``params`` (the fitted constrained parameters, JSON), ``fit_seconds``,
            ``sampling_seconds``, ``wall_seconds``, ``compile_seconds``, library versions,
            ``warnings`` (:attr:`SVIResult.warnings`), ``devices``.
        """
        if problem.backend == "target":
            raise TypeError(
                "emdppl.SVI needs a NumPyro model (a callable), not a Target: a guide is "
                "defined on a model's sample sites."
            )
        fit_key, sample_key = jax.random.split(as_key(rng_key))
        with stopwatch() as watch:
            with stopwatch() as fit_watch:
                result = self.fit(
                    fit_key,
                    problem.model,
                    model_args=problem.model_args,
                    model_kwargs=problem.model_kwargs,
                    auxiliary=problem.auxiliary,
                    progress_bar=progress_bar,
                )
            with stopwatch() as sample_watch:
                draws = jax.device_get(result.sample_posterior(sample_key, self.num_samples))
        posterior = {  # independent draws, split into chains
            k: np.asarray(v).reshape(self.num_chains, -1, *np.shape(v)[1:])
            for k, v in draws.items()
        }
        tail = max(1, math.ceil(self.num_steps / 100))
        attrs = {
            "algorithm": "svi",
            "guide": self._guide_name,
            "loss": self.loss if isinstance(self.loss, str) else type(self.loss).__name__,
            "num_steps": self.num_steps,
            "num_particles": self.num_particles,
            "num_samples": self.num_samples,
            "auxiliary": int(problem.auxiliary),
            "final_loss": float(np.mean(result.losses[-tail:])),
            "params": _jsonable(result.params),
            "fit_seconds": fit_watch.wall_seconds,
            "sampling_seconds": sample_watch.wall_seconds,
            "wall_seconds": watch.wall_seconds,
            "compile_seconds": watch.compile_seconds,
            "warnings": list(result.warnings),
            "devices": describe(result.setup.mesh),
        }
        return to_arviz(posterior, None, attrs, svi_trace={"loss": result.losses[None]})


def _jsonable(params: dict) -> dict:
    """Array leaves as nested lists (an equinox network's parameters flattened in leaf order)."""
    return {
        k: np.asarray(v).tolist()
        if hasattr(v, "shape")
        else [np.asarray(x).tolist() for x in jax.tree.leaves(v)]
        for k, v in params.items()
    }
