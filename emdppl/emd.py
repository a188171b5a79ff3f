r"""EM distillation (EMD) of a teacher score into a one-step generator.

The generator :math:`x = g_\theta(z)`, :math:`z \sim N(0, I)` defines at every noise level the
joint :math:`q_{\theta,\sigma}(x_\sigma, z) = N(z; 0, I)\,N(x_\sigma; g_\theta(z), \sigma^2 I)`
(VE convention, :mod:`emdppl.schedule`). EMD minimises :math:`E_\sigma\,w(\sigma)\,
\mathrm{KL}(p_\sigma \| q_{\theta,\sigma})` (forward KL, mode covering) by stochastic EM
(``docs/EMD.md``):

**E-step** (§2.2, §3): in reparametrised coordinates :math:`x_\sigma = g_\theta(z) + \sigma
\varepsilon` the target is

.. math:: \log\tilde\pi(\varepsilon, z) = \log p_\sigma(x_\sigma) - \log q_{\theta,\sigma}(x_\sigma)
          - \tfrac12\|\varepsilon\|^2 - \tfrac12\|z\|^2,

with gradients :math:`\nabla_\varepsilon = \sigma\Delta - \varepsilon`,
:math:`\nabla_z = J_g^T \Delta - z`, :math:`\Delta = s_{teacher} - s_{student}`. Chains start at
exact generator draws :math:`(\varepsilon^0, z^0) \sim N(0, I)` and run ``num_estep_steps`` (K)
steps of a registered sampler, vmapped over the batch, the sampler state **re-initialised every
E-step** on the current :math:`\theta` (blackjax states cache the log density and its gradient).
The z-block runs with step :math:`\gamma_z(\sigma) = \min(c_z\sigma^2, \gamma_{z,max})` (§3.3):
the sampler sees :math:`u = z / r`, :math:`r = \sqrt{\gamma_z/\gamma_\varepsilon}`, a constant-
Jacobian change of variables under which one step size ``estep_step_size`` gives every block its
own step, for any sampler.

**Noise cancellation** (§4.2): ``"full"`` (variant B) runs a *shadow chain* with the same kernel
and the same random numbers on the :math:`\Delta \equiv 0` target :math:`N(0, I)`; for Langevin-
type kernels (ula, sgld, sghmc) it is exactly the injected-noise part
:math:`\eta^K` and :math:`\tilde\varepsilon = \varepsilon^K - \eta^K
= \sum_k \gamma(1-\gamma)^{K-1-k}\sigma\Delta^k` for ULA. ``"initial"`` subtracts only
:math:`\varepsilon^0`; ``"none"`` keeps :math:`\varepsilon^K`. Cancellation is unbiased with z
frozen and biased when z moves (§4.2), so the default is ``"none"`` for EMD with z sampled.

**M-step** (§5.1): one optax step on the surrogate
:math:`L(\theta) = -\mathrm{mean}_b\, \frac{w(\sigma_b)}{\sigma_b}\langle \tilde\varepsilon_b,
g_\theta(z_b^K)\rangle` (samples held fixed). The student score :math:`s_\psi \approx \nabla\log
q_{\theta,\sigma}` is trained by EDM denoising score matching on fresh generator draws,
``student_updates_per_step`` times per generator step (TTUR). A generator with a
``marginal_score(x, sigma)`` method (affine: exact; sinh-arcsinh flow: Laplace-smoothed) needs
no student network.

**Diff-Instruct** (§6): ``method="diff_instruct"`` is the same code with K = 1, z frozen and full
cancellation; its gradient is exactly ``estep_step_size`` times the reverse-KL (DI) gradient.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from emdppl import generators as generators_module
from emdppl import schedule
from emdppl.base import Algorithm, PRNGKey, PyTree, as_key
from emdppl.driver import checkpoint_exists, run
from emdppl.samplers import get_sampler
from emdppl.teachers import AbstractTeacher, DensityTeacher, DiffusionModel, EDMNetwork, dsm_loss

__all__ = [
    "EMD",
    "DistillInfo",
    "DistillResult",
    "DistillState",
    "EStepResult",
    "build_distiller",
    "distill",
]

METHODS = ("emd", "diff_instruct")
NOISE_CANCELLATIONS = ("full", "initial", "none")
WEIGHTINGS = ("sigma2", "sigma")
GENERATORS = ("sinh_arcsinh", "maf", "affine", "mlp")


class DistillState(NamedTuple):
    """Training state: generator ``theta``, student ``psi``, optimiser states, NaN counts."""

    theta: PyTree
    psi: PyTree
    theta_opt_state: PyTree
    psi_opt_state: PyTree
    num_skipped: jax.Array
    consecutive_skipped: jax.Array


class DistillInfo(NamedTuple):
    """Per-step diagnostics (the ``history`` of :class:`DistillResult`).

    Attributes
    ----------
    loss
        M-step surrogate loss (its gradient is the EMD gradient; its value is not a divergence).
    grad_norm
        Global norm of the generator gradient.
    student_loss
        Mean DSM loss of the student updates (0 for an exact student).
    estep_drift
        Batch mean of :math:`\\|\\varepsilon^K - \\varepsilon^0\\|` (how far the E-step moved).
    correction_norm
        Mean of :math:`\\|\\tilde\\varepsilon\\|`, the residual the M-step regresses on.
    acceptance_rate
        Mean acceptance of Metropolis-adjusted E-step kernels; NaN for unadjusted ones.
    stale_logdensity
        Largest :math:`|` cached log density of the sampler state :math:`-` the log density of
        the current :math:`\\theta` at the final E-step position :math:`|` (0 unless cached).
    is_skipped
        Whether a non-finite value made this step a no-op.
    z_rms
        Root mean square of the final E-step latents :math:`z^K` over the batch. The chains
        start at :math:`z^0 \\sim N(0, I)` and target a distribution whose z-marginal is near
        :math:`N(0, I)`, so values far above 1 mean the z step is too large (see
        :func:`distill`'s warning).
    """

    loss: jax.Array
    grad_norm: jax.Array
    student_loss: jax.Array
    estep_drift: jax.Array
    correction_norm: jax.Array
    acceptance_rate: jax.Array
    stale_logdensity: jax.Array
    is_skipped: jax.Array
    z_rms: jax.Array


class EStepResult(NamedTuple):
    """One E-step for one batch element (leading batch axis after ``vmap``).

    ``eps``/``z``: final chain position :math:`(\\varepsilon^K, z^K)`; ``eps_tilde``: the noise-
    cancelled residual; ``eps0``/``z0``: the initial draw; ``acceptance_rate``, ``stale_logdensity``
    as in :class:`DistillInfo`.
    """

    eps: jax.Array
    z: jax.Array
    eps_tilde: jax.Array
    eps0: jax.Array
    z0: jax.Array
    acceptance_rate: jax.Array
    stale_logdensity: jax.Array


def _tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class _Distiller(eqx.Module):
    """The EMD step as a pytree: arrays (teacher, sampler parameters) are traced by ``run``."""

    teacher: AbstractTeacher
    generator_static: PyTree
    student_static: PyTree
    sampler_init: Callable
    sampler_stats: Callable
    kernel: Callable
    sampler_parameters: dict
    optimizer: optax.GradientTransformation
    student_optimizer: optax.GradientTransformation
    needs_logdensity: bool = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    num_estep_steps: int = eqx.field(static=True)
    noise_cancellation: str = eqx.field(static=True)
    update_z: bool = eqx.field(static=True)
    z_step_scale: float = eqx.field(static=True)
    max_z_step: float = eqx.field(static=True)
    sigma_min: float = eqx.field(static=True)
    sigma_max: float = eqx.field(static=True)
    student_updates_per_step: int = eqx.field(static=True)
    weighting: str = eqx.field(static=True)
    max_consecutive_nan: int = eqx.field(static=True)
    estep_grad_clip: float | None = eqx.field(static=True)

    # ---- model pieces -------------------------------------------------------------------

    def generate(self, theta: PyTree, z: jax.Array) -> jax.Array:
        return generators_module.apply(theta, self.generator_static, z)

    def student_score(self, theta: PyTree, psi: PyTree, x: jax.Array, sigma: jax.Array):
        if self.student_static is None:
            return eqx.combine(theta, self.generator_static).marginal_score(x, sigma)
        return eqx.combine(psi, self.student_static).score(x, sigma)

    def _target_fns(self, theta, psi, sigma, z0) -> tuple[Callable, Callable, Callable, Any]:
        """``(target_fn, shadow_fn, to_z, r)`` of one chain at noise level ``sigma``."""
        step_size = self.sampler_parameters["step_size"]
        gamma_z = jnp.minimum(self.z_step_scale * sigma**2, self.max_z_step)
        r = jnp.sqrt(gamma_z / step_size)

        def to_z(position):
            return r * position["u"] if self.update_z else z0

        def prior(position):
            out = {"eps": -position["eps"]}
            if self.update_z:
                out["u"] = -(r**2) * position["u"]
            return out

        if self.needs_logdensity:
            generator = eqx.combine(theta, self.generator_static)

            def shadow_fn(position):
                grads, values = jax.tree.leaves(prior(position)), jax.tree.leaves(position)
                return 0.5 * sum(jnp.vdot(g, p) for g, p in zip(grads, values, strict=True))

            def target_fn(position):
                x = self.generate(theta, to_z(position)) + sigma * position["eps"]
                return (
                    self.teacher.log_prob(x, sigma)
                    - generator.marginal_logdensity(x, sigma)
                    + shadow_fn(position)
                )

            return target_fn, shadow_fn, to_z, r

        def target_fn(position):
            z = to_z(position)
            g, vjp = jax.vjp(lambda z: self.generate(theta, z), z)
            x = g + sigma * position["eps"]
            delta = self.teacher.score(x, sigma) - self.student_score(theta, psi, x, sigma)
            grads = prior(position)
            grads["eps"] = grads["eps"] + sigma * delta
            if self.update_z:
                grads["u"] = grads["u"] + r * vjp(delta)[0]
            return self._clip(grads)

        return target_fn, prior, to_z, r

    def _clip(self, grads: dict) -> dict:
        """Scale the E-step gradient to RMS <= ``estep_grad_clip`` (per coordinate).

        A standard-normal block has gradient RMS about 1, so the clip only acts where the score
        difference is far out of scale (an unstable chain), bounding each drift step by
        ``step_size * estep_grad_clip * sqrt(n)`` instead of letting it blow up.
        """
        if self.estep_grad_clip is None:
            return grads
        leaves = jax.tree.leaves(grads)
        n = sum(leaf.size for leaf in leaves)
        norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in leaves))
        scale = jnp.minimum(1.0, self.estep_grad_clip * jnp.sqrt(n) / jnp.maximum(norm, 1e-30))
        return jax.tree.map(lambda g: g * scale, grads)

    # ---- E-step -------------------------------------------------------------------------

    def chain(
        self, rng_key, theta, psi, sigma, eps0, z0, num_steps: int, record: bool = False
    ) -> tuple[EStepResult, Any]:
        """Run one E-step chain of ``num_steps`` kernel steps from ``(eps0, z0)`` at ``sigma``.

        Returns the :class:`EStepResult` and, when ``record``, the trajectory
        ``({"eps": (num_steps, d), "z": (num_steps, latent_dim)}, stats)``.
        """
        target_fn, shadow_fn, to_z, r = self._target_fns(theta, psi, sigma, z0)
        position = {"eps": eps0}
        if self.update_z:
            position["u"] = z0 / r
        init_key, chain_key = jax.random.split(rng_key)
        # Fresh states on the current theta: never carried over from the previous E-step.
        state = self.sampler_init(position, target_fn, init_key)
        is_full = self.noise_cancellation == "full"
        shadow = self.sampler_init(position, shadow_fn, init_key) if is_full else None

        def body(carry, key):
            state, shadow = carry
            state, info = self.kernel(key, state, target_fn, self.sampler_parameters)
            if is_full:
                shadow, _ = self.kernel(key, shadow, shadow_fn, self.sampler_parameters)
            stats = self.sampler_stats(state, info)
            acceptance = jnp.asarray(stats.get("acceptance_rate", jnp.nan), jnp.float32)
            trace = (
                ({"eps": state.position["eps"], "z": to_z(state.position)}, acceptance)
                if record
                else acceptance
            )
            return (state, shadow), trace

        keys = jax.random.split(chain_key, num_steps)
        (state, shadow), trace = jax.lax.scan(body, (state, shadow), keys)
        acceptance = trace[1] if record else trace
        eps = state.position["eps"]
        if is_full:
            eps_tilde = eps - shadow.position["eps"]
        elif self.noise_cancellation == "initial":
            eps_tilde = eps - eps0
        else:
            eps_tilde = eps
        stale = (
            jnp.abs(state.logdensity - target_fn(state.position))
            if hasattr(state, "logdensity")
            else jnp.zeros(())
        )
        result = EStepResult(
            eps=eps,
            z=to_z(state.position),
            eps_tilde=eps_tilde,
            eps0=eps0,
            z0=z0,
            acceptance_rate=jnp.mean(acceptance) if num_steps else jnp.asarray(jnp.nan),
            stale_logdensity=stale,
        )
        return result, (trace if record else None)

    def estep(self, rng_key, theta, psi, sigma, eps0, z0) -> EStepResult:
        """The batched E-step; ``sigma (B,)``, ``eps0 (B, d)``, ``z0 (B, latent_dim)``."""
        keys = jax.random.split(rng_key, sigma.shape[0])

        def one(key, s, e, z):
            return self.chain(key, theta, psi, s, e, z, self.num_estep_steps)[0]

        return jax.vmap(one)(keys, sigma, eps0, z0)

    # ---- M-step and student -------------------------------------------------------------

    def weight_over_sigma(self, sigma: jax.Array) -> jax.Array:
        """:math:`w(\\sigma)/\\sigma` with :math:`w = \\sigma^2` (``"sigma2"``) or ``sigma``."""
        return sigma if self.weighting == "sigma2" else jnp.ones_like(sigma)

    def generator_loss(self, theta, z, eps_tilde, sigma) -> jax.Array:
        """M-step surrogate; ``z (B, latent_dim)``, ``eps_tilde (B, d)``, ``sigma (B,)``."""
        x = jax.vmap(lambda z: self.generate(theta, z))(jax.lax.stop_gradient(z))
        residual = jax.lax.stop_gradient(eps_tilde)
        return -jnp.mean(self.weight_over_sigma(sigma) * jnp.sum(residual * x, axis=-1))

    def draw(self, rng_key) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(sigma (B,), eps0 (B, d), z0 (B, latent_dim))`` for one step."""
        k_sigma, k_eps, k_z = jax.random.split(rng_key, 3)
        sigma = schedule.sample_log_uniform(
            k_sigma, (self.batch_size,), self.sigma_min, self.sigma_max
        )
        eps0 = jax.random.normal(k_eps, (self.batch_size, self.teacher.data_dim))
        z0 = jax.random.normal(k_z, (self.batch_size, self.latent_dim))
        return sigma, eps0, z0

    def update_student(self, rng_key, theta, psi, psi_opt_state, num_updates: int):
        """``num_updates`` DSM steps of the student on fresh generator draws."""
        if self.student_static is None:
            return psi, psi_opt_state, jnp.zeros(())

        def one(carry, key):
            psi, opt_state = carry
            k_z, k_sigma, k_noise = jax.random.split(key, 3)
            z = jax.random.normal(k_z, (self.batch_size, self.latent_dim))
            x = jax.lax.stop_gradient(jax.vmap(lambda z: self.generate(theta, z))(z))
            sigma = schedule.sample_log_uniform(
                k_sigma, (self.batch_size,), self.sigma_min, self.sigma_max
            )
            noise = jax.random.normal(k_noise, x.shape)
            loss, grads = jax.value_and_grad(
                lambda p: dsm_loss(eqx.combine(p, self.student_static), x, sigma, noise)
            )(psi)
            updates, opt_state = self.student_optimizer.update(grads, opt_state, psi)
            return (optax.apply_updates(psi, updates), opt_state), loss

        keys = jax.random.split(rng_key, num_updates)
        (psi, psi_opt_state), losses = jax.lax.scan(one, (psi, psi_opt_state), keys)
        return psi, psi_opt_state, jnp.mean(losses)

    # ---- the Algorithm step ---------------------------------------------------------------

    def _update(self, rng_key: PRNGKey, state: DistillState) -> tuple[DistillState, DistillInfo]:
        k_student, k_draw, k_chain = jax.random.split(rng_key, 3)
        psi, psi_opt_state, student_loss = self.update_student(
            k_student, state.theta, state.psi, state.psi_opt_state, self.student_updates_per_step
        )
        sigma, eps0, z0 = self.draw(k_draw)
        result = self.estep(k_chain, state.theta, psi, sigma, eps0, z0)
        loss, grads = jax.value_and_grad(self.generator_loss)(
            state.theta, result.z, result.eps_tilde, sigma
        )
        updates, theta_opt_state = self.optimizer.update(grads, state.theta_opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        grad_norm = optax.global_norm(grads)
        is_finite = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(student_loss)
            & _tree_all_finite((theta, psi, result.eps_tilde, result.z))
        )
        new = DistillState(
            theta, psi, theta_opt_state, psi_opt_state, state.num_skipped, jnp.zeros((), jnp.int32)
        )
        skipped = state._replace(
            num_skipped=state.num_skipped + 1, consecutive_skipped=state.consecutive_skipped + 1
        )
        state = jax.tree.map(lambda a, b: jnp.where(is_finite, a, b), new, skipped)
        info = DistillInfo(
            loss=loss,
            grad_norm=grad_norm,
            student_loss=student_loss,
            estep_drift=jnp.mean(jnp.linalg.norm(result.eps - result.eps0, axis=-1)),
            correction_norm=jnp.mean(jnp.linalg.norm(result.eps_tilde, axis=-1)),
            acceptance_rate=jnp.mean(result.acceptance_rate),
            stale_logdensity=jnp.max(result.stale_logdensity),
            is_skipped=~is_finite,
            z_rms=jnp.sqrt(jnp.mean(result.z**2)),
        )
        return state, info

    def step(self, rng_key: PRNGKey, state: DistillState) -> tuple[DistillState, DistillInfo]:
        """One student update phase + E-step + M-step; a no-op once too many NaN steps ran."""

        def stopped(_):
            nan = jnp.full((), jnp.nan)
            info = DistillInfo(nan, nan, nan, nan, nan, nan, nan, jnp.asarray(True), nan)
            return state, info

        is_stopped = state.consecutive_skipped >= self.max_consecutive_nan
        return jax.lax.cond(is_stopped, stopped, lambda _: self._update(rng_key, state), None)

    def warmup_step(self, rng_key: PRNGKey, state: DistillState) -> tuple[DistillState, jax.Array]:
        """Student-only DSM step on the initial generator (before the first E-step)."""
        psi, psi_opt_state, loss = self.update_student(
            rng_key, state.theta, state.psi, state.psi_opt_state, 1
        )
        return state._replace(psi=psi, psi_opt_state=psi_opt_state), loss


@eqx.filter_jit
def _probe(distiller: _Distiller, rng_key, theta, psi, sigmas, num_chains: int, num_draws: int):
    """Chains at fixed ``theta`` for each probe sigma: leaves ``(chain, draw, probe, ...)``."""
    num_probes = sigmas.shape[0]
    k_eps, k_z, k_chain = jax.random.split(rng_key, 3)
    d, dz = distiller.teacher.data_dim, distiller.latent_dim
    eps0 = jax.random.normal(k_eps, (num_probes, num_chains, d))
    z0 = jax.random.normal(k_z, (num_probes, num_chains, dz))
    keys = jax.random.split(k_chain, (num_probes, num_chains))

    def one(key, sigma, e, z):
        return distiller.chain(key, theta, psi, sigma, e, z, num_draws, record=True)[1]

    per_chain = jax.vmap(one, in_axes=(0, None, 0, 0))
    trace = jax.vmap(per_chain, in_axes=(0, 0, 0, 0))(keys, sigmas, eps0, z0)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), trace)


@eqx.filter_jit
def _sample(generator: generators_module.AbstractGenerator, rng_key: PRNGKey, n: int):
    z = jax.random.normal(rng_key, (n, generator.latent_dim))
    return jax.vmap(generator)(z)


@dataclasses.dataclass(frozen=True)
class DistillResult:
    """Outcome of :func:`distill`.

    Attributes
    ----------
    generator
        The trained generator module.
    student
        The trained student score model (``None`` for a generator with ``marginal_score``).
    history
        ``{name: array (num_steps,)}`` of :class:`DistillInfo` fields.
    estep_idata
        ArviZ data of E-step chains at the final ``theta``: posterior ``eps`` and ``z`` with dims
        ``(chain, draw, probe, ...)``, one probe per noise level in ``attrs["probe_sigmas"]``.
    state
        The final :class:`DistillState`.
    """

    generator: Any
    student: Any
    history: dict
    estep_idata: Any
    state: DistillState

    def sample(self, rng_key: int | PRNGKey, n: int) -> jax.Array:
        """``n`` one-step draws ``g(z)`` of shape ``(n, d)`` (one network evaluation each)."""
        return _sample(self.generator, as_key(rng_key), int(n))


def _default_sigma_range(teacher: AbstractTeacher) -> tuple[float, float]:
    return (
        max(teacher.sigma_min, teacher.sigma_data / 50),
        min(teacher.sigma_max, 4 * teacher.sigma_data),
    )


def _default_generator(teacher: AbstractTeacher, key: PRNGKey):
    if isinstance(teacher, DensityTeacher):
        return generators_module.sinh_arcsinh(teacher.data_dim)
    return generators_module.from_teacher(teacher, key=key)


def _default_noise_cancellation(update_z: bool) -> str:
    """``"none"`` when z moves (cancellation is then biased, §4.2), else ``"full"``."""
    return "none" if update_z else "full"


def _resolve_method(method, num_estep_steps, update_z, noise_cancellation):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if method == "diff_instruct":
        fixed = {"num_estep_steps": 1, "update_z": False, "noise_cancellation": "full"}
        given = {
            "num_estep_steps": num_estep_steps,
            "update_z": update_z,
            "noise_cancellation": noise_cancellation,
        }
        conflicts = {k: v for k, v in given.items() if v is not None and v != fixed[k]}
        if conflicts:
            raise ValueError(
                f"method='diff_instruct' fixes {fixed}; drop {sorted(conflicts)} or use "
                "method='emd'."
            )
        return 1, False, "full"
    num_estep_steps = 8 if num_estep_steps is None else int(num_estep_steps)
    update_z = True if update_z is None else bool(update_z)
    if noise_cancellation is None:
        noise_cancellation = _default_noise_cancellation(update_z)
    if noise_cancellation not in NOISE_CANCELLATIONS:
        raise ValueError(
            f"noise_cancellation must be one of {NOISE_CANCELLATIONS}, got {noise_cancellation!r}."
        )
    if num_estep_steps < 0:
        raise ValueError(f"num_estep_steps must be >= 0, got {num_estep_steps}.")
    if num_estep_steps == 1 and update_z and noise_cancellation != "none":
        warnings.warn(
            f"method='emd' with K=1, z sampled and noise_cancellation={noise_cancellation!r}: "
            "cancellation is biased when z moves, and with one step the bias outweighs the "
            "signal (measured: the generator diverges on the 2-D mixtures). Use K >= 2, "
            "update_z=False (K-step Diff-Instruct) or noise_cancellation='none'.",
            UserWarning,
            stacklevel=4,
        )
    return num_estep_steps, update_z, noise_cancellation


def build_distiller(
    teacher: AbstractTeacher,
    generator: generators_module.AbstractGenerator | None = None,
    *,
    method: str = "emd",
    batch_size: int = 256,
    estep_sampler: str = "ula",
    num_estep_steps: int | None = None,
    estep_step_size: float = 0.2,
    noise_cancellation: str | None = None,
    update_z: bool | None = None,
    z_step_scale: float = 0.2,
    max_z_step: float = 0.5,
    sigma_range: tuple[float, float] | None = None,
    weighting: str = "sigma2",
    optimizer: optax.GradientTransformation | None = None,
    student: DiffusionModel | None = None,
    student_optimizer: optax.GradientTransformation | None = None,
    student_updates_per_step: int = 2,
    max_consecutive_nan: int = 20,
    estep_grad_clip: float | None = 5.0,
    rng_key: int | PRNGKey = 0,
) -> tuple[_Distiller, DistillState]:
    """Validate the arguments of :func:`distill` and build its step and initial state.

    Exposed for tests and custom loops: ``distiller.estep``, ``distiller.generator_loss`` and
    ``distiller.step`` are pure functions of explicit arguments. Parameters as in :func:`distill`.
    """
    if not isinstance(teacher, AbstractTeacher):
        raise TypeError(
            f"teacher must be an emdppl.teachers.AbstractTeacher, got {type(teacher).__name__}; "
            "wrap a denoiser network with emdppl.teachers.DiffusionModel(net, sigma_data, d)."
        )
    num_estep_steps, update_z, noise_cancellation = _resolve_method(
        method, num_estep_steps, update_z, noise_cancellation
    )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    if estep_grad_clip is not None and not estep_grad_clip > 0:
        raise ValueError(f"estep_grad_clip must be > 0 or None, got {estep_grad_clip}.")
    for name, value in (("batch_size", batch_size), ("max_consecutive_nan", max_consecutive_nan)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if student_updates_per_step < 0:
        raise ValueError(f"student_updates_per_step must be >= 0, got {student_updates_per_step}.")
    if not (estep_step_size > 0 and z_step_scale > 0 and max_z_step > 0):
        raise ValueError("estep_step_size, z_step_scale and max_z_step must be > 0.")
    sigma_min, sigma_max = sigma_range or _default_sigma_range(teacher)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_range must satisfy 0 < min < max, got {(sigma_min, sigma_max)}.")

    k_gen, k_student = jax.random.split(as_key(rng_key))
    generator = _default_generator(teacher, k_gen) if generator is None else generator
    if not isinstance(generator, generators_module.AbstractGenerator):
        raise TypeError(
            f"generator must be an emdppl.generators.AbstractGenerator, got "
            f"{type(generator).__name__}; build one with emdppl.generators.mlp(...)."
        )
    if generator.data_dim != teacher.data_dim:
        raise ValueError(
            f"generator.data_dim={generator.data_dim} differs from teacher.data_dim="
            f"{teacher.data_dim}."
        )
    is_exact_student = hasattr(generator, "marginal_score")
    sampler = get_sampler(estep_sampler)
    has_densities = hasattr(teacher, "log_prob") and hasattr(generator, "marginal_logdensity")
    if sampler.needs_logdensity and not has_densities:
        raise ValueError(
            f"estep_sampler={estep_sampler!r} needs the E-step log density, i.e. a teacher with "
            "log_prob and a generator with marginal_logdensity (e.g. generators.affine); use a "
            "gradient-only sampler ('ula', 'sgld', 'sghmc') for score teachers."
        )
    options = sampler.options(step_size=estep_step_size)

    theta, generator_static = generators_module.partition(generator)
    if is_exact_student:
        psi, student_static, student_updates_per_step = (), None, 0
    else:
        if student is None:
            student = (
                teacher
                if isinstance(teacher, DiffusionModel)
                else DiffusionModel(
                    EDMNetwork(teacher.data_dim, key=k_student),
                    teacher.sigma_data,
                    teacher.data_dim,
                )
            )
        psi, student_static = eqx.partition(student, eqx.is_inexact_array)
    optimizer = optax.adam(1e-3) if optimizer is None else optimizer
    student_optimizer = optax.adam(1e-3) if student_optimizer is None else student_optimizer

    example = {"eps": jnp.zeros(teacher.data_dim)}
    if update_z:
        example["u"] = jnp.zeros(generator.latent_dim)
    distiller = _Distiller(
        teacher=teacher,
        generator_static=generator_static,
        student_static=student_static,
        sampler_init=sampler.init,
        sampler_stats=sampler.stats,
        kernel=sampler.build_kernel(options),
        sampler_parameters=sampler.parameters(example, options),
        optimizer=optimizer,
        student_optimizer=student_optimizer,
        needs_logdensity=sampler.needs_logdensity,
        batch_size=int(batch_size),
        latent_dim=generator.latent_dim,
        num_estep_steps=num_estep_steps,
        noise_cancellation=noise_cancellation,
        update_z=update_z,
        z_step_scale=float(z_step_scale),
        max_z_step=float(max_z_step),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        student_updates_per_step=int(student_updates_per_step),
        weighting=weighting,
        max_consecutive_nan=int(max_consecutive_nan),
        estep_grad_clip=None if estep_grad_clip is None else float(estep_grad_clip),
    )
    state = DistillState(
        theta=theta,
        psi=psi,
        theta_opt_state=optimizer.init(theta),
        psi_opt_state=student_optimizer.init(psi),
        num_skipped=jnp.zeros((), jnp.int32),
        consecutive_skipped=jnp.zeros((), jnp.int32),
    )
    return distiller, state


def distill(
    teacher: AbstractTeacher,
    generator: generators_module.AbstractGenerator | None = None,
    *,
    method: str = "emd",
    num_steps: int = 2000,
    batch_size: int = 256,
    estep_sampler: str = "ula",
    num_estep_steps: int | None = None,
    estep_step_size: float = 0.2,
    noise_cancellation: str | None = None,
    update_z: bool | None = None,
    z_step_scale: float = 0.2,
    max_z_step: float = 0.5,
    sigma_range: tuple[float, float] | None = None,
    weighting: str = "sigma2",
    optimizer: optax.GradientTransformation | None = None,
    student: DiffusionModel | None = None,
    student_optimizer: optax.GradientTransformation | None = None,
    student_updates_per_step: int = 2,
    student_warmup_steps: int = 500,
    max_consecutive_nan: int = 20,
    estep_grad_clip: float | None = 5.0,
    num_probe_chains: int = 4,
    num_probe_draws: int = 200,
    rng_key: int | PRNGKey = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress_bar: bool = True,
) -> DistillResult:
    r"""Distil ``teacher`` into a one-step ``generator`` by EM distillation (or Diff-Instruct).

    Parameters
    ----------
    teacher
        An :class:`~emdppl.teachers.AbstractTeacher` (score on the VE schedule).
    generator
        An :class:`~emdppl.generators.AbstractGenerator`; default
        :func:`~emdppl.generators.from_teacher` (or :func:`~emdppl.generators.sinh_arcsinh` for a
        :class:`~emdppl.teachers.DensityTeacher`).
    method
        ``"emd"`` or ``"diff_instruct"`` (K = 1, z frozen, full cancellation; module notes).
    num_steps, batch_size
        Generator (M-step) updates and E-step chains per update.
    estep_sampler
        A registered sampler. Gradient-only ones (``ula``, ``sgld``, ``sghmc``) take scores;
        ``mala``/``hmc`` need ``teacher.log_prob`` and a generator with ``marginal_logdensity``.
    num_estep_steps
        K, kernel steps per E-step (default 8; 1 for Diff-Instruct). K = 0 has zero expected
        gradient (``docs/EMD.md`` §6.3).
    estep_step_size
        :math:`\gamma_\varepsilon`, the sampler's step size.
    noise_cancellation
        ``"full"`` | ``"initial"`` | ``"none"``; default ``"none"`` when z moves, else ``"full"``.
    update_z
        Sample z in the E-step (default ``True``); frozen z keeps the generator's draw.
    z_step_scale, max_z_step
        :math:`\gamma_z(\sigma) = \min(c_z\sigma^2, \gamma_{z,max})`.
    sigma_range
        ``(sigma_min, sigma_max)`` of the log-uniform noise levels of E/M-steps and student DSM;
        default ``(max(teacher.sigma_min, sigma_data/50), min(teacher.sigma_max, 4 sigma_data))``.
    weighting
        :math:`w(\sigma)`: ``"sigma2"`` (Diff-Instruct's weight 1 on the denoiser difference)
        or ``"sigma"``.
    optimizer, student_optimizer
        optax transformations for :math:`\theta` and :math:`\psi`; default Adam 1e-3.
    student
        Initial student score model; default a copy of a :class:`DiffusionModel` teacher, else
        a fresh :class:`~emdppl.teachers.EDMNetwork`. Unused for generators with ``marginal_score``.
    student_updates_per_step, student_warmup_steps
        DSM updates per generator step (TTUR) and before the first step.
    max_consecutive_nan
        Non-finite steps are skipped and counted; this many in a row stop the run with an error.
    estep_grad_clip
        Gradient-only E-step kernels: the (eps, z) gradient is scaled down to an RMS of at most
        this (a standard-normal block's RMS is about 1), which keeps a chain from diverging
        where the teacher/student score difference is out of scale (measured: a trained
        checkerboard teacher, K = 8, diverged at step 478 without it). ``None``: no clip.
    num_probe_chains, num_probe_draws
        Shape of the diagnostic E-step chains in ``estep_idata`` (3 probe noise levels).
    rng_key
        Seed or key; every random number derives from it.
    checkpoint_dir
        Checkpoint after every chunk and resume from it (:func:`emdppl.driver.run`).
    progress_bar
        Show progress.

    Returns
    -------
    DistillResult

    Examples
    --------
    >>> teacher = emdppl.teachers.GaussianMixture(locs, scales, weights)  # doctest: +SKIP
    >>> result = emdppl.distill(teacher, method="emd", rng_key=0)  # doctest: +SKIP
    >>> x = result.sample(jax.random.key(1), 10_000)  # doctest: +SKIP
    """
    for name, value in (
        ("num_steps", num_steps),
        ("num_probe_chains", num_probe_chains),
        ("num_probe_draws", num_probe_draws),
    ):
        if int(value) < 0 or (name == "num_probe_chains" and int(value) < 1):
            raise ValueError(f"{name} must be >= {int(name == 'num_probe_chains')}, got {value}.")
    if student_warmup_steps < 0:
        raise ValueError(f"student_warmup_steps must be >= 0, got {student_warmup_steps}.")
    k_build, k_warmup, k_run, k_probe = jax.random.split(as_key(rng_key), 4)
    distiller, state = build_distiller(
        teacher,
        generator,
        method=method,
        batch_size=batch_size,
        estep_sampler=estep_sampler,
        num_estep_steps=num_estep_steps,
        estep_step_size=estep_step_size,
        noise_cancellation=noise_cancellation,
        update_z=update_z,
        z_step_scale=z_step_scale,
        max_z_step=max_z_step,
        sigma_range=sigma_range,
        weighting=weighting,
        optimizer=optimizer,
        student=student,
        student_optimizer=student_optimizer,
        student_updates_per_step=student_updates_per_step,
        max_consecutive_nan=max_consecutive_nan,
        estep_grad_clip=estep_grad_clip,
        rng_key=k_build,
    )
    if distiller.student_static is None:
        student_warmup_steps = 0
    if student_warmup_steps and not checkpoint_exists(checkpoint_dir):
        warmup = Algorithm(init=lambda position, rng_key: None, step=distiller.warmup_step)
        state, _ = run(
            k_warmup,
            warmup,
            student_warmup_steps,
            state,
            progress_bar=progress_bar,
            desc="student warm-up",
        )
    algorithm = Algorithm(init=lambda position, rng_key: state, step=distiller.step)
    state, trace = run(
        k_run,
        algorithm,
        num_steps,
        state,
        progress_bar=progress_bar,
        desc=f"distilling ({method})",
        checkpoint_dir=checkpoint_dir,
    )
    if int(state.consecutive_skipped) >= distiller.max_consecutive_nan:
        where = f" and in the checkpoint in {checkpoint_dir}" if checkpoint_dir is not None else ""
        raise FloatingPointError(
            f"distillation stopped: {distiller.max_consecutive_nan} consecutive steps produced "
            "NaN/inf "
            f"(teacher or student scores, loss or gradients); {int(state.num_skipped)} steps "
            f"were skipped in all. The last finite parameters are kept in the state{where}. "
            f"Check the teacher's score on sigma in [{distiller.sigma_min:.3g}, "
            f"{distiller.sigma_max:.3g}] and lower "
            "the learning rate or estep_step_size."
        )
    history = {name: np.asarray(value) for name, value in trace._asdict().items()}
    _warn_z_drift(history["z_rms"], distiller.update_z)
    estep_idata = None
    if num_probe_draws:
        probe_sigmas = jnp.exp(
            jnp.linspace(jnp.log(distiller.sigma_min), jnp.log(distiller.sigma_max), 3)
        )
        trajectory, acceptance = _probe(
            distiller,
            k_probe,
            state.theta,
            state.psi,
            probe_sigmas,
            num_probe_chains,
            num_probe_draws,
        )
        estep_idata = _estep_idata(
            trajectory,
            acceptance,
            probe_sigmas,
            method,
            estep_sampler,
            distiller.num_estep_steps,
        )
    generator = eqx.combine(state.theta, distiller.generator_static)
    student = (
        None
        if distiller.student_static is None
        else eqx.combine(state.psi, distiller.student_static)
    )
    return DistillResult(generator, student, history, estep_idata, state)


#: ``z_rms`` (last tenth of the run, median) above which the z chains are called unstable.
#: Measured (600 steps, K = 8): 1.13-1.30 on ring8, grid25, checkerboard and mix10d with a working
#: z step; 1.63 on mix10d with a 10x too large one, whose generator diverged.
MAX_Z_RMS = 1.5


def _warn_z_drift(z_rms: np.ndarray, update_z: bool) -> None:
    """Warn when the E-step's z chains ended far from N(0, I) over the last tenth of the run."""
    tail = z_rms[-max(1, len(z_rms) // 10) :]
    tail = tail[np.isfinite(tail)]
    if not update_z or tail.size == 0 or np.median(tail) <= MAX_Z_RMS:
        return
    warnings.warn(
        f"the E-step's z chains drift far from N(0, I) (RMS of z^K {np.median(tail):.3g}, "
        f"over the last tenth of the run; about 1 when they mix): the z step is too large for "
        "this teacher and the generator is trained on latents it never sees when sampling. "
        "Lower z_step_scale / max_z_step (e.g. 10x) or set update_z=False.",
        RuntimeWarning,
        stacklevel=3,
    )


def _estep_idata(trajectory, acceptance, probe_sigmas, method, sampler, num_estep_steps):
    from emdppl.inference_data import to_arviz

    posterior = {name: np.asarray(x) for name, x in trajectory.items()}
    sample_stats = {}
    if not bool(jnp.all(jnp.isnan(acceptance))):
        sample_stats["acceptance_rate"] = np.asarray(acceptance)
    attrs = {
        "inference": f"emdppl.distill E-step chains ({method})",
        "estep_sampler": sampler,
        "num_estep_steps": num_estep_steps,
        "probe_sigmas": [float(s) for s in probe_sigmas],
    }
    return to_arviz(posterior, sample_stats or None, attrs)


# ------------------------------------------------------------------------------------------
# emdppl.infer(model, EMD(...)): a posterior distilled into a one-step generator.


@dataclasses.dataclass(frozen=True)
class EMD:
    """Configuration of EM distillation for :func:`emdppl.infer`.

    The posterior (unconstrained, auxiliary space) is the teacher
    (:func:`emdppl.teachers.from_model`, Laplace-smoothed score for ``sigma`` in
    ``[sigma_max / 10, sigma_max]``). The default generator is
    :func:`emdppl.generators.sinh_arcsinh` (a small flow whose smoothed score is computed, so no
    student network); ``"affine"`` is a full-rank Gaussian, ``"mlp"`` an MLP with a learned
    student score. It is distilled with a cosine-decayed Adam learning rate. ``num_samples``
    one-step draws are returned as ``num_chains`` chains of ``num_samples // num_chains`` draws.

    **z frozen by default.** ``update_z=False`` (with full noise cancellation, the
    :func:`distill` default for it) runs the E-step on :math:`\varepsilon` only: the
    K-step generalisation of Diff-Instruct (injected noise cancelled exactly), closer to a
    reverse-KL fit.
    ``update_z=True`` samples z too (z step ``min(z_step_scale sigma^2, max_z_step)``, no
    cancellation): the forward-KL, mass-covering fit. For a posterior the generator family
    cannot represent exactly, forward KL over-disperses. Measured on eight schools (400-1000
    steps, K = 8, posteriordb reference): z frozen, seeds 0-3: sds 0.94-1.15x, means within
    0.05 sd; z sampled: largest sd ratio 1.17-1.51x over 8 settings (the same family fitted by
    maximum likelihood on 20k NUTS draws, the forward-KL optimum at sigma = 0, already gives
    1.19x: it cannot express the
    tau-dependent scales of the non-centred effects).

    Examples
    --------
    >>> idata = emdppl.infer(model, emdppl.EMD(num_steps=1500), model_kwargs=data)  # doctest: +SKIP
    """

    num_steps: int = 1000
    num_samples: int = 1000
    num_chains: int = 4
    batch_size: int = 128
    learning_rate: float = 0.02
    estep_sampler: str = "ula"
    num_estep_steps: int = 8
    estep_step_size: float = 0.2
    z_step_scale: float = 200.0
    max_z_step: float = 0.05
    sigma_max: float = 0.5
    generator: str = "sinh_arcsinh"
    update_z: bool = False
    noise_cancellation: str | None = None

    def __post_init__(self):
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}.")
        if self.num_samples < self.num_chains or self.num_samples % self.num_chains:
            raise ValueError(
                f"num_samples={self.num_samples} must be a positive multiple of "
                f"num_chains={self.num_chains}."
            )

    def infer(
        self,
        model: Callable,
        *,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        rng_key: int | PRNGKey = 0,
        auxiliary: bool = True,
        progress_bar: bool = True,
    ) -> Any:
        """Distil a NumPyro model's posterior into a one-step generator and sample it.

        Returns an ``arviz.InferenceData`` with the posterior's model sites (constrained) under
        dims ``(chain, draw, ...)`` like MCMC, and the E-step chains as group ``estep_posterior``.
        """
        from emdppl.inference_data import to_arviz
        from emdppl.target import Target
        from emdppl.teachers import density_teacher

        k_target, k_distill, k_sample = jax.random.split(as_key(rng_key), 3)
        target = Target.from_numpyro(
            model,
            model_args=model_args,
            model_kwargs=model_kwargs,
            num_chains=1,
            rng_key=k_target,
            auxiliary=auxiliary,
        )
        teacher = density_teacher(target, sigma_max=self.sigma_max)
        d = teacher.data_dim
        generator = {
            "sinh_arcsinh": lambda: generators_module.sinh_arcsinh(d),
            "maf": lambda: generators_module.maf(d, key=jax.random.fold_in(k_distill, 1)),
            "affine": lambda: generators_module.affine(d),
            "mlp": lambda: generators_module.mlp(d, key=jax.random.fold_in(k_distill, 1)),
        }[self.generator]()
        schedule_fn = optax.cosine_decay_schedule(self.learning_rate, self.num_steps, alpha=0.01)
        result = distill(
            teacher,
            generator,
            num_steps=self.num_steps,
            batch_size=self.batch_size,
            estep_sampler=self.estep_sampler,
            num_estep_steps=self.num_estep_steps,
            estep_step_size=self.estep_step_size,
            z_step_scale=self.z_step_scale,
            max_z_step=self.max_z_step,
            update_z=self.update_z,
            noise_cancellation=self.noise_cancellation,
            optimizer=optax.adam(schedule_fn),
            rng_key=k_distill,
            progress_bar=progress_bar,
        )
        flat = result.sample(k_sample, self.num_samples)
        _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], target.initial_position))
        positions = jax.vmap(unravel)(flat)
        positions = jax.tree.map(lambda x: x.reshape(self.num_chains, -1, *x.shape[1:]), positions)
        posterior = {k: np.asarray(v) for k, v in target.postprocess(positions).items()}
        estep = result.estep_idata.posterior
        attrs = {
            "inference": "emd",
            "num_steps": self.num_steps,
            "estep_sampler": self.estep_sampler,
            "num_estep_steps": self.num_estep_steps,
            "update_z": int(self.update_z),
            "noise_cancellation": self.noise_cancellation
            or _default_noise_cancellation(self.update_z),
            "num_skipped_steps": int(result.state.num_skipped),
        }
        return to_arviz(
            posterior,
            None,
            attrs,
            estep_posterior={name: np.asarray(estep[name].values) for name in estep.data_vars},
        )
