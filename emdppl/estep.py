r"""The E-step of EM distillation as pure functions: chains over the generator's latents.

In reparametrised coordinates :math:`x_\sigma = g_\theta(z) + \sigma\varepsilon` the E-step
target at noise level :math:`\sigma` is (``docs/EMD.md`` §2.2, §3)

.. math:: \log\tilde\pi(\varepsilon, z) = \log p_\sigma(x_\sigma) - \log q_{\theta,\sigma}(x_\sigma)
          - \tfrac12\|\varepsilon\|^2 - \tfrac12\|z\|^2,

with gradients :math:`\nabla_\varepsilon = \sigma\Delta - \varepsilon`,
:math:`\nabla_z = J_g^T \Delta - z`, :math:`\Delta = s_{teacher} - s_{student}`. Chains start at
exact generator draws :math:`(\varepsilon^0, z^0) \sim N(0, I)` and run K steps of a registered
sampler; the sampler state is **built afresh on the current** :math:`\theta` at every E-step
(blackjax states cache the log density and its gradient).

The z block runs with step :math:`\gamma_z(\sigma) = \min(c_z\sigma^2, \gamma_{z,max})` (§3.3):
the sampler sees :math:`u = z / r`, :math:`r = \sqrt{\gamma_z/\gamma_\varepsilon}`, a constant-
Jacobian change of variables under which one step size gives every block its own step, for any
sampler.

**Noise cancellation** (§4.2): ``"full"`` runs a *shadow chain* with the same kernel and the
same random numbers on the :math:`\Delta \equiv 0` target :math:`N(0, I)`; for Langevin-type
kernels it is exactly the injected-noise part :math:`\eta^K`, and :math:`\tilde\varepsilon =
\varepsilon^K - \eta^K = \sum_k \gamma(1-\gamma)^{K-1-k}\sigma\Delta^k` for ULA. ``"initial"``
subtracts only :math:`\varepsilon^0`; ``"none"`` keeps :math:`\varepsilon^K`.
``"residual"`` (§4.3) replaces :math:`\varepsilon^K` by its Stein twin
:math:`\tilde\varepsilon = \sigma\Delta(x^K)`, :math:`x^K = g(z^K) + \sigma\varepsilon^K`: at
stationarity :math:`E[\varepsilon \mid z] = \sigma E[\Delta \mid z]`, so it has the same
conditional mean with no injected noise, and at K = 0 it is the Diff-Instruct residual.

``z_step_rule="jacobian"`` divides :math:`\gamma_z` of each chain by
:math:`1 + \|J_g(z^0)\|_F^2`: the z block's curvature is about :math:`\|J_g\|^2` times that of
the x block, largest where the generator stretches space between modes.

Shapes: one chain has ``eps (d,)`` and ``z (latent_dim,)``; :func:`estep` maps over a batch
``sigma (B,)``, ``eps0 (B, d)``, ``z0 (B, latent_dim)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from emdppl import schedule
from emdppl.base import PRNGKey
from emdppl.distill_config import DistillConfig
from emdppl.samplers import get_sampler

__all__ = [
    "EStepResult",
    "EStepTarget",
    "clip_rms",
    "draw",
    "estep",
    "run_chain",
    "sampler_parameters",
    "score_difference",
    "z_step",
]


class EStepTarget(NamedTuple):
    """What the E-step needs at the current generator :math:`\\theta` and student :math:`\\psi`.

    Attributes
    ----------
    teacher
        ``teacher.score(x (d,), sigma ()) -> (d,)``; ``teacher.log_prob`` for Metropolis kernels.
    generate_fn
        ``generate_fn(z (latent_dim,)) -> x (d,)``, the generator at :math:`\\theta`.
    student_score_fn
        ``student_score_fn(x (d,), sigma ()) -> (d,)``, :math:`\\nabla\\log q_{\\theta,\\sigma}`.
    student_logdensity_fn
        ``(x, sigma) -> log q_{theta,sigma}(x)`` for Metropolis-adjusted kernels, else ``None``.
    """

    teacher: Any
    generate_fn: Callable
    student_score_fn: Callable
    student_logdensity_fn: Callable | None = None


class EStepResult(NamedTuple):
    """One E-step chain (a leading batch axis after :func:`estep`).

    ``eps``/``z``: the final position :math:`(\\varepsilon^K, z^K)`; ``eps_tilde``: the noise-
    cancelled residual; ``eps0``/``z0``: the initial draw; ``acceptance_rate``: mean acceptance
    (NaN for unadjusted kernels); ``stale_logdensity``: :math:`|` cached log density of the final
    sampler state :math:`-` the log density of the current :math:`\\theta` there :math:`|`.
    """

    eps: jax.Array
    z: jax.Array
    eps_tilde: jax.Array
    eps0: jax.Array
    z0: jax.Array
    acceptance_rate: jax.Array
    stale_logdensity: jax.Array


def clip_rms(grads: dict, max_rms: float | None) -> dict:
    """Scale a gradient pytree down to an RMS (per coordinate) of at most ``max_rms``.

    A standard-normal block has gradient RMS about 1, so the clip only acts where the score
    difference is far out of scale (an unstable chain), bounding each drift step by
    ``step_size * max_rms * sqrt(n)``.
    """
    if max_rms is None:
        return grads
    leaves = jax.tree.leaves(grads)
    n = sum(leaf.size for leaf in leaves)
    norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in leaves))
    scale = jnp.minimum(1.0, max_rms * jnp.sqrt(n) / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: g * scale, grads)


def sampler_parameters(config: DistillConfig, data_dim: int, latent_dim: int) -> dict:
    """The E-step sampler's parameters (step size ``estep_step_size``) on the chain position
    ``{"eps": (d,), "u": (latent_dim,)}`` (``u`` only when z is sampled)."""
    position = {"eps": jnp.zeros(data_dim)}
    if config.update_z:
        position["u"] = jnp.zeros(latent_dim)
    sampler = get_sampler(config.estep_sampler)
    return sampler.parameters(position, sampler.options(step_size=config.estep_step_size))


def score_difference(target: EStepTarget, x: jax.Array, sigma: jax.Array) -> jax.Array:
    r""":math:`\Delta(x) = s_{teacher}(x, \sigma) - s_{student}(x, \sigma)`, ``x (d,) -> (d,)``."""
    return target.teacher.score(x, sigma) - target.student_score_fn(x, sigma)


def z_step(config: DistillConfig, generate_fn: Callable, sigma: jax.Array, z0: jax.Array):
    r"""The z block's step of one chain, a scalar: :math:`\gamma_z = \min(c_z\sigma^2,
    \gamma_{z,max})`, divided by :math:`1 + \|J_g(z^0)\|_F^2` for ``z_step_rule="jacobian"``
    (``z0 (latent_dim,)``; the step is fixed along the chain, so the change of variables
    :math:`u = z / r` keeps a constant Jacobian)."""
    gamma_z = jnp.minimum(config.z_step_scale * sigma**2, config.max_z_step)
    if config.z_step_rule == "jacobian" and config.update_z:
        jacobian = jax.jacfwd(generate_fn)(z0)
        gamma_z = gamma_z / (1.0 + jnp.sum(jacobian**2))
    return gamma_z


def _chain_fns(
    config: DistillConfig, target: EStepTarget, sigma, z0, needs_logdensity: bool, step_size
):
    """``(target_fn, shadow_fn, to_z, r)`` of one chain at noise level ``sigma``: the E-step's
    log density (Metropolis kernels) or its gradient (gradient-only kernels), the same for the
    :math:`\\Delta \\equiv 0` shadow target, the map from the sampler's position to z, and r."""
    gamma_z = z_step(config, target.generate_fn, sigma, z0)
    r = jnp.sqrt(gamma_z / step_size)

    def to_z(position):
        return r * position["u"] if config.update_z else z0

    def prior_grad(position):
        out = {"eps": -position["eps"]}
        if config.update_z:
            out["u"] = -(r**2) * position["u"]
        return out

    if needs_logdensity:

        def shadow_fn(position):
            grads, values = jax.tree.leaves(prior_grad(position)), jax.tree.leaves(position)
            return 0.5 * sum(jnp.vdot(g, p) for g, p in zip(grads, values, strict=True))

        def logdensity_fn(position):
            x = target.generate_fn(to_z(position)) + sigma * position["eps"]
            return (
                target.teacher.log_prob(x, sigma)
                - target.student_logdensity_fn(x, sigma)
                + shadow_fn(position)
            )

        return logdensity_fn, shadow_fn, to_z, r

    def grad_fn(position):
        g, vjp = jax.vjp(target.generate_fn, to_z(position))
        delta = score_difference(target, g + sigma * position["eps"], sigma)
        grads = prior_grad(position)
        grads["eps"] = grads["eps"] + sigma * delta
        if config.update_z:
            grads["u"] = grads["u"] + r * vjp(delta)[0]
        return clip_rms(grads, config.estep_grad_clip)

    return grad_fn, prior_grad, to_z, r


def run_chain(
    rng_key: PRNGKey,
    config: DistillConfig,
    target: EStepTarget,
    sigma: jax.Array,
    eps0: jax.Array,
    z0: jax.Array,
    num_steps: int,
    parameters: dict,
    record: bool = False,
) -> tuple[EStepResult, Any]:
    """Run one E-step chain of ``num_steps`` kernel steps from ``(eps0 (d,), z0 (latent_dim,))``
    with the sampler ``parameters`` (:func:`sampler_parameters`).

    Returns the :class:`EStepResult` and, when ``record``, the trajectory
    ``({"eps": (num_steps, d), "z": (num_steps, latent_dim)}, acceptance (num_steps,))``.
    """
    sampler = get_sampler(config.estep_sampler)
    kernel = sampler.build_kernel(sampler.options(step_size=config.estep_step_size))
    position = {"eps": eps0}
    target_fn, shadow_fn, to_z, r = _chain_fns(
        config, target, sigma, z0, sampler.needs_logdensity, parameters["step_size"]
    )
    if config.update_z:
        position["u"] = z0 / r
    init_key, chain_key = jax.random.split(rng_key)
    state = sampler.init(position, target_fn, init_key)
    is_full = config.noise_cancellation == "full"
    shadow = sampler.init(position, shadow_fn, init_key) if is_full else None

    def body(carry, key):
        state, shadow = carry
        state, info = kernel(key, state, target_fn, parameters)
        if is_full:  # the same random numbers on the Delta = 0 target
            shadow, _ = kernel(key, shadow, shadow_fn, parameters)
        stats = sampler.stats(state, info)
        acceptance = jnp.asarray(stats.get("acceptance_rate", jnp.nan), jnp.float32)
        if record:
            return (state, shadow), ({"eps": state.position["eps"], "z": to_z(state.position)},
                                     acceptance)
        return (state, shadow), acceptance

    (state, shadow), trace = jax.lax.scan(
        body, (state, shadow), jax.random.split(chain_key, num_steps)
    )
    acceptance = trace[1] if record else trace
    eps, z = state.position["eps"], to_z(state.position)
    eps_tilde = {
        "full": lambda: eps - shadow.position["eps"],
        "initial": lambda: eps - eps0,
        "none": lambda: eps,
        "residual": lambda: sigma * score_difference(
            target, target.generate_fn(z) + sigma * eps, sigma
        ),
    }[config.noise_cancellation]()
    stale = (
        jnp.abs(state.logdensity - target_fn(state.position))
        if hasattr(state, "logdensity")
        else jnp.zeros((), eps.dtype)
    )
    result = EStepResult(
        eps=eps,
        z=z,
        eps_tilde=eps_tilde,
        eps0=eps0,
        z0=z0,
        acceptance_rate=jnp.mean(acceptance) if num_steps else jnp.asarray(jnp.nan, jnp.float32),
        stale_logdensity=stale,
    )
    return result, (trace if record else None)


def estep(
    rng_key: PRNGKey, config: DistillConfig, target: EStepTarget, sigma, eps0, z0, parameters
) -> EStepResult:
    """The batched E-step, K = ``config.num_estep_steps``: ``sigma (B,)``, ``eps0 (B, d)``,
    ``z0 (B, latent_dim)``; every field of the result has a leading ``(B,)`` axis."""
    keys = jax.random.split(rng_key, sigma.shape[0])

    def one(key, s, e, z):
        return run_chain(key, config, target, s, e, z, config.num_estep_steps, parameters)[0]

    return jax.vmap(one)(keys, sigma, eps0, z0)


def draw(
    rng_key: PRNGKey, config: DistillConfig, data_dim: int, latent_dim: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(sigma (B,), eps0 (B, d), z0 (B, latent_dim))``: log-uniform noise levels on
    ``config.sigma_range`` and the E-step's starting draws, ``B = config.batch_size``."""
    k_sigma, k_eps, k_z = jax.random.split(rng_key, 3)
    shape = (config.batch_size,)
    sigma = schedule.sample_log_uniform(k_sigma, shape, config.sigma_min, config.sigma_max)
    eps0 = jax.random.normal(k_eps, (*shape, data_dim))
    z0 = jax.random.normal(k_z, (*shape, latent_dim))
    return sigma, eps0, z0
