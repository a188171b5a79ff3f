r"""EM distillation (EMD) as blackjax writes an algorithm: ``init``, ``build_kernel``,
``as_top_level_api``.

The generator :math:`x = g_\theta(z)`, :math:`z \sim N(0, I)` defines at every noise level the
joint :math:`q_{\theta,\sigma}(x_\sigma, z) = N(z; 0, I)\,N(x_\sigma; g_\theta(z), \sigma^2 I)`
(VE convention, :mod:`emdppl.schedule`). EMD minimises :math:`E_\sigma\,w(\sigma)\,
\mathrm{KL}(p_\sigma \| q_{\theta,\sigma})` (forward KL, mode covering) by stochastic EM
(``docs/EMD.md``). One step of the kernel is

1. ``student_updates_per_step`` EDM denoising-score-matching updates of the student
   :math:`s_\psi \approx \nabla\log q_{\theta,\sigma}` on fresh generator draws (TTUR); a
   generator with ``marginal_score`` (affine: exact; sinh-arcsinh: Laplace-smoothed) is its own
   student;
2. the **E-step** (:mod:`emdppl.estep`): K sampler steps over :math:`(\varepsilon, z)` from exact
   generator draws, with noise cancellation;
3. the **M-step**: one optax step on the surrogate :func:`emdppl.losses.generator_loss`.

An E-step chain that ends non-finite is left out of the M-step (the others reweighted); a
step whose loss, gradients or parameters are not finite, or with no finite chain, is a no-op
that is counted;
``max_consecutive_nan`` of them in a row freeze the state (the driver then raises).

**Diff-Instruct** (§6) is the configuration ``method="diff_instruct"``: K = 1, z frozen and full
cancellation; its gradient is exactly ``estep_step_size`` times the reverse-KL (DI) gradient.

As in blackjax, the kernel takes the teacher per call, ``kernel(rng_key, state, teacher)``; the
generator's and student's parameters are in the state (both are trained), their static
structure and the :class:`~emdppl.distill_config.DistillConfig` are fixed when it is built.

**Several devices** (a ``"batch"`` mesh, :func:`emdppl.sharding.batch_mesh`): the batch drawn
in a step (E-step ``sigma, eps, z`` and the student's DSM draws, leading axis ``B``) is split
over the mesh, ``B / num_devices`` per device, while the state (parameters, optimiser states)
stays replicated; ``jit`` turns the batch sums of the gradients into all-reduces. With
partitionable threefry keys (JAX's default) the draws, and so the run, are those of one device
up to float reassociation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from emdppl import generators as generators_module
from emdppl import schedule
from emdppl.base import Algorithm, PRNGKey, PyTree, tree_all_finite, tree_where
from emdppl.distill_config import DistillConfig
from emdppl.estep import EStepTarget, draw, estep, sampler_parameters
from emdppl.losses import dsm_loss, generator_loss
from emdppl.samplers import get_sampler
from emdppl.sharding import Devices, batch_mesh, constrain_leading, constrain_replicated, replicate
from emdppl.teachers import AbstractTeacher, DiffusionModel, EDMNetwork

__all__ = [
    "EMDInfo",
    "EMDState",
    "as_top_level_api",
    "build_kernel",
    "build_student_kernel",
    "default_student",
    "init",
    "student_warmup",
]


class EMDState(NamedTuple):
    """Generator parameters ``theta``, student parameters ``psi`` (``()`` for an exact
    student), their optimiser states, and the counts of skipped (non-finite) steps."""

    theta: PyTree
    psi: PyTree
    theta_opt_state: PyTree
    psi_opt_state: PyTree
    num_skipped: jax.Array
    consecutive_skipped: jax.Array


class EMDInfo(NamedTuple):
    """Per-step diagnostics (the ``history`` of :class:`~emdppl.distillation.DistillResult`).

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
        :math:`N(0, I)`, so values far above 1 mean the z step is too large.
    nonfinite_chains
        E-step chains whose end point was NaN/inf (left out of the M-step; the others are
        reweighted). Statistics above are over the finite chains.
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
    nonfinite_chains: jax.Array


def _not_measured(x: jax.ShapeDtypeStruct) -> jax.Array:
    """NaN of ``x``'s shape and dtype, or -1 for an integer (a count) and False for a flag."""
    fill = jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else (-1 if x.dtype != bool else False)
    return jnp.full(x.shape, fill, x.dtype)


def _finite_mean(values: jax.Array, finite: jax.Array) -> jax.Array:
    """Mean of ``values (B,)`` over the chains marked ``finite`` (NaN when there is none)."""
    return jnp.sum(jnp.where(finite, values, 0.0)) / jnp.sum(finite)


def init(
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None,
    config: DistillConfig,
) -> EMDState:
    """The state at ``generator``'s and ``student``'s parameters (``student=None``: the
    generator has ``marginal_score`` and is its own student)."""
    theta, _ = generators_module.partition(generator)
    psi = () if student is None else eqx.filter(student, eqx.is_inexact_array)
    return EMDState(
        theta=theta,
        psi=psi,
        theta_opt_state=config.optimizer.init(theta),
        psi_opt_state=config.student_optimizer.init(psi),
        num_skipped=jnp.zeros((), jnp.int32),
        consecutive_skipped=jnp.zeros((), jnp.int32),
    )


class _Networks(eqx.Module):
    """The static halves of generator and student, and the pure maps built on them."""

    config: DistillConfig = eqx.field(static=True)
    generator_static: PyTree
    student_static: PyTree
    sampler_parameters: dict
    latent_dim: int = eqx.field(static=True)
    data_dim: int = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    def generate(self, theta: PyTree, z: jax.Array) -> jax.Array:
        """:math:`g_\\theta(z)`, ``z (latent_dim,) -> (d,)``."""
        return generators_module.apply(theta, self.generator_static, z)

    def draw_batch(self, rng_key: PRNGKey) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(sigma (B,), eps0 (B, d), z0 (B, latent_dim))`` of :func:`emdppl.estep.draw`, split
        over the mesh's batch axis (when there is a mesh)."""
        batch = draw(rng_key, self.config, self.data_dim, self.latent_dim)
        return constrain_leading(batch, self.mesh)

    def estep_target(self, teacher: AbstractTeacher, theta: PyTree, psi: PyTree) -> EStepTarget:
        generator = eqx.combine(theta, self.generator_static)
        if self.student_static is None:
            return EStepTarget(
                teacher,
                generator,
                generator.marginal_score,
                getattr(generator, "marginal_logdensity", None),
            )
        return EStepTarget(teacher, generator, eqx.combine(psi, self.student_static).score)

    def update_student(self, rng_key, theta, psi, psi_opt_state, num_updates: int):
        """``num_updates`` DSM steps of the student on fresh generator draws; returns
        ``(psi, psi_opt_state, mean loss)``."""
        if self.student_static is None:
            return psi, psi_opt_state, jnp.zeros(())
        config, shape = self.config, (self.config.batch_size,)

        def one(carry, key):
            psi, opt_state = carry
            k_z, k_sigma, k_noise = jax.random.split(key, 3)
            z = constrain_leading(jax.random.normal(k_z, (*shape, self.latent_dim)), self.mesh)
            x = jax.lax.stop_gradient(jax.vmap(lambda z: self.generate(theta, z))(z))
            sigma = schedule.sample_log_uniform(k_sigma, shape, config.sigma_min, config.sigma_max)
            sigma, noise = constrain_leading(
                (sigma, jax.random.normal(k_noise, x.shape)), self.mesh
            )
            loss, grads = jax.value_and_grad(
                lambda p: dsm_loss(eqx.combine(p, self.student_static), x, sigma, noise)
            )(psi)
            updates, opt_state = config.student_optimizer.update(grads, opt_state, psi)
            carry = constrain_replicated((optax.apply_updates(psi, updates), opt_state), self.mesh)
            return carry, loss

        keys = jax.random.split(rng_key, num_updates)
        (psi, psi_opt_state), losses = jax.lax.scan(one, (psi, psi_opt_state), keys)
        return psi, psi_opt_state, jnp.mean(losses)


class _Kernel(_Networks):
    """``kernel(rng_key, state, teacher) -> (state, info)``: see :func:`build_kernel`."""

    def __call__(
        self, rng_key: PRNGKey, state: EMDState, teacher: AbstractTeacher
    ) -> tuple[EMDState, EMDInfo]:
        def update(rng_key, state):  # the teacher is closed over: it may hold functions
            return self._update(rng_key, state, teacher)

        def stopped(rng_key, state):  # a no-op with info of the same dtypes (x64 too)
            _, info = jax.eval_shape(update, rng_key, state)
            return state, jax.tree.map(_not_measured, info)._replace(is_skipped=jnp.asarray(True))

        is_stopped = state.consecutive_skipped >= self.config.max_consecutive_nan
        return jax.lax.cond(is_stopped, stopped, update, rng_key, state)

    def _update(self, rng_key, state: EMDState, teacher) -> tuple[EMDState, EMDInfo]:
        config = self.config
        k_student, k_draw, k_chain = jax.random.split(rng_key, 3)
        psi, psi_opt_state, student_loss = self.update_student(
            k_student, state.theta, state.psi, state.psi_opt_state, config.student_updates_per_step
        )
        sigma, eps0, z0 = self.draw_batch(k_draw)
        target = self.estep_target(teacher, state.theta, psi)
        result = estep(k_chain, config, target, sigma, eps0, z0, self.sampler_parameters)
        # A chain that blew up (a score NaN far in a tail) is left out of this M-step, and the
        # others are reweighted; the step is skipped only when none is finite.
        finite = jnp.all(jnp.isfinite(result.eps_tilde), -1) & jnp.all(jnp.isfinite(result.z), -1)
        num_finite = jnp.sum(finite)
        reweight = finite.shape[0] / jnp.maximum(num_finite, 1)
        eps_tilde = jnp.where(finite[:, None], result.eps_tilde * reweight, 0.0)
        z_final = jnp.where(finite[:, None], result.z, 0.0)
        loss, grads = jax.value_and_grad(generator_loss, argnums=1)(
            self.generate, state.theta, z_final, eps_tilde, sigma, config.weighting
        )
        updates, theta_opt_state = config.optimizer.update(
            grads, state.theta_opt_state, state.theta
        )
        theta = optax.apply_updates(state.theta, updates)
        grad_norm = optax.tree.norm(grads)
        is_finite = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(student_loss)
            & (num_finite > 0)
            & tree_all_finite((theta, psi))
        )
        new = EMDState(
            theta, psi, theta_opt_state, psi_opt_state, state.num_skipped, jnp.zeros((), jnp.int32)
        )
        skipped = state._replace(
            num_skipped=state.num_skipped + 1, consecutive_skipped=state.consecutive_skipped + 1
        )
        state = tree_where(is_finite, new, skipped)
        state = constrain_replicated(state, self.mesh)
        info = EMDInfo(
            loss=loss,
            grad_norm=grad_norm,
            student_loss=student_loss,
            estep_drift=_finite_mean(jnp.linalg.norm(result.eps - result.eps0, axis=-1), finite),
            correction_norm=_finite_mean(jnp.linalg.norm(result.eps_tilde, axis=-1), finite),
            acceptance_rate=jnp.mean(result.acceptance_rate),
            stale_logdensity=jnp.max(result.stale_logdensity),
            is_skipped=~is_finite,
            z_rms=jnp.sqrt(_finite_mean(jnp.mean(result.z**2, axis=-1), finite)),
            nonfinite_chains=finite.shape[0] - num_finite,
        )
        return state, info


class _StudentKernel(_Networks):
    """``kernel(rng_key, state) -> (state, loss)``: one student DSM step, generator fixed."""

    def __call__(self, rng_key: PRNGKey, state: EMDState) -> tuple[EMDState, jax.Array]:
        psi, psi_opt_state, loss = self.update_student(
            rng_key, state.theta, state.psi, state.psi_opt_state, 1
        )
        state = state._replace(psi=psi, psi_opt_state=psi_opt_state)
        return constrain_replicated(state, self.mesh), loss


def _networks(
    cls: type,
    config: DistillConfig,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None,
    mesh: Mesh | None,
) -> Any:
    _, generator_static = generators_module.partition(generator)
    student_static = (
        None if student is None else eqx.filter(student, eqx.is_inexact_array, inverse=True)
    )
    d, latent_dim = generator.data_dim, generator.latent_dim
    parameters = sampler_parameters(config, d, latent_dim)
    return cls(config, generator_static, student_static, parameters, latent_dim, d, mesh)


def build_kernel(
    config: DistillConfig,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None = None,
    mesh: Mesh | None = None,
):
    """The EMD kernel ``kernel(rng_key, state, teacher) -> (state, EMDInfo)``.

    ``generator`` and ``student`` give the static structure only (their parameters are in the
    state); ``config`` must have its ``sigma_range`` set (:meth:`DistillConfig.for_teacher`).
    ``mesh`` (:func:`emdppl.sharding.batch_mesh`): split the batch over its devices, keep the
    state replicated; the state and teacher passed in should be replicated on it
    (:func:`emdppl.sharding.replicate`). The kernel is an equinox module: two kernels built
    from equal settings compare equal, so jitted code is reused.
    """
    return _networks(_Kernel, config, generator, student, mesh)


def build_student_kernel(
    config: DistillConfig,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None = None,
    mesh: Mesh | None = None,
):
    """The student warm-up kernel ``kernel(rng_key, state) -> (state, dsm_loss)``: one DSM
    update of the student on draws of the current generator (run before the first EMD step);
    ``mesh`` as in :func:`build_kernel`.

    The kernel holds only the settings the student's update reads (batch size, noise range,
    student optimiser), so runs that differ elsewhere (EMD and Diff-Instruct of one teacher)
    build equal kernels and share one compiled warm-up."""
    student_config = DistillConfig(
        batch_size=config.batch_size,
        sigma_range=config.sigma_range,
        student_optimizer=config.student_optimizer,
    )
    return _networks(_StudentKernel, student_config, generator, student, mesh)


def student_warmup(
    config: DistillConfig,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel,
    mesh: Mesh | None = None,
) -> Algorithm:
    """The student warm-up as an :class:`~emdppl.base.Algorithm`: ``init(generator, rng_key)
    -> EMDState`` and ``step(rng_key, state) -> (state, dsm_loss)`` of
    :func:`build_student_kernel`. Both hold the student's settings only, so EMD and
    Diff-Instruct runs of one teacher compile one warm-up program (:func:`emdppl.run` is
    jitted on the whole algorithm)."""
    kernel = build_student_kernel(config, generator, student, mesh)
    init = _Init(replicate(student, mesh), kernel.config, mesh)
    return Algorithm(init=init, step=replicate(kernel, mesh))


def default_student(
    teacher: AbstractTeacher, generator: generators_module.AbstractGenerator, rng_key: PRNGKey
) -> DiffusionModel | None:
    """``None`` for a generator with ``marginal_score``; else a copy of a
    :class:`~emdppl.teachers.DiffusionModel` teacher (the EMD paper's initialisation), else a
    fresh :class:`~emdppl.teachers.EDMNetwork` at the teacher's data scale."""
    if hasattr(generator, "marginal_score"):
        return None
    if isinstance(teacher, DiffusionModel):
        return teacher
    network = EDMNetwork(teacher.data_dim, key=rng_key)
    return DiffusionModel(network, teacher.sigma_data, teacher.data_dim)


def check_inputs(
    teacher: AbstractTeacher,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None,
    config: DistillConfig,
) -> None:
    """Raise a clear error for a teacher, generator or student that cannot be distilled."""
    if not isinstance(teacher, AbstractTeacher):
        raise TypeError(
            f"teacher must be an emdppl.teachers.AbstractTeacher, got {type(teacher).__name__}; "
            "wrap a denoiser network with emdppl.teachers.DiffusionModel(net, sigma_data, d)."
        )
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
    if student is None and not hasattr(generator, "marginal_score"):
        raise ValueError(
            f"{type(generator).__name__} has no marginal_score: pass a student score model "
            "(emdppl.emd.default_student(teacher, generator, key) builds the default)."
        )
    has_densities = hasattr(teacher, "log_prob") and hasattr(generator, "marginal_logdensity")
    if get_sampler(config.estep_sampler).needs_logdensity and not has_densities:
        raise ValueError(
            f"estep_sampler={config.estep_sampler!r} needs the E-step log density, i.e. a teacher "
            "with log_prob and a generator with marginal_logdensity (e.g. generators.affine); use "
            "a gradient-only sampler ('ula', 'sgld', 'sghmc') for score teachers."
        )


class _Step(eqx.Module):
    """``step(rng_key, state)``: the kernel with its teacher bound (traced, not baked in)."""

    kernel: Any
    teacher: AbstractTeacher

    def __call__(self, rng_key: PRNGKey, state: EMDState) -> tuple[EMDState, EMDInfo]:
        return self.kernel(rng_key, state, self.teacher)


class _Init(eqx.Module):
    """``init(generator, rng_key)``: the state at ``generator`` with the bound student,
    replicated on the mesh's devices (when there is a mesh)."""

    student: Any
    config: DistillConfig = eqx.field(static=True)
    mesh: Mesh | None = eqx.field(static=True, default=None)

    def __call__(self, generator: Any, rng_key: PRNGKey | None = None) -> EMDState:
        return replicate(init(generator, self.student, self.config), self.mesh)


def as_top_level_api(
    teacher: AbstractTeacher,
    generator: generators_module.AbstractGenerator,
    student: DiffusionModel | None = None,
    config: DistillConfig | None = None,
    devices: Devices = None,
) -> Algorithm:
    """EMD of ``teacher`` into ``generator``'s family as an :class:`~emdppl.base.Algorithm`.

    ``init(generator, rng_key) -> EMDState``; ``step(rng_key, state) -> (state, EMDInfo)``.
    ``config`` defaults to ``DistillConfig()`` with the teacher's noise range. ``devices``
    (:func:`emdppl.sharding.batch_mesh`: ``None``, ``"all"``, an int, a list of devices or a
    one-axis ``Mesh``): split each step's batch over them, ``config.batch_size`` a multiple of
    their number; the teacher and the states ``init`` returns are replicated on them.

    Examples
    --------
    >>> generator = emdppl.generators.affine(1)
    >>> emd = emdppl.emd.as_top_level_api(teacher, generator)  # doctest: +SKIP
    >>> state = emd.init(generator, jax.random.key(0))  # doctest: +SKIP
    >>> state, info = emdppl.run(1, emd, 1000, state)  # doctest: +SKIP
    """
    config = (DistillConfig() if config is None else config).for_teacher(teacher)
    check_inputs(teacher, generator, student, config)
    mesh = batch_mesh(devices, config.batch_size)
    kernel = build_kernel(config, generator, student, mesh)
    step = replicate(_Step(kernel, teacher), mesh)
    return Algorithm(init=_Init(replicate(student, mesh), config, mesh), step=step)
